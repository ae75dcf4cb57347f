"""FP8 (E4M3) per-tensor serving numerics in pure torch: weights, activations, KV cache.

Policy: compute on CPU exactly what a serving engine computes from an exported
modelopt checkpoint, starting from the stored bytes and scales. We write this
ourselves instead of calling modelopt because the evaluation runs on CPU and must
start from the checkpoint's ``weight`` / ``weight_scale`` / ``input_scale`` /
``k_scale`` / ``v_scale`` tensors, not from a live quantizer's ``amax``.

Conventions (modelopt 0.47 ``export_hf_checkpoint``, FP8 per tensor):

- ``weight``: ``torch.float8_e4m3fn``, ``weight / weight_scale`` rounded to nearest even.
- ``weight_scale``: fp32, ``amax / 448`` (shape ``[1]`` in modelopt's export).
- ``input_scale`` (activations) and ``k_scale`` / ``v_scale`` (FP8 KV cache): fp32,
  ``amax / 448``; the tensor is quantized as ``clamp(x / scale, -448, 448)`` cast to
  E4M3, and dequantized as ``q * scale``.

All arithmetic is float32, results are cast to the requested dtype once at the end.
Quantization divides by the stored scale, as TensorRT-LLM's per-tensor FP8 kernels do
(``cudaFp8Utils.cu``: ``a / b``). modelopt's fake quant instead multiplies by
``448 / amax`` and dequantizes with ``1 / (448 / amax)``: the E4M3 codes agree except at
exact rounding ties, and float32 outputs may differ from modelopt's by one ulp (bf16
outputs practically never do).
"""

from __future__ import annotations

import torch

__all__ = [
    "E4M3_MAX",
    "dequantize_fp8",
    "fake_quant_fp8",
    "quantize_fp8",
]

E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` magnitude."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_high_precision(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else "?"
        raise ValueError(
            f"{name} of shape {shape} has dtype {got}; expected one of "
            "torch.float32, torch.bfloat16, torch.float16"
        )


def _as_scale(scale: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``scale`` as float32 on ``like``'s device, broadcastable to it, positive, finite."""
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise ValueError(
                f"{name} of shape {tuple(scale.shape)} has dtype {scale.dtype}; expected a "
                "floating-point scale (the checkpoint stores float32)"
            )
        scale_f32 = scale.detach().to(device=like.device, dtype=torch.float32)
    else:
        scale_f32 = torch.tensor(float(scale), dtype=torch.float32, device=like.device)
    try:
        broadcast = torch.broadcast_shapes(scale_f32.shape, like.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != like.shape:
        raise ValueError(
            f"{name} of shape {tuple(scale_f32.shape)} does not broadcast to the tensor of "
            f"shape {tuple(like.shape)}; expected a per-tensor scale (shape [] or [1])"
        )
    if not bool(torch.all(torch.isfinite(scale_f32) & (scale_f32 > 0))):
        raise ValueError(
            f"{name} of shape {tuple(scale_f32.shape)} must be positive and finite; got "
            f"{scale_f32.flatten()[:4].tolist()} (a zero or NaN scale means the quantizer "
            "was never calibrated)"
        )
    return scale_f32


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize a tensor to FP8 E4M3 with a per-tensor scale.

    Computes ``clamp(x.float() / scale, -448, 448)`` cast to ``float8_e4m3fn`` (round to
    nearest even). For ``weight_scale`` in modelopt's export shape ``[1]`` this gives the
    same bytes as modelopt's ``to_quantized_weight(..., QUANTIZATION_FP8)``; the clamp only
    matters where modelopt's unclamped cast would saturate anyway.

    Args:
        x: float32, bfloat16 or float16 tensor.
        scale: positive finite scale (``amax / 448``), a float or a float tensor that
            broadcasts to ``x`` (``[]`` or ``[1]`` for per-tensor).

    Returns:
        A ``torch.float8_e4m3fn`` tensor with ``x``'s shape.

    Raises:
        ValueError: ``x`` is not a float32/bfloat16/float16 tensor, or ``scale`` is not
            positive, finite and broadcastable to ``x``.
    """
    _check_high_precision(x, "x")
    scale_f32 = _as_scale(scale, x, "scale")
    return (x.float() / scale_f32).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantize FP8 E4M3 values: ``(q.float() * scale).to(dtype)``.

    The product is formed in float32 and rounded once to ``dtype``. With
    ``dtype=torch.float32`` this equals modelopt's ``FP8QTensor.dequantize(dtype=float32)``
    bit for bit. (modelopt with a 16-bit ``dtype`` rounds the scale to that dtype before
    multiplying; serving engines apply the fp32 scale to an fp32 accumulator, as here.)

    Args:
        q: ``torch.float8_e4m3fn`` tensor (a checkpoint's ``weight``).
        scale: positive finite scale (the checkpoint's ``weight_scale``), broadcastable to ``q``.
        dtype: output dtype.

    Returns:
        The dequantized tensor in ``dtype``.

    Raises:
        ValueError: ``q`` is not ``float8_e4m3fn`` or ``scale`` is invalid.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else "?"
        hint = " (view uint8 bytes with .view(torch.float8_e4m3fn))" if got == torch.uint8 else ""
        raise ValueError(f"q of shape {shape} has dtype {got}; expected torch.float8_e4m3fn{hint}")
    scale_f32 = _as_scale(scale, q, "scale")
    return (q.float() * scale_f32).to(dtype)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize to FP8 E4M3 and back, as a static per-tensor activation or KV-cache quantizer.

    ``dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)``: use it with a checkpoint's
    ``input_scale`` for GEMM inputs and with ``k_scale`` / ``v_scale`` for the FP8 KV cache.

    Args:
        x: float32, bfloat16 or float16 tensor.
        scale: positive finite per-tensor scale (``amax / 448``).

    Returns:
        A tensor of ``x``'s shape and dtype holding values on the scaled E4M3 grid.

    Raises:
        ValueError: as :func:`quantize_fp8`.
    """
    _check_high_precision(x, "x")
    scale_f32 = _as_scale(scale, x, "scale")
    q = (x.float() / scale_f32).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale_f32).to(x.dtype)

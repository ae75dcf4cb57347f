"""NVFP4 (E2M1 values, E4M3 block scales, fp32 global scale) serving numerics in pure torch.

Policy: reproduce, on CPU and bit for bit, the numerics of modelopt 0.47 for NVFP4
checkpoints, starting from the exported bytes. We write this ourselves instead of
calling modelopt because modelopt's NVFP4 fake-quant forward needs CUDA ("amax must be
a CUDA tensor for dynamic block quantization") and our evaluation runs on CPU.

Checkpoint conventions (modelopt ``export_hf_checkpoint``, NVIDIA's hub NVFP4 releases):

- ``weight``: uint8 ``[..., in / 2]``, two E2M1 codes per byte, element ``2i`` in the
  LOW nibble and element ``2i + 1`` in the HIGH nibble. A code is ``sign << 3 | magnitude``
  with magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (see :data:`E2M1_VALUES`).
- ``weight_scale``: ``float8_e4m3fn`` ``[..., in / 16]``, one scale per 16 consecutive
  input elements.
- ``weight_scale_2``: fp32 global scale, ``amax / (6 * 448)``.
- ``input_scale``: fp32 activation global scale, ``amax / (6 * 448)``.
- Dequantized weight: ``e2m1 * (weight_scale.float() * weight_scale_2)`` in fp32
  (modelopt's ``NVFP4QTensor.dequantize`` order), then cast.

Weights follow ``NVFP4QTensor.quantize``: block scale ``block_amax / (6 * global)``,
all-zero blocks get scale 1.0, clamped to ``[2**-9, 448]`` and rounded to E4M3; values
divided by ``block_scale * global`` and rounded to the nearest E2M1 value, ties to even
(0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; above 6 saturates).

Activations follow modelopt's dynamic-block fake quant (the Triton kernel
``fp4_fake_quant_block`` it runs on SM >= 89): per 16-element block,
``scale = e4m3(min(block_amax / (6 * global), 448)) * global``, a scale below 1e-5 is
replaced by 1.0, values become ``e2m1(|x| / scale) * scale`` with ``x``'s sign.
Known differences, all at rounding ties or in degenerate blocks:

- Triton's fp32 ``/`` is ``div.full.f32`` (up to 2 ulp); we divide exactly (IEEE), so a
  quotient that lands exactly on an E2M1 tie can round differently on the GPU.
- TensorRT-LLM's ``fp4_quantize`` multiplies by reciprocals instead of dividing and
  zeroes a block whose E4M3 scale underflows, where modelopt substitutes scale 1.0
  (blocks with amax below about 6e-5 become zeros under modelopt's rule).
"""

from __future__ import annotations

import torch

from omniquant.numerics.fp8 import E4M3_MAX, _as_scale, _check_high_precision

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "dequantize_nvfp4",
    "e2m1_codes",
    "fake_quant_nvfp4_activation",
    "fake_quant_nvfp4_blocks",
    "pack_e2m1",
    "quantize_nvfp4",
    "unpack_e2m1",
]

E2M1_MAX = 6.0
"""Largest E2M1 magnitude."""

E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)
"""float32 value of each 4-bit E2M1 code (index = code). Code 8 (negative zero) maps to
+0.0, as in modelopt, so dequantized zeros are +0.0."""

_E2M1_MAGNITUDES = E2M1_VALUES[:8]
# Byte -> (value of the low nibble, value of the high nibble): one gather dequantizes a byte.
_E2M1_PAIR_VALUES = torch.stack((E2M1_VALUES.repeat(16), E2M1_VALUES.repeat_interleave(16)), dim=-1)
_E4M3_MIN_SUBNORMAL = 2.0**-9
# modelopt's Triton kernel replaces a (dequantized) activation block scale below this by 1.0.
_ACTIVATION_MIN_BLOCK_SCALE = 1e-5

# Rounding x / scale to a signed E2M1 value in one ``bucketize`` (bucket = number of
# boundaries strictly below the value). A magnitude tie that rounds down (0.25, 1.25, 2.5,
# 5: to the even code) keeps the tie in the bucket nearer zero, one that rounds up (0.75,
# 1.75, 3.5) moves it away from zero; the float32 neighbour of a boundary places the tie
# on the right side. Zero: a negative value rounding to magnitude 0 gives -0.0, while
# -0.0 itself gives +0.0 (the reference tests ``x >= 0``), hence the boundary just below 0.
_DOWN_TIES = (0.25, 1.25, 2.5, 5.0)


def _boundary_below(v: float) -> float:
    return float(torch.nextafter(torch.tensor(v), torch.tensor(float("-inf"))))


_POSITIVE_BOUNDARIES = sorted(
    t if t in _DOWN_TIES else _boundary_below(t) for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
)
_NEGATIVE_BOUNDARIES = sorted(
    _boundary_below(-t) if t in _DOWN_TIES else -t for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
)
_SIGNED_BOUNDARIES = torch.tensor(
    [*_NEGATIVE_BOUNDARIES, _boundary_below(0.0), *_POSITIVE_BOUNDARIES], dtype=torch.float32
)
_SIGNED_VALUES = torch.tensor(
    [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    dtype=torch.float32,
)
# The E2M1 code (sign << 3 | magnitude) of each bucket: -0.0's bucket is code 8.
_SIGNED_CODES = torch.tensor(
    [15, 14, 13, 12, 11, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.uint8
)


def _bucket_codes(scaled: torch.Tensor) -> torch.Tensor:
    buckets = torch.bucketize(scaled, _SIGNED_BOUNDARIES.to(scaled.device), out_int32=True)
    return _SIGNED_CODES.to(scaled.device)[buckets]


# Rounding by table on the float32 bits: every rounding boundary (and 0, inf) is a value
# whose mantissa below its top two bits is zero, so the rounding of x is fixed by its sign,
# exponent and top two mantissa bits (bits 31..21) plus whether bits 20..0 are all zero
# (x sits exactly on such a value). One representative per class fills the tables, ranked
# by the bucket rule above; the tests check every class against the reference formulas.
def _class_index(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 20) & 0xFFE) | ((bits & 0x1FFFFF) == 0)


_CLASS_BITS = torch.arange(4096, dtype=torch.int64)
_REPRESENTATIVES = (
    ((_CLASS_BITS >> 1) << 21 | (1 - (_CLASS_BITS & 1))).to(torch.int64).add_(-(1 << 32))
).where((_CLASS_BITS >> 11) == 1, (_CLASS_BITS >> 1) << 21 | (1 - (_CLASS_BITS & 1)))
_REPRESENTATIVES = _REPRESENTATIVES.to(torch.int32).view(torch.float32)
#: Class -> E2M1 code, modelopt's weight rule (a NaN gets code 7, as its ``searchsorted``).
_CODE_TABLE = _bucket_codes(_REPRESENTATIVES)
#: Class -> signed E2M1 value, the activation rule (a NaN rounds to -0.0: NaN >= 0 fails).
_VALUE_TABLE = torch.where(
    torch.isnan(_REPRESENTATIVES),
    torch.tensor(-0.0),
    _SIGNED_VALUES[
        torch.bucketize(_REPRESENTATIVES.nan_to_num(0.0), _SIGNED_BOUNDARIES, out_int32=True)
    ],
)


#: Elements per chunk in :func:`e2m1_codes` (2 Mi: 8 MiB int32 buffers; small chunks cost
#: one OpenMP region per op each, which dominated under load with 2 threads).
_CODES_CHUNK = 1 << 21


def e2m1_codes(
    scaled: torch.Tensor, out: torch.Tensor | None = None, work: dict | None = None
) -> torch.Tensor:
    """E2M1 codes (``sign << 3 | magnitude``) of float32 values already divided by their scale.

    Magnitudes round to nearest, ties to even, saturating at 6; the sign bit is
    ``scaled < 0`` (so -0.0 gives code 0, a small negative value code 8). Equal, code for
    code, to modelopt 0.47's ``NVFP4QTensor._cast_fp4`` (``searchsorted`` plus the tie
    fix-up), by one table lookup on the float32 bits instead of eight passes.

    The export calls it on whole stacked-expert weights (hundreds of millions of
    elements): it runs over chunks of :data:`_CODES_CHUNK` elements into preallocated
    buffers, so its temporaries are a few chunk-sized buffers instead of several int32
    copies of the weight (each, for a stacked-expert weight, a fresh mapping page-faulted
    in: ``omniquant/quantize/heap.py``). Same per-element operations as ``_class_index``,
    so the same codes.

    Args:
        out: A contiguous uint8 tensor of ``scaled``'s element count to write the codes
            into (returned, viewed in ``scaled``'s shape).
        work: A dict the caller keeps across calls: the chunk buffers are made once and
            reused from it, not made per call.
    """
    bits = scaled.contiguous().view(torch.int32).reshape(-1)
    table = _CODE_TABLE.to(scaled.device)
    n = bits.numel()
    if n <= _CODES_CHUNK and out is None and work is None:
        return table[_class_index(bits)].view(scaled.shape)
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=scaled.device)
    elif out.dtype != torch.uint8 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor of {n} elements")
    flat = out.view(-1)
    work = {} if work is None else work
    if work.get("device") != scaled.device:
        work.update(
            device=scaled.device,
            index=torch.empty(_CODES_CHUNK, dtype=torch.int32, device=scaled.device),
            low=torch.empty(_CODES_CHUNK, dtype=torch.int32, device=scaled.device),
        )
    index, low = work["index"], work["low"]
    for start in range(0, n, _CODES_CHUNK):
        chunk = bits[start : start + _CODES_CHUNK]
        m = chunk.numel()
        idx, lo = index[:m], low[:m]
        torch.bitwise_right_shift(chunk, 20, out=idx).bitwise_and_(0xFFE)
        # ``| (low bits == 0)`` in int32 arithmetic: low - 1 is negative only for 0, and
        # its arithmetic shift by 31 gives -1 there, 0 elsewhere; idx - that sets bit 0
        # (clear after the mask). A bool mask OR-ed into int32 would be cast to a fresh
        # int32 temporary first (mixed dtypes on the CPU): a page-faulted 8 MiB per chunk.
        torch.bitwise_and(chunk, 0x1FFFFF, out=lo).sub_(1).bitwise_right_shift_(31)
        torch.index_select(table, 0, idx.sub_(lo), out=flat[start : start + m])
    return out.view(scaled.shape)


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")


def _check_last_dim(x: torch.Tensor, name: str, block_size: int) -> None:
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        last = x.shape[-1] if x.dim() else "none (0-d tensor)"
        raise ValueError(
            f"{name} of shape {tuple(x.shape)}: last dimension {last} is not divisible by the "
            f"NVFP4 block size {block_size}; NVFP4 needs the input-feature dimension to be a "
            f"multiple of {block_size} (pad it or keep this tensor out of NVFP4)"
        )


def _e2m1_magnitude_codes(abs_scaled: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 values to E2M1 magnitude codes 0..7 (ties to even, saturating).

    Counts the rounding boundaries a value has passed: a value exactly on a boundary passes
    it only where the upper neighbour has the even code (0.75, 1.75, 3.5). Same codes as
    modelopt's ``searchsorted`` + tie fix-up, with uint8 comparisons (several times faster).
    """
    codes = (abs_scaled > 0.25).to(torch.uint8)
    codes += abs_scaled >= 0.75
    codes += abs_scaled > 1.25
    codes += abs_scaled >= 1.75
    codes += abs_scaled > 2.5
    codes += abs_scaled >= 3.5
    codes += abs_scaled > 5.0
    return codes


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit E2M1 codes two per byte: element ``2i`` low nibble, ``2i + 1`` high nibble.

    Args:
        codes: uint8 tensor of codes 0..15 whose last dimension is even.

    Returns:
        uint8 tensor of shape ``[..., n / 2]``, modelopt's ``weight`` layout.

    Raises:
        ValueError: ``codes`` is not uint8, has an odd last dimension, or holds a value > 15.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes has dtype {got}; expected torch.uint8 E2M1 codes 0..15")
    if codes.dim() == 0 or codes.shape[-1] % 2 != 0:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)}: the last dimension must be even to pack "
            "two E2M1 codes per byte"
        )
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} holds {int(codes.max())}; E2M1 codes are 0..15"
        )
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes into E2M1 codes, inverse of :func:`pack_e2m1`.

    Args:
        packed: uint8 tensor ``[..., n / 2]``.

    Returns:
        uint8 tensor of codes 0..15 with shape ``[..., n]``.

    Raises:
        ValueError: ``packed`` is not a uint8 tensor with at least one dimension.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() == 0:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else "?"
        raise ValueError(
            f"packed of shape {shape} has dtype {got}; expected a uint8 tensor of packed "
            "E2M1 pairs with at least one dimension"
        )
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_nvfp4(
    w: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight to NVFP4 with the bytes modelopt's ``NVFP4QTensor.quantize`` writes.

    Args:
        w: float32, bfloat16 or float16 tensor ``[..., in]``, ``in`` divisible by
            ``block_size`` (and even).
        global_scale: ``weight_scale_2``; defaults to ``amax(|w|) / (6 * 448)`` computed in
            float32. For an all-zero ``w`` the amax is taken as 6.0 (as modelopt's export
            sanitizes a zero amax), so the scale is 1/448 rather than 0; likewise for an
            amax so small that the division underflows to 0.
        block_size: elements per block scale (16 for NVFP4).

    Returns:
        ``(packed, block_scales, global_scale)``: uint8 ``[..., in / 2]``,
        ``float8_e4m3fn`` ``[..., in / block_size]`` and the float32 global scale
        (0-d when computed here, else the given one as float32).

    Raises:
        ValueError: bad dtype, a last dimension not divisible by ``block_size``, a
            non-finite ``w``, or a ``global_scale`` that is not positive and finite.
    """
    _check_high_precision(w, "w")
    _check_block_size(block_size)
    _check_last_dim(w, "w", block_size)
    if w.shape[-1] % 2 != 0:
        raise ValueError(f"w of shape {tuple(w.shape)}: the last dimension must be even to pack")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block_size, block_size)
    block_amax = blocks.abs().amax(dim=-1).float()
    amax = block_amax.amax() if block_amax.numel() else torch.zeros((), device=w.device)
    if not bool(torch.isfinite(amax)):
        raise ValueError(f"w of shape {tuple(w.shape)} contains NaN or inf; cannot quantize")
    if global_scale is None:
        # A zero amax, or one so small (float32 subnormal) that amax / 2688 underflows to
        # 0, is taken as 6.0: the weight quantizes to zeros under a valid scale.
        tiny = amax / (E2M1_MAX * E4M3_MAX) == 0
        amax = torch.where(tiny, torch.full_like(amax, E2M1_MAX), amax)
        global_scale_f32 = amax / (E2M1_MAX * E4M3_MAX)
    else:
        global_scale_f32 = _as_scale(global_scale, block_amax, "global_scale")

    # Same operation order as modelopt (get_weights_scaling_factor), so the bytes match.
    block_scale = block_amax / (E2M1_MAX * global_scale_f32)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    block_scales = block_scale.clamp(min=_E4M3_MIN_SUBNORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks.float() / (block_scales.float() * global_scale_f32).unsqueeze(-1)
    codes = _e2m1_magnitude_codes(scaled.abs()) | ((scaled < 0).to(torch.uint8) << 3)
    return pack_e2m1(codes.reshape(w.shape)), block_scales, global_scale_f32


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = 16,
) -> torch.Tensor:
    """Dequantize NVFP4 bytes: ``e2m1 * (block_scale.float() * global_scale)`` in fp32, cast once.

    Args:
        packed: uint8 ``[..., in / 2]`` (checkpoint ``weight``).
        block_scales: ``float8_e4m3fn`` ``[..., in / block_size]`` (``weight_scale``).
        global_scale: positive fp32 ``weight_scale_2``; per tensor, or broadcastable to
            ``block_scales`` (e.g. ``[experts, 1, 1]`` for stacked experts).
        dtype: output dtype.
        block_size: elements per block scale.

    Returns:
        Tensor ``[..., in]`` in ``dtype``, equal bit for bit to modelopt's
        ``NVFP4QTensor.dequantize``.

    Raises:
        ValueError: wrong dtypes, or shapes of ``packed`` and ``block_scales`` that do not
            describe the same ``[..., in]`` tensor.
    """
    _check_block_size(block_size)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() == 0:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else "?"
        raise ValueError(
            f"packed of shape {shape} has dtype {got}; expected uint8 packed E2M1 pairs"
        )
    if not isinstance(block_scales, torch.Tensor) or block_scales.dtype != torch.float8_e4m3fn:
        got = block_scales.dtype if isinstance(block_scales, torch.Tensor) else "?"
        hint = " (view uint8 bytes with .view(torch.float8_e4m3fn))" if got == torch.uint8 else ""
        raise ValueError(f"block_scales has dtype {got}; expected torch.float8_e4m3fn{hint}")
    shape = (*packed.shape[:-1], packed.shape[-1] * 2)
    if shape[-1] % block_size != 0:
        raise ValueError(
            f"packed of shape {tuple(packed.shape)} unpacks to {shape[-1]} elements per row, "
            f"not divisible by the NVFP4 block size {block_size}"
        )
    expected = (*shape[:-1], shape[-1] // block_size)
    if tuple(block_scales.shape) != expected:
        raise ValueError(
            f"block_scales of shape {tuple(block_scales.shape)} do not match packed of shape "
            f"{tuple(packed.shape)}: {shape[-1]} unpacked elements per row with block "
            f"size {block_size} need block_scales of shape {expected}"
        )
    global_scale_f32 = _as_scale(global_scale, block_scales, "global_scale")
    values = _E2M1_PAIR_VALUES.to(packed.device)[packed.int()]
    per_block = block_scales.float() * global_scale_f32
    blocks = values.view(*expected, block_size).mul_(per_block.unsqueeze(-1))
    return blocks.reshape(shape).to(dtype)


def fake_quant_nvfp4_activation(
    x: torch.Tensor, global_scale: torch.Tensor | float, block_size: int = 16
) -> torch.Tensor:
    """Dynamic NVFP4 quantize-dequantize of an activation under a stored global scale.

    Reproduces modelopt's CUDA fake quant (see the module docstring) on any device.
    To quantize many activations under one scale, build the function once with
    :func:`omniquant.numerics.activations.nvfp4_activation_quantizer` (it checks the scale
    once and precomputes what depends on it).

    Args:
        x: float32, bfloat16 or float16 tensor ``[..., features]``, ``features``
            divisible by ``block_size``; blocks run along the last dimension.
        global_scale: positive per-tensor ``input_scale`` (``amax / (6 * 448)``).
        block_size: elements per dynamic block scale.

    Returns:
        Tensor of ``x``'s shape and dtype; every element is an E2M1 value times its
        block's scale. An all-zero block stays zero.

    Raises:
        ValueError: bad dtype, a last dimension not divisible by ``block_size``, or an
            invalid ``global_scale``.
    """
    _check_high_precision(x, "x")
    _check_block_size(block_size)
    _check_last_dim(x, "x", block_size)
    like = torch.empty((1,) * (x.dim() + 1), device=x.device)  # a [..., blocks, 1] block scale
    global_scale_f32 = _as_scale(global_scale, like, "global_scale")
    one = global_scale_f32.reshape(())
    table = _VALUE_TABLE.to(x.device)
    return _fake_quant_nvfp4_fast(x, one, (E2M1_MAX * one).reshape(1), table, block_size)


def _fake_quant_nvfp4_fast(
    x: torch.Tensor,
    global_scale_f32: torch.Tensor,
    denominator: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """The activation fake quant on checked arguments, in few dispatched ops.

    One-off calls (``fake_quant_nvfp4_activation``, modelopt's CPU calibration) and
    autograd use it; evaluation's repeated calls use the lookups of
    ``omniquant.numerics.activations``, which precompute the block scale. Same values, bit for bit, as the
    step-by-step formula in the module docstring (the tests keep it as the reference):
    the block amax is ``max(|x|)`` (exact in any dtype); ``denominator`` (``6 *
    global_scale_f32``) is a 1-element 1-d float32 tensor, so the division promotes a
    bfloat16 amax to float32 exactly as ``.float()`` would; the rounding to signed E2M1
    values is one lookup in ``table`` on the float32 bits (``_class_index``, inlined with
    in-place ops; :data:`_VALUE_TABLE`); the last multiply is computed in float32 and
    rounded once into an output of ``x``'s dtype, as ``.to(x.dtype)`` would.
    """
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    scale = torch.div(blocks.abs().amax(dim=-1, keepdim=True), denominator).clamp_(max=E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float().mul_(global_scale_f32)
    scale = torch.where(scale >= _ACTIVATION_MIN_BLOCK_SCALE, scale, 1.0)
    bits = torch.div(blocks, scale).view(torch.int32)
    index = (bits >> 20).bitwise_and_(0xFFE).bitwise_or_((bits & 0x1FFFFF) == 0)
    if x.requires_grad and torch.is_grad_enabled():  # out= does not support autograd
        return table[index].mul_(scale).to(x.dtype).view(x.shape)
    out = torch.empty(blocks.shape, dtype=x.dtype, device=x.device)
    return torch.mul(table[index], scale, out=out).view(x.shape)


def fake_quant_nvfp4_blocks(
    blocks: torch.Tensor, block_scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """NVFP4 quantize-dequantize of blocks under given (already E4M3-rounded) block scales.

    The static-scale fake quant modelopt 0.47 runs for a calibrated ``NVFP4StaticQuantizer``
    (the Triton ``static_blockwise_fp4_fake_quant`` kernel, ``nvfp4_scalar_quant``): each
    element becomes ``e2m1(|x| / scale) * scale`` with ``x``'s sign (``x >= 0`` keeps +), a
    zero, NaN or infinite scale divides by 1.0, and a block whose scale is zero becomes zeros.
    Rounding is :func:`_e2m1_magnitude_codes` (ties to even, saturating at 6), the same
    boundaries as the kernel's ``fp4_round_magnitude``.

    Args:
        blocks: float tensor ``[n_blocks, block_size]`` (any float dtype; computed in fp32).
        block_scale: ``[n_blocks]`` (or any shape with ``n_blocks`` elements) dequantized
            per-block scales in float32 (``e4m3(amax / 6 / global) * global``).
        out_dtype: output dtype (default ``blocks.dtype``).

    Returns:
        Tensor of ``blocks``' shape in ``out_dtype``.

    Raises:
        ValueError: ``block_scale`` does not have one value per block.
    """
    if blocks.dim() != 2 or block_scale.numel() != blocks.shape[0]:
        raise ValueError(
            f"blocks of shape {tuple(blocks.shape)} need one scale per row; got block_scale "
            f"of shape {tuple(block_scale.shape)}"
        )
    x = blocks.float()
    scale = block_scale.reshape(-1, 1).float()
    zero = scale == 0
    safe = torch.where(zero | ~torch.isfinite(scale), torch.ones_like(scale), scale)
    codes = _e2m1_magnitude_codes(x.abs() / safe)
    rescaled = _E2M1_MAGNITUDES.to(x.device)[codes.int()] * safe
    out = torch.where(x >= 0, rescaled, -rescaled)
    out = torch.where(zero, torch.zeros_like(out), out)
    return out.to(out_dtype or blocks.dtype)

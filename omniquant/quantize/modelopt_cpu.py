"""modelopt's NVFP4 fake quant on the CPU, with omniquant's numerics (a narrow, documented patch).

Why: modelopt 0.47 fake-quantizes NVFP4 on CUDA only. Its two NVFP4 paths are

- dynamic block scales (input quantizers, ``type: dynamic`` weights):
  ``tensor_quant._dynamic_block_quantize_impl`` asserts ``amax.is_cuda`` and then runs the
  Triton ``fp4_fake_quant_block`` kernel or the CUDA extension;
- static block scales (``NVFP4StaticQuantizer``, what ``mse``, ``local_hessian``, ``gptq``
  and Four-Over-Six calibrate): ``StaticBlockwiseFP4FakeQuantFunction`` raises without
  Triton, which needs CUDA.

``max`` calibration never fake-quantizes (it only records amax), which is why omniquant
could calibrate NVFP4 on the CPU with ``max`` alone. Every other algorithm quantizes
during calibration (MSE sweeps, GPTQ column updates, AWQ searches), so on the CPU they
fail at the first NVFP4 forward.

What: while :func:`cpu_nvfp4_fake_quant` is active, the two names
``modelopt.torch.quantization.nn.modules.tensor_quantizer.dynamic_block_quant`` and
``...static_blockwise_fp4_fake_quant`` (the functions ``TensorQuantizer._fake_quantize``
and ``StaticBlockScaleQuantizer._fake_quantize`` call) are wrapped: a CPU tensor in NVFP4
(E2M1 values, E4M3 scales) goes to ``omniquant.numerics`` (bit-exact to modelopt's
kernels, see ``omniquant/numerics/nvfp4.py``); anything else (CUDA tensors, other
formats) goes to modelopt's own function unchanged. The per-block scale of the static
path is computed with modelopt's own CPU ``scaled_e4m3_impl``, as its kernel wrapper
(``compute_fp4_scales``) does. modelopt's algorithms run unmodified on top.

Why not modelopt's backend registry (``register_quant_backend`` + ``backend:`` in the
quantizer config): a quantizer with a ``backend`` leaves modelopt's own NVFP4 paths.
``mse`` with ``fp8_scale_sweep`` then needs a separately registered sweep calibrator,
``local_hessian`` skips such quantizers ("backend does not support a custom error
function"), GPTQ picks a backend helper, and the export's static-scale path keys on
``is_nvfp4_static``. Patching the fake-quant function below all of them keeps every
algorithm's own code path, on the CPU exactly as on the GPU.

The patch is process-wide while active (a context manager, re-entrant), restored on
exit, and refused for a modelopt whose module layout it does not know.
"""

from __future__ import annotations

import contextlib
import threading

import torch

#: The modelopt module whose two names are wrapped.
_TQ_MODULE = "modelopt.torch.quantization.nn.modules.tensor_quantizer"
_E2M1 = (2, 1)
_E4M3 = (4, 3)
_lock = threading.Lock()
_depth = 0
_saved: dict[str, object] = {}


def _is_cpu(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _static_fp4(original):
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl
    from modelopt.torch.quantization.utils.numeric_utils import E4M3_MAX

    from omniquant.numerics import fake_quant_nvfp4_blocks

    def static_blockwise_fp4_fake_quant(
        x, amax, global_amax=None, quantize_block_scales=True,
        fp8_max_for_normalization=E4M3_MAX, out_dtype=None, pass_through_bwd=False,
    ):  # fmt: skip
        if not _is_cpu(x):
            return original(
                x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization,
                out_dtype, pass_through_bwd,
            )  # fmt: skip
        n_blocks = amax.numel()
        if x.numel() % n_blocks:
            raise ValueError(
                f"x of shape {tuple(x.shape)} is not a whole number of blocks for "
                f"{n_blocks} per-block amax values"
            )
        # modelopt's compute_fp4_scales (kernels/quantization/gemm/fp4_kernel.py), whose
        # module imports Triton: scale = amax / 6, E4M3-rounded under the global amax.
        scale = amax.float() / 6.0
        if quantize_block_scales:
            g = amax.float().amax() if global_amax is None else global_amax.float()
            scale = scaled_e4m3_impl(scale, g * (E4M3_MAX / fp8_max_for_normalization) / 6.0)
        blocks = x.reshape(n_blocks, x.numel() // n_blocks)
        out = fake_quant_nvfp4_blocks(blocks, scale, out_dtype or x.dtype)
        return out.reshape(x.shape)

    return static_blockwise_fp4_fake_quant


def _dynamic_fp4(original):
    from omniquant.numerics import E2M1_MAX, E4M3_MAX, fake_quant_nvfp4_activation

    def dynamic_block_quant(inputs, block_size, amax, bias, num_bits, scale_bits, *rest):
        if not (_is_cpu(inputs) and num_bits == _E2M1 and tuple(scale_bits or ()) == _E4M3):
            return original(inputs, block_size, amax, bias, num_bits, scale_bits, *rest)
        if amax is None:
            raise ValueError("NVFP4 dynamic block fake quant needs a calibrated amax (got None)")
        # modelopt takes the tensor-wide amax of a per-block amax (tensor_quant.py).
        global_scale = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
        if bias is not None:
            raise NotImplementedError("NVFP4 fake quant with a bias is not supported on the CPU")
        return fake_quant_nvfp4_activation(inputs, global_scale, block_size=int(block_size))

    return dynamic_block_quant


@contextlib.contextmanager
def cpu_nvfp4_fake_quant():
    """Route modelopt's NVFP4 fake quant of CPU tensors through ``omniquant.numerics``.

    Raises:
        RuntimeError: the installed modelopt lacks the two functions this wraps (a version
            whose layout differs from 0.47's): nothing is patched.
    """
    global _depth
    import importlib

    tq = importlib.import_module(_TQ_MODULE)
    names = {"dynamic_block_quant": _dynamic_fp4, "static_blockwise_fp4_fake_quant": _static_fp4}
    missing = [n for n in names if not hasattr(tq, n)]
    if missing:
        raise RuntimeError(
            f"modelopt's {_TQ_MODULE} has no {', '.join(missing)}: the CPU NVFP4 fake-quant "
            "patch was written against modelopt 0.47; use algorithm: max on the CPU"
        )
    with _lock:
        if _depth == 0:
            for name, wrap in names.items():
                _saved[name] = getattr(tq, name)
                setattr(tq, name, wrap(_saved[name]))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, fn in _saved.items():
                    setattr(tq, name, fn)
                _saved.clear()

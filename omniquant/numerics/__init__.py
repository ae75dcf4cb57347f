"""Serving numerics for FP8 and NVFP4 checkpoints, in pure torch (CPU or any device).

Policy: evaluate an exported checkpoint by computing what the serving engine computes
from its stored bytes and scales. We do not call modelopt here because modelopt's NVFP4
fake-quant forward needs CUDA and omniquant evaluates on CPU; the tests pin these
functions bit for bit to modelopt 0.47 where modelopt runs on CPU.
"""

from __future__ import annotations

from omniquant.numerics.activations import fp8_activation_quantizer, nvfp4_activation_quantizer
from omniquant.numerics.fp8 import (
    E4M3_MAX,
    dequantize_fp8,
    fake_quant_fp8,
    quantize_fp8,
)
from omniquant.numerics.nvfp4 import (
    E2M1_MAX,
    E2M1_VALUES,
    dequantize_nvfp4,
    fake_quant_nvfp4_activation,
    fake_quant_nvfp4_blocks,
    pack_e2m1,
    quantize_nvfp4,
    unpack_e2m1,
)

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "fake_quant_fp8",
    "fake_quant_nvfp4_activation",
    "fake_quant_nvfp4_blocks",
    "fp8_activation_quantizer",
    "nvfp4_activation_quantizer",
    "pack_e2m1",
    "quantize_fp8",
    "quantize_nvfp4",
    "unpack_e2m1",
]

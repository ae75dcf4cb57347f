"""CPU cost of the serving-numerics emulation (pytest-benchmark; run with --benchmark-enable).

Shapes are one Nemotron-3-Nano-sized expert GEMM (hidden 2688, expert width 1856) and a
256-token activation, small enough for a shared 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

from omniquant.numerics import (
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quant_fp8,
    fake_quant_nvfp4_activation,
    quantize_fp8,
    quantize_nvfp4,
)

HIDDEN, EXPERT, TOKENS = 2688, 1856, 256


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(EXPERT, HIDDEN, generator=torch.Generator().manual_seed(0)).bfloat16()


@pytest.fixture(scope="module")
def activation() -> torch.Tensor:
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1)).bfloat16()


def test_bench_quantize_nvfp4(benchmark, weight):
    benchmark(quantize_nvfp4, weight)


def test_bench_dequantize_nvfp4(benchmark, weight):
    packed, scales, global_scale = quantize_nvfp4(weight)
    benchmark(dequantize_nvfp4, packed, scales, global_scale)


def test_bench_fake_quant_nvfp4_activation(benchmark, activation):
    global_scale = activation.float().abs().max() / (6 * 448)
    benchmark(fake_quant_nvfp4_activation, activation, global_scale)


def test_bench_dequantize_fp8(benchmark, weight):
    scale = weight.float().abs().max() / 448
    benchmark(dequantize_fp8, quantize_fp8(weight, scale), scale)


def test_bench_fake_quant_fp8(benchmark, activation):
    benchmark(fake_quant_fp8, activation, activation.float().abs().max() / 448)

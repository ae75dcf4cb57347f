"""Activation quantizers built once per stored scale, for evaluation's thousands of calls.

Policy: the emulated loader quantizes every quantized GEMM input of every forward under a
fixed stored scale. On evaluation's small activations (tens of rows) the cost of a call is
the number of dispatched torch ops, not arithmetic, so each quantizer precomputes, at its
first call per input dtype and device, everything that depends only on its scale, and a
call is a few lookups:

- FP8 on a 16-bit input: ``fake_quant_fp8`` of each of the 65,536 bit patterns (a 128 KiB
  table computed with that function's ops), one gather per call. float32 inputs, and
  inputs the table cannot serve (0-d, strided, needing autograd), take its arithmetic.
- NVFP4: a block's scale is a step function of its amax that never decreases (amax, then
  a division by ``6 * global_scale``, a clamp and an E4M3 rounding, each monotone), so the
  amax's bit pattern (monotone in the value for non-negative floats, NaN above inf) picks
  it with one ``bucketize`` over 127 thresholds found by bisection with those same ops,
  and one gather of the finished scale (``* global_scale``, the 1e-5 floor applied).
  The E2M1 rounding of ``x / scale`` is the class-table lookup of
  ``omniquant.numerics.nvfp4``. Autograd falls back to the direct formula.

Both are equal bit for bit to ``fake_quant_fp8`` and ``fake_quant_nvfp4_activation`` on
every input, special values included (``tests/test_numerics_fast_paths.py``). Written here,
not taken from a library: torch has no fused NVFP4 fake quant for CPU, and
``torch.compile`` needs a compiler at run time and may reorder float operations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from omniquant.numerics.fp8 import E4M3_MAX, _as_scale, _check_high_precision
from omniquant.numerics.nvfp4 import (
    _ACTIVATION_MIN_BLOCK_SCALE,
    _VALUE_TABLE,
    E2M1_MAX,
    _check_block_size,
    _check_last_dim,
    _fake_quant_nvfp4_fast,
)

__all__ = ["fp8_activation_quantizer", "nvfp4_activation_quantizer"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
#: Largest finite ``float8_e4m3fn`` code (448.0).
_E4M3_MAX_CODE = 0x7E


def fp8_activation_quantizer(scale: torch.Tensor | float):
    """``x -> fake_quant_fp8(x, scale)``, the scale checked once (not per call).

    The emulated loader installs one per quantized GEMM input and KV projection. A 16-bit
    input is quantized by one gather from a table of every bit pattern's result, built on
    the first call for that dtype and device.

    Raises:
        ValueError: an invalid ``scale`` (as :func:`fake_quant_fp8`).
    """
    checked = _as_scale(scale, torch.empty(1), "scale")
    scales = {checked.device: checked}
    tables: dict = {}

    def table(dtype, device) -> torch.Tensor:
        # Entry i: the result for the input whose bits, read as uint16, are i.
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        tables[dtype, device] = _fp8_fake_quant(every.to(device), scales[device])
        return tables[dtype, device]

    def quantize(x: torch.Tensor) -> torch.Tensor:
        _check_high_precision(x, "x")
        if x.device not in scales:
            scales[x.device] = checked.to(x.device)
        if (
            x.dtype is torch.float32
            or x.dim() == 0
            or not x.is_contiguous()
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return _fp8_fake_quant(x, scales[x.device])
        lookup = tables.get((x.dtype, x.device))
        if lookup is None:
            lookup = table(x.dtype, x.device)
        index = x.view(torch.uint16).to(torch.int32).view(-1)
        return lookup.index_select(0, index).view(x.shape)

    return quantize


def _fp8_fake_quant(x: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """``fake_quant_fp8``'s arithmetic on a checked scale."""
    q = (x.float() / scale_f32).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale_f32).to(x.dtype)


def nvfp4_activation_quantizer(global_scale: torch.Tensor | float, block_size: int = 16):
    """``x -> fake_quant_nvfp4_activation(x, global_scale, block_size)``, by lookups.

    The emulated loader installs one per quantized GEMM input. The block-scale thresholds
    and scales (see the module docstring) are built on the first call per dtype and device.

    Raises:
        ValueError: an invalid ``global_scale`` (as ``fake_quant_nvfp4_activation``).
    """
    _check_block_size(block_size)
    scale = _as_scale(global_scale, torch.empty(1, 1), "global_scale").reshape(())
    per_key: dict = {}

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _FLOAT_DTYPES:
            _check_high_precision(x, "x")
        if x.dim() == 0 or x.shape[-1] % block_size:
            _check_last_dim(x, "x", block_size)
        consts = per_key.get((x.dtype, x.device))
        if consts is None:
            consts = per_key[x.dtype, x.device] = _nvfp4_tables(scale, x.dtype, x.device)
        if x.requires_grad and torch.is_grad_enabled():
            g = consts.global_scale
            return _fake_quant_nvfp4_fast(
                x, g, (E2M1_MAX * g).reshape(1), consts.values, block_size
            )
        return _nvfp4_by_lookup(x, consts, block_size)

    return quantize


class _NVFP4Tables(NamedTuple):
    """What an NVFP4 activation quantizer precomputes per input dtype and device. The
    integer constants are 0-d tensors: a Python int argument costs a scalar tensor per op."""

    sign_mask: torch.Tensor  # clears the sign bit: the bits of |x|
    thresholds: torch.Tensor
    global_scale: torch.Tensor
    block_scales: torch.Tensor
    values: torch.Tensor  # E2M1 value per float32 rounding class (nvfp4._VALUE_TABLE)
    shift: torch.Tensor  # 20: sign, exponent and top three mantissa bits
    class_mask: torch.Tensor  # 0xFFE: drops the third mantissa bit (the "exact" slot)
    low_mask: torch.Tensor  # 0x1FFFFF: the bits below the class


def _nvfp4_tables(global_scale: torch.Tensor, dtype: torch.dtype, device) -> _NVFP4Tables:
    """The tables for ``dtype`` inputs on ``device``.

    ``bucketize(amax_bits, thresholds, right=True)`` is the E4M3 code of the clamped
    ``amax / (6 * global_scale)``: threshold ``c - 1`` is the smallest non-negative bit
    pattern whose code reaches ``c``, found by bisection with the direct formula's ops;
    the last threshold, just above inf, sends NaN to the final entry (scale 1.0, as the
    direct formula's ``NaN >= 1e-5`` test gives).
    """
    bits_view = _BITS_VIEW[dtype]
    inf_bits = int(torch.tensor(float("inf"), dtype=dtype).view(bits_view))
    denominator = (E2M1_MAX * global_scale).reshape(1)

    def code(patterns: torch.Tensor) -> torch.Tensor:
        amax = patterns.to(bits_view).view(dtype)
        scale = torch.div(amax, denominator).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
        return scale.view(torch.uint8).to(torch.int64)

    targets = torch.arange(1, _E4M3_MAX_CODE + 1, dtype=torch.int64)
    low = torch.zeros_like(targets)
    high = torch.full_like(targets, inf_bits)  # inf clamps to 448: every code is reached
    while bool((low < high).any()):
        mid = (low + high) // 2
        reached = code(mid) >= targets
        high = torch.where(reached, mid, high)
        low = torch.where(reached, low, mid + 1)
    thresholds = torch.cat([low, torch.tensor([inf_bits + 1])]).to(bits_view)
    e4m3 = torch.arange(0, _E4M3_MAX_CODE + 1, dtype=torch.uint8).view(torch.float8_e4m3fn)
    block = e4m3.float().mul_(global_scale)
    block = torch.where(block >= _ACTIVATION_MIN_BLOCK_SCALE, block, 1.0)
    block_scales = torch.cat([block, torch.ones(1)])
    width = torch.finfo(dtype).bits
    return _NVFP4Tables(
        sign_mask=torch.tensor((1 << (width - 1)) - 1, dtype=bits_view, device=device),
        thresholds=thresholds.to(device),
        global_scale=global_scale.to(device),
        block_scales=block_scales.to(device),
        values=_VALUE_TABLE.to(device),
        shift=torch.tensor(20, dtype=torch.int32, device=device),
        class_mask=torch.tensor(0xFFE, dtype=torch.int32, device=device),
        low_mask=torch.tensor(0x1FFFFF, dtype=torch.int32, device=device),
    )


def _nvfp4_by_lookup(x: torch.Tensor, t: _NVFP4Tables, block_size: int) -> torch.Tensor:
    """The activation fake quant on a checked ``x``: block amax on the bit patterns of
    ``|x|``, block scale by ``bucketize`` + ``take``, E2M1 value by the class table
    (``nvfp4._class_index``: bits 31..21, and bit 20 set where bits 20..0 are zero), and
    the float32 product rounded once into ``x``'s dtype (as the direct formula)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    magnitude = torch.bitwise_and(blocks.view(t.sign_mask.dtype), t.sign_mask)
    amax_bits = magnitude.max(dim=-1, keepdim=True)[0]
    scale = torch.take(t.block_scales, torch.bucketize(amax_bits, t.thresholds, right=True))
    bits = torch.div(blocks, scale).view(torch.int32)
    index = torch.bitwise_right_shift(bits, t.shift).bitwise_and_(t.class_mask)
    index.bitwise_or_(torch.logical_not(bits.bitwise_and_(t.low_mask)))  # bits: a temporary
    rounded = t.values.index_select(0, index.view(-1)).view(blocks.shape)
    out = torch.empty(blocks.shape, dtype=x.dtype, device=x.device)
    return torch.mul(rounded, scale, out=out).view(x.shape)

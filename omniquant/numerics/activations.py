"""Activation quantizers built once per stored scale, for evaluation's thousands of calls.

Policy: the emulated loader quantizes every quantized GEMM input of every forward under a
fixed stored scale. On evaluation's small activations (tens of rows) the cost of a call is
the number of dispatched torch ops, not arithmetic, so each quantizer precomputes, at its
first call per input dtype and device, everything that depends only on its scale, and a
call is a few lookups:

- FP8 on a 16-bit input: ``fake_quant_fp8`` of each of the 65,536 bit patterns (a 128 KiB
  table computed with that function's ops), one gather per call. float32 inputs, and
  inputs the table cannot serve (0-d, strided, needing autograd), take its arithmetic.
- NVFP4 on a 16-bit input: a block's scale depends only on its amax, whose bit pattern
  (that of ``max |x|``) indexes a table of the direct formula's block scale for each of
  the 32,768 patterns, one gather per call; the E2M1 rounding of ``x / scale`` is the
  class-table lookup of ``omniquant.numerics.nvfp4``. float32 inputs and autograd take
  the direct formula (``_fake_quant_nvfp4_fast``).

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

    The emulated loader installs one per quantized GEMM input. A 16-bit input's block
    scales come from a table built on the first call per dtype and device (see the module
    docstring); float32 inputs and inputs needing autograd take the direct formula.

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
        tables = per_key.get((x.dtype, x.device))
        if tables is None:
            tables = per_key[x.dtype, x.device] = _nvfp4_tables(scale, x.dtype, x.device)
        if x.dtype is torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            g = tables.global_scale
            return _fake_quant_nvfp4_fast(
                x, g, (E2M1_MAX * g).reshape(1), tables.values, block_size
            )
        return _nvfp4_by_lookup(x, tables, block_size)

    return quantize


class _NVFP4Tables(NamedTuple):
    """What an NVFP4 activation quantizer precomputes per input dtype and device. The
    integer constants are tensors: a Python int argument costs a scalar tensor per op."""

    block_scales: torch.Tensor | None  # per bit pattern of |x| (16-bit dtypes)
    sign_mask: torch.Tensor  # int16 [1]: the bits of |x|
    global_scale: torch.Tensor
    values: torch.Tensor  # E2M1 value per float32 rounding class (nvfp4._VALUE_TABLE)
    shift: torch.Tensor  # 20: sign, exponent and top three mantissa bits
    class_mask: torch.Tensor  # 0xFFE: drops the third mantissa bit (the "exact" slot)
    low_mask: torch.Tensor  # 0x1FFFFF: the bits below the class


def _nvfp4_tables(global_scale: torch.Tensor, dtype: torch.dtype, device) -> _NVFP4Tables:
    """The tables for ``dtype`` inputs on ``device``.

    ``block_scales[p]``: the direct formula's block scale for a block whose amax has the bit
    pattern ``p`` (every one of the 32,768 non-negative 16-bit patterns, NaNs included),
    computed with that formula's ops: ``e4m3(min(amax / (6 * g), 448)) * g``, 1.0 below
    1e-5 (and for NaN, which fails ``>= 1e-5``). ``None`` for float32 (direct formula).
    """
    block_scales = None
    if dtype is not torch.float32:
        patterns = torch.arange(1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        denominator = (E2M1_MAX * global_scale).reshape(1)
        block = torch.div(patterns, denominator).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
        block = block.float().mul_(global_scale)
        block_scales = torch.where(block >= _ACTIVATION_MIN_BLOCK_SCALE, block, 1.0).to(device)
    ints = {"dtype": torch.int32, "device": device}
    return _NVFP4Tables(
        block_scales=block_scales,
        sign_mask=torch.tensor([0x7FFF], dtype=torch.int16, device=device),
        global_scale=global_scale.to(device),
        values=_VALUE_TABLE.to(device),
        shift=torch.tensor(20, **ints),
        class_mask=torch.tensor(0xFFE, **ints),
        low_mask=torch.tensor(0x1FFFFF, **ints),
    )


def _nvfp4_by_lookup(x: torch.Tensor, t: _NVFP4Tables, block_size: int) -> torch.Tensor:
    """The activation fake quant on a checked 16-bit ``x``: block amax on the bit patterns
    of ``|x|`` (an int16 mask, each block's max widened to an int32 index), block scale by
    one gather, E2M1 value by the class table (``nvfp4._class_index``: bits 31..21, and
    bit 20 set where bits 20..0 are zero), and the float32 product rounded once into
    ``x``'s dtype (as the direct formula). Measured on its block-amax line: the int16 mask
    and ``amax`` took 0.24-0.27 ms against 0.73-0.80 ms for an int32 mask and ``max`` on a
    300 x 2688 input. Few distinct ops: between the model's GEMMs each op runs cold, and on
    the demo eval dropping ``bucketize`` + ``take`` for this gather took a call from 85 to
    72 us, where a loop over the same inputs showed no difference."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    # |x|'s bits in int16 (an int32 mask would first cast every element to int32), the
    # block max without argmax indices, and only the per-block result widened to an index.
    magnitude = torch.bitwise_and(blocks.view(torch.int16), t.sign_mask)
    amax_bits = torch.amax(magnitude, dim=-1, keepdim=True).to(torch.int32)
    scale = t.block_scales.index_select(0, amax_bits.view(-1)).view(amax_bits.shape)
    bits = torch.div(blocks, scale).view(torch.int32)
    index = torch.bitwise_right_shift(bits, t.shift).bitwise_and_(t.class_mask)
    index.bitwise_or_(torch.logical_not(bits.bitwise_and_(t.low_mask)))  # bits: a temporary
    rounded = t.values.index_select(0, index.view(-1)).view(blocks.shape)
    return rounded.mul_(scale).to(x.dtype).view(x.shape)

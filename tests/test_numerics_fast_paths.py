"""The fast activation quantizers compute, bit for bit, the step-by-step formulas.

The emulated loader calls an activation quantizer on every quantized GEMM input of
every forward, so ``omniquant.numerics`` computes it in few passes (one min/max
reduction, one ``bucketize`` to signed E2M1 values) and checks the stored scale once
(``nvfp4_activation_quantizer``, ``fp8_activation_quantizer``). The reference
implementations below are the former code, kept verbatim as the definition: any
input, special values included, must give the same bits.
"""

from __future__ import annotations

import pytest
import torch

from omniquant.numerics import (
    fake_quant_fp8,
    fake_quant_nvfp4_activation,
    fp8_activation_quantizer,
    nvfp4_activation_quantizer,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _reference_codes(a: torch.Tensor) -> torch.Tensor:
    codes = (a > 0.25).to(torch.uint8)
    codes += a >= 0.75
    codes += a > 1.25
    codes += a >= 1.75
    codes += a > 2.5
    codes += a >= 3.5
    codes += a > 5.0
    return codes


def reference_nvfp4_activation(x: torch.Tensor, global_scale: float, block_size: int = 16):
    """omniquant 0.x's ``fake_quant_nvfp4_activation`` before the fast path, step by step."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size).float()
    scaled = blocks.abs()
    block_amax = scaled.amax(dim=-1, keepdim=True)
    g = torch.tensor(global_scale, dtype=torch.float32)
    scale = (block_amax / (6.0 * g)).clamp_(max=448.0)
    scale = scale.to(torch.float8_e4m3fn).float() * g
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    codes = _reference_codes(scaled.div_(scale))
    rescaled = _MAGNITUDES[codes.int()].mul_(scale)
    out = torch.where(blocks >= 0, rescaled, rescaled.neg())
    return out.reshape(x.shape).to(x.dtype)


def reference_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    q = (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _adversarial(dtype: torch.dtype, global_scale: float) -> torch.Tensor:
    """Random blocks at many magnitudes, exact E2M1 ties, signed zeros, subnormals,
    blocks under the 1e-5 scale floor, and inf / NaN elements."""
    gen = torch.Generator().manual_seed(11)
    rows = [
        torch.randn(64, 64, generator=gen) * 10.0 ** torch.randint(-8, 5, (64, 1), generator=gen)
    ]
    # Ties: block amax 6 * s with s an exact E4M3 step, the other elements on tie points.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, -0.25, -0.75, -1.25,
                         -1.75, -2.5, -3.5, -5.0, 6.0])  # fmt: skip
    for s in (1.0, 0.5, 1.5, 3.0):
        rows.append((ties * s * global_scale * 448.0 / 448.0).repeat(1, 4))
        rows.append((ties * s).repeat(1, 4))
    special = torch.zeros(8, 64)
    special[0, :16] = -0.0
    special[1, :16] = torch.tensor([-1e-40, 1e-40, -0.0, 0.0] * 4)
    special[2, 16:32] = 1e-7  # scale below the floor -> 1.0
    special[3, :16] = float("inf")
    special[3, 16] = float("-inf")
    special[4, 3] = float("nan")
    special[4, :3] = torch.tensor([1.0, -2.0, 0.1])
    special[5, 32:48] = torch.linspace(-7.0, 7.0, 16)
    special[6, :] = 3e38
    special[7, 48:] = -1e-30
    rows.append(special)
    x = torch.cat([r.reshape(-1, 64) for r in rows])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("global_scale", [2.0**-6, 1e-3, 0.37, 2.0**-20])
def test_nvfp4_activation_fast_path_is_the_reference_bit_for_bit(dtype, global_scale):
    x = _adversarial(dtype, global_scale)
    want = reference_nvfp4_activation(x, global_scale)
    assert torch.equal(bits(fake_quant_nvfp4_activation(x, global_scale)), bits(want))
    quantizer = nvfp4_activation_quantizer(torch.tensor(global_scale))
    assert torch.equal(bits(quantizer(x)), bits(want))
    # Leading dimensions (batch, tokens) do not matter.
    x3 = x.reshape(2, -1, 64)
    assert torch.equal(bits(quantizer(x3)), bits(want.reshape(2, -1, 64)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", [2.0**-6, 1e-3, 0.37])
def test_fp8_activation_quantizer_is_the_reference_bit_for_bit(dtype, scale):
    x = _adversarial(dtype, scale)
    x = x[torch.isfinite(x.float()).all(dim=-1)]  # NaN stays NaN in both; compare finite rows
    want = reference_fp8(x, scale)
    assert torch.equal(bits(fake_quant_fp8(x, scale)), bits(want))
    assert torch.equal(bits(fp8_activation_quantizer(torch.tensor([scale]))(x)), bits(want))


def test_quantizers_check_their_scale_once_at_construction():
    with pytest.raises(ValueError, match=r"global_scale of shape \(1,\) must be positive"):
        nvfp4_activation_quantizer(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"scale of shape \(\) must be positive and finite"):
        fp8_activation_quantizer(0.0)
    with pytest.raises(ValueError, match=r"does not broadcast"):
        nvfp4_activation_quantizer(torch.ones(3))
    q = nvfp4_activation_quantizer(0.01)
    with pytest.raises(ValueError, match="not divisible by the NVFP4 block size 16"):
        q(torch.randn(2, 24))
    with pytest.raises(ValueError, match="expected one of torch.float32"):
        fp8_activation_quantizer(0.01)(torch.zeros(3, dtype=torch.int32))


def _every_class_and_neighbours() -> torch.Tensor:
    """A float32 value in each rounding class of the tables, the class edges' neighbours,
    and random values over the whole float32 range (NaN, inf and signed zeros included)."""
    from omniquant.numerics.nvfp4 import _REPRESENTATIVES

    reps = _REPRESENTATIVES.clone()
    up = torch.nextafter(reps, torch.tensor(float("inf")))
    down = torch.nextafter(reps, torch.tensor(float("-inf")))
    rand_bits = torch.randint(
        -(2**31), 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(3)
    )
    return torch.cat([reps, up, down, rand_bits.to(torch.int32).view(torch.float32)])


def test_value_table_rounds_every_class_as_the_reference():
    from omniquant.numerics.nvfp4 import _VALUE_TABLE, _class_index

    v = _every_class_and_neighbours()
    mags = _MAGNITUDES[_reference_codes(v.abs()).int()]
    want = torch.where(v >= 0, mags, mags.neg())
    assert torch.equal(bits(_VALUE_TABLE[_class_index(v.view(torch.int32))]), bits(want))


def test_e2m1_codes_equal_modelopts_cast_for_every_class():
    nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    from omniquant.numerics.nvfp4 import e2m1_codes

    v = _every_class_and_neighbours()
    assert torch.equal(e2m1_codes(v), nvfp4_tensor.NVFP4QTensor._cast_fp4(v.clone()))


def test_e2m1_codes_chunked_path_equals_modelopts_cast():
    """Above _CODES_CHUNK elements e2m1_codes runs chunk by chunk (the export's large
    weights): same codes as modelopt's function across chunk boundaries and a ragged tail."""
    nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    from omniquant.numerics import nvfp4

    g = torch.Generator().manual_seed(3)
    n = 2 * nvfp4._CODES_CHUNK + 4099
    v = torch.randn(3, n, generator=g) * 4
    v.view(-1)[:: 1013] = torch.tensor(0.25)  # ties on chunk-spread positions
    v.view(-1)[5 :: 2039] = torch.tensor(-2.5)
    got = nvfp4.e2m1_codes(v)
    assert got.shape == v.shape and got.dtype == torch.uint8
    assert torch.equal(got, nvfp4_tensor.NVFP4QTensor._cast_fp4(v.clone()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_export_block_amax_equals_modelopts_reduce_block_amax(dtype):
    """The export's chunked per-block amax (quantize/packing.py) gives modelopt's bits: zeros,
    -0.0, inf, more blocks than one chunk, and a NaN block (handed back to modelopt)."""
    core = pytest.importorskip("modelopt.torch.quantization.utils.core_utils")
    from omniquant.quantize import packing

    ours = packing._last_dim_block_amax(core.reduce_block_amax)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 2 * packing._AMAX_CHUNK_BLOCKS // 7 + 5, 112, generator=g) * 3).to(dtype)
    x[1, 1, :16] = 0
    x[0, 3, :16] = -0.0
    x[1, 1, 17] = -0.0
    x[2, 2, 5] = float("inf")
    with_nan = x.clone()
    with_nan[0, 0, 3] = float("nan")
    for case in (x, with_nan):
        assert torch.equal(bits(ours(case, {-1: 16})), bits(core.reduce_block_amax(case, {-1: 16})))


def test_e2m1_codes_into_caller_buffers_equal_the_fresh_ones():
    """``out=`` and a reused ``work`` dict (the export's NVFP4 slices) give the same codes as
    a plain call, below and above one chunk, and refuse an ``out`` of the wrong kind."""
    from omniquant.numerics import nvfp4

    g = torch.Generator().manual_seed(11)
    work: dict = {}
    for n in (37, nvfp4._CODES_CHUNK + 999):
        v = torch.randn(n, generator=g) * 5
        out = torch.empty(n, dtype=torch.uint8)
        got = nvfp4.e2m1_codes(v, out=out, work=work)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, nvfp4.e2m1_codes(v))
    with pytest.raises(ValueError, match="uint8"):
        nvfp4.e2m1_codes(torch.zeros(4), out=torch.empty(4, dtype=torch.int32))


@pytest.mark.parametrize("slice_elements", [1 << 23, 4096, 33])
def test_export_nvfp4_packing_by_slices_is_modelopts_bytes(monkeypatch, slice_elements):
    """The export's NVFP4 packing (quantize/packing.py ``_nvfp4_sliced``: slices of rows or
    experts into reused buffers) gives modelopt's ``to_quantized_weight`` bytes for plain and
    stacked-expert weights, zeros and ties included, whatever the slice size; a shape it was
    not written for is handed to modelopt."""
    quant_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
    from modelopt.torch.export.model_config import QUANTIZATION_NVFP4
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from omniquant.quantize import packing

    monkeypatch.setattr(packing, "_NVFP4_SLICE_ELEMENTS", slice_elements)
    g = torch.Generator().manual_seed(2)
    scratch: dict = {}
    for shape in [(96, 256), (4, 40, 64), (1, 32), (3, 7, 48)]:
        w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        w.view(-1)[::89] = 0
        w.view(-1)[7::101] = -0.0
        if len(shape) == 3:
            gs = torch.rand(shape[0], generator=g) * 1e-3 + 1e-4
            bs = NVFP4QTensor.get_weights_scaling_factor(w, 16, gs.view(-1, 1, 1))[0]
        else:
            gs = torch.tensor(3e-4)
            bs = NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)[0]
        want = quant_utils.to_quantized_weight(w, bs, QUANTIZATION_NVFP4, gs, 16)
        got = packing._nvfp4_sliced(
            quant_utils.to_quantized_weight, w, bs, QUANTIZATION_NVFP4, gs, 16, scratch
        )
        assert got.dtype == want.dtype and torch.equal(got, want), shape
    handed = []

    def orig(*args):
        handed.append(args)
        return "modelopt's"

    odd = torch.zeros(4, 24, dtype=torch.bfloat16)  # 24 is no whole number of byte pairs of blocks
    assert packing._nvfp4_sliced(orig, odd, torch.ones(4, 1), QUANTIZATION_NVFP4, gs, 16, {}) == "modelopt's"
    assert len(handed) == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantizers_paths_outside_the_lookups_give_the_same_bits(dtype):
    """The lookup quantizers (``omniquant.numerics.activations``) hand strided inputs and
    inputs needing autograd to the direct formulas; every path gives the reference bits."""
    x = _adversarial(dtype, 1e-3)
    finite = x[torch.isfinite(x.float()).all(dim=-1)]
    nvfp4, fp8 = nvfp4_activation_quantizer(1e-3), fp8_activation_quantizer(1e-3)
    strided = torch.stack([x, x], dim=-1)[..., 0]  # x's values, every other element
    assert not strided.is_contiguous()
    assert torch.equal(bits(nvfp4(strided)), bits(reference_nvfp4_activation(x, 1e-3)))
    assert torch.equal(bits(fp8(finite.t())), bits(reference_fp8(finite, 1e-3).t()))
    grad_x = finite.float().requires_grad_() if dtype == torch.float32 else None
    if grad_x is not None:
        assert torch.equal(
            bits(nvfp4(grad_x).detach()), bits(reference_nvfp4_activation(finite, 1e-3))
        )
        assert torch.equal(bits(fp8(grad_x).detach()), bits(reference_fp8(finite, 1e-3)))
    # A second dtype on the same quantizer builds its own tables.
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    y = finite.to(other)
    assert torch.equal(bits(nvfp4(y)), bits(reference_nvfp4_activation(y, 1e-3)))
    assert torch.equal(bits(fp8(y)), bits(reference_fp8(y, 1e-3)))


def test_export_block_scales_are_computed_once_per_weight_and_only_for_an_exact_repeat():
    """Inside ``fast_packing`` a weight's NVFP4 block scales are computed once: the repeat
    modelopt's exporter makes (same weight, block size and global scale) gets a copy of the
    first result, equal to what modelopt computes; a weight written in between, another
    global scale, another view or another weight is computed afresh."""
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from omniquant.quantize import packing

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(64, 128, generator=g) * 0.05).to(torch.bfloat16)
    gs = torch.tensor(2e-4)
    want = NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)[0]
    calls = []
    modelopts = NVFP4QTensor.__dict__["get_weights_scaling_factor"].__func__
    with packing.fast_packing():
        once = NVFP4QTensor.__dict__["get_weights_scaling_factor"].__func__
        inner = once.original

        def counting(*args):
            calls.append(args[1])
            return inner(*args)

        once.original = counting
        first = NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)[0]
        second = NVFP4QTensor.get_weights_scaling_factor(w, block_size=16, weights_scaling_factor_2=gs.clone())[0]
        assert len(calls) == 1 and once.hits == 1
        assert torch.equal(first.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(second.view(torch.uint8), want.view(torch.uint8))
        assert second.data_ptr() != first.data_ptr()  # a copy: the caller may keep either

        # Only an exact repeat: each of these is computed.
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs * 2)  # another global scale
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)
        NVFP4QTensor.get_weights_scaling_factor(w[:32], 16, gs)  # another view of the memory
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs.view(1))  # another shape of scale
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)
        w.mul_(3)  # written in place: its version counter moves
        changed = NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)[0]
        assert len(calls) == 9 and once.hits == 1
        w_ref = w.clone()
        assert torch.equal(
            changed.view(torch.uint8),
            inner(NVFP4QTensor, w_ref, 16, gs, False)[0].view(torch.uint8),
        )
        # The packing that follows clears it: the next call computes.
        packing_calls = len(calls)
        import modelopt.torch.export.unified_export_hf as ueh
        from modelopt.torch.export.model_config import QUANTIZATION_NVFP4

        ueh.to_quantized_weight(w, changed, QUANTIZATION_NVFP4, gs, 16)
        NVFP4QTensor.get_weights_scaling_factor(w, 16, gs)
        assert len(calls) == packing_calls + 1 and once.hits == 1
    # Restored on exit (what the memo wraps is the compiled-kernel path, omniquant's own).
    assert NVFP4QTensor.__dict__["get_weights_scaling_factor"].__func__ is modelopts


def test_export_nvfp4_packing_hands_float64_and_other_scale_dtypes_to_modelopt():
    """The sliced NVFP4 packing upcasts into a float32 buffer; a float64 weight (which
    modelopt divides in float64) or a global scale of another dtype goes to modelopt."""
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export.model_config import QUANTIZATION_NVFP4

    from omniquant.quantize import packing

    handed = []

    def orig(*args):
        handed.append(args)
        return "modelopt's"

    bs = torch.ones(4, 2, dtype=torch.float8_e4m3fn)
    for w, gs in [
        (torch.zeros(4, 32, dtype=torch.float64), torch.tensor(1e-3)),
        (torch.zeros(4, 32, dtype=torch.bfloat16), torch.tensor(1e-3, dtype=torch.float64)),
        (torch.zeros(4, 32, dtype=torch.bfloat16), None),
    ]:
        assert packing._nvfp4_sliced(orig, w, bs, QUANTIZATION_NVFP4, gs, 16, {}) == "modelopt's"
    assert len(handed) == 3

"""The export's compiled packing kernels (``omniquant.quantize.kernels``) give the eager
ops' bytes, bit for bit, on every rounding class and edge value; a checkpoint exported
through them keeps its pins; and where they cannot run the export goes on, eagerly."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from omniquant.quantize import kernels, packing

F8 = torch.float8_e4m3fn


@pytest.fixture
def compiled(monkeypatch):
    """Kernels on for every size, with this test's own failure state."""
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernels, "FIXED_SECONDS", -1.0)  # every export pays for them
    monkeypatch.setattr(kernels, "_off", [])
    monkeypatch.delenv("OMNIQUANT_COMPILE", raising=False)
    return kernels


def _run(name, *args):
    out = kernels.run(name, *args, elements=1 << 30)
    assert out is not None, kernels.disabled_reason()
    return out


def test_constants_are_modelopts():
    from modelopt.torch.quantization.utils import numeric_utils as nu

    assert (kernels.E2M1_MAX, kernels.E4M3_MAX) == (nu.E2M1_MAX, nu.E4M3_MAX)


def _every_bf16() -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0**-7, 3.1e-5, 1.7e3])
def test_fp8_kernel_is_the_eager_division_for_every_bf16_value(compiled, scale):
    w = _every_bf16().reshape(256, 256)  # Inf, NaN, subnormals and +-0 included
    s = torch.tensor(scale, dtype=torch.float32)
    got = _run("fp8", w, s)
    want = (w.float() / s).to(F8)
    assert got.dtype == F8 and got.shape == w.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp8_kernel_other_dtypes_and_per_row_scales(compiled, dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 48, generator=g) * 300).to(dtype)
    w[0, :4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")]).to(dtype)
    for s in (torch.tensor(0.9), torch.rand(64, 1, generator=g) + 0.1):
        got = _run("fp8", w, s)
        assert torch.equal(got.view(torch.uint8), (w.float() / s).to(F8).view(torch.uint8))


def _coding_inputs() -> torch.Tensor:
    """Every E2M1 rounding class's representative and its float32 neighbours, the
    boundaries, ties, subnormals, +-0, +-Inf and NaNs of both signs."""
    from omniquant.numerics.nvfp4 import _REPRESENTATIVES

    reps = _REPRESENTATIVES.reshape(-1)
    edges = torch.tensor(
        [0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e-45, -1e-45, 1e-39,
         -1e-39, float("inf"), float("-inf"), float("nan")], dtype=torch.float32)  # fmt: skip
    edges = torch.cat([edges, -edges, (-torch.tensor(float("nan"))).reshape(1)])
    base = torch.cat([reps, edges])
    values = torch.cat([
        base,
        torch.nextafter(base, torch.tensor(float("inf"))),
        torch.nextafter(base, torch.tensor(float("-inf"))),
    ])  # fmt: skip
    pad = (-values.numel()) % 32
    return torch.cat([values, torch.zeros(pad)])


def test_nvfp4_codes_kernel_is_e2m1_codes_for_every_class(compiled):
    from omniquant.numerics.nvfp4 import e2m1_codes

    values = _coding_inputs()
    blocks = values.reshape(-1, 16)
    unit = torch.ones(blocks.shape[0], 1).to(F8)  # q = x / (1.0 * 1.0) = x exactly
    got = _run("nvfp4_codes", blocks, unit, torch.tensor(1.0))
    assert torch.equal(got.reshape(-1), e2m1_codes(values))


def test_nvfp4_codes_kernel_divides_as_the_eager_packing(compiled):
    """Real scales: the quotient is the eager float32 ``blocks / (scale.float() * gs)``."""
    from omniquant.numerics.nvfp4 import e2m1_codes

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(96, 64, generator=g) * 0.02).to(torch.bfloat16)
    blocks = w.view(96, 4, 16)
    block_scale = (torch.rand(96, 4, 1, generator=g) * 3 + 0.01).to(F8)
    gs = torch.tensor(1.3e-3)
    got = _run("nvfp4_codes", blocks, block_scale, gs)
    want = e2m1_codes(blocks.float() / (block_scale.float() * gs))
    assert torch.equal(got, want)


def test_nvfp4_pairs_kernel_packs_odd_codes_high(compiled):
    codes = torch.randint(
        0, 16, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    got = _run("nvfp4_pairs", codes.view(torch.int16))
    assert torch.equal(got, (codes[1::2] << 4) | codes[0::2])


def _modelopt_scales():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    return NVFP4QTensor, NVFP4QTensor.__dict__["get_weights_scaling_factor"].__func__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_scales_kernel_is_modelopts(compiled, dtype):
    cls, original = _modelopt_scales()
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(40, 128, generator=g) * 0.05).to(dtype)
    w[0] = 0  # zero blocks: scale 1.0
    w[1] = 1e-6  # tiny: clamped to 2**-9
    w[2, :16] = 60000 if dtype != torch.float32 else 3e7  # huge: clamped to 448
    w[3, :16] = torch.tensor(-0.0, dtype=dtype)
    for wsf2 in (w.float().abs().amax() / 2688, torch.tensor([1e-4]), torch.tensor(7.0)):
        fused = packing._fused_block_scales(original)
        got, got2 = fused(cls, w, 16, wsf2)
        want, want2 = original(cls, w, 16, wsf2)
        assert got.dtype == want.dtype == F8 and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert got2 is wsf2 and want2 is wsf2


def test_block_scales_with_nan_or_other_cases_go_to_modelopt(compiled, monkeypatch):
    cls, original = _modelopt_scales()
    calls = []

    def counted(*a, **k):
        calls.append(a)
        return original(*a, **k)

    fused = packing._fused_block_scales(counted)
    w = torch.randn(8, 32).to(torch.bfloat16)
    w[5, 3] = float("nan")
    got, _ = fused(cls, w, 16, torch.tensor(0.01))
    want, _ = original(cls, w, 16, torch.tensor(0.01))
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and len(calls) == 1
    fused(cls, w.nan_to_num(), 16, None)  # no global scale given
    fused(cls, w.nan_to_num(), 16, torch.tensor(0.01), True)  # high precision kept
    fused(cls, w.double(), 16, torch.tensor(0.01))  # float64 weight
    fused(cls, w.nan_to_num(), 16, torch.tensor(0.01, dtype=torch.float64))
    assert len(calls) == 5


@pytest.mark.parametrize("per_expert", [False, True])
def test_nvfp4_export_packing_through_the_kernels_is_modelopts_bytes(compiled, per_expert):
    import modelopt.torch.export.unified_export_hf as ueh
    from modelopt.torch.export.model_config import QUANTIZATION_NVFP4

    cls, original = _modelopt_scales()
    g = torch.Generator().manual_seed(5)
    shape = (3, 40, 96) if per_expert else (40, 96)
    w = (torch.randn(*shape, generator=g) * 0.03).to(torch.bfloat16)
    w.view(-1)[:16] = 0
    gs = torch.rand(3, generator=g) * 1e-4 + 1e-5 if per_expert else torch.tensor(2e-5)
    scales = original(cls, w, 16, gs.view(-1, 1, 1) if per_expert else gs)[0]
    reference = ueh.to_quantized_weight(w, scales, QUANTIZATION_NVFP4, gs, 16)
    with packing.fast_packing():
        got = ueh.to_quantized_weight(w, scales, QUANTIZATION_NVFP4, gs, 16)
    assert kernels._compiled.get("nvfp4_codes") is not None and kernels.disabled_reason() is None
    assert torch.equal(got, reference)


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_tiny_export_through_the_kernels_keeps_its_pins(compiled, tiny_dir, tmp_path, recipe):
    """Every weight of the tiny model through the compiled kernels (they are off below
    ``MIN_ELEMENTS`` by default, so the pinned export itself runs the eager ops)."""
    from test_export_pins import PINNED

    from omniquant.quantize.pipeline import quantize

    out = quantize(tiny_dir, recipe, tmp_path / "ckpt", calib="synthetic").out
    assert {"fp8", "nvfp4_codes"} & set(kernels._compiled)
    got = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert got == PINNED[recipe]["model.safetensors"]


def test_small_weights_and_the_switch_keep_the_eager_ops(monkeypatch):
    monkeypatch.setattr(kernels, "_off", [])
    monkeypatch.delenv("OMNIQUANT_COMPILE", raising=False)
    w = torch.ones(4, 16, dtype=torch.bfloat16)
    assert kernels.run("fp8", w, torch.tensor(1.0), elements=kernels.MIN_ELEMENTS - 1) is None
    off_cpu = torch.empty(4, 16, dtype=torch.bfloat16, device="meta")  # CPU code only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declined up front: no compile tried, none failed
        assert kernels.run("fp8", off_cpu, torch.tensor(1.0), elements=1 << 30) is None
    assert kernels._off == []
    monkeypatch.setenv("OMNIQUANT_COMPILE", "0")
    assert kernels.disabled_reason() == "OMNIQUANT_COMPILE=0"
    assert kernels.run("fp8", w, torch.tensor(1.0), elements=1 << 30) is None


def test_a_failed_compile_warns_once_and_the_export_packs_eagerly(compiled, monkeypatch):
    """No C++ compiler (or any other failure to build): one warning naming the cause and the
    fix, then the eager ops, with the same bytes."""

    def broken(*_a, **_k):
        def fail(*_x):
            raise RuntimeError("InvalidCxxCompiler: No working C compiler found")

        return fail

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    w = (torch.randn(32, 64) * 0.1).to(torch.bfloat16)
    s = torch.tensor(0.02)
    with pytest.warns(
        RuntimeWarning,
        match=r"'fp8' failed \(RuntimeError: InvalidCxxCompiler.*g\+\+.*OMNIQUANT_COMPILE=0",
    ):
        got = packing._fp8_single_rounded(w, s)
    assert torch.equal(got.view(torch.uint8), (w.float() / s).to(F8).view(torch.uint8))
    assert kernels.disabled_reason().startswith("RuntimeError: InvalidCxxCompiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # off for the process: no second warning, no retry
        assert (
            kernels.run("nvfp4_pairs", torch.zeros(8, dtype=torch.int16), elements=1 << 30) is None
        )


def test_an_export_compiles_only_where_it_pays():
    """The slice's NVFP4 experts (2.6 G elements) pay for the process's compile; its FP8
    ones (2.6 G) do not, the released model's (31 G) do; nothing is compiled inside an
    export that does not pay."""
    slice_experts = 512 * 1856 * 2688
    assert kernels.worth_compiling({"nvfp4": slice_experts, "fp8": 10**8})
    assert not kernels.worth_compiling({"fp8": slice_experts, "bf16": 10**10})
    assert kernels.worth_compiling({"fp8": 31 * 10**9})
    w = torch.ones(4, 16, dtype=torch.bfloat16)
    with kernels.allowed(False):
        assert kernels.run("fp8", w, torch.tensor(1.0), elements=1 << 30) is None

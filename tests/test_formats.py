"""The format registry (omniquant.formats) is the single source every stage reads.

Each test drives a stage with tensors laid out from a ``Format`` entry alone (names,
dtypes and shapes from ``Format.tensors``) and checks the stage handles exactly what
the entry declares: a stage that kept its own table (a missing suffix, a dtype branch
for one format) fails here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from omniquant.formats import (
    DTYPE_BYTES,
    FORMATS,
    KV_CACHE_FORMAT,
    KV_SCALE_SUFFIXES,
    NARROWEST_FIRST,
    SCALAR_SCALE_SUFFIXES,
    SCALE_SUFFIXES,
    by_quant_algo,
    by_stored_dtype,
    get_format,
    safetensors_dtype,
    torch_dtype,
)

QUANTIZED = [name for name, f in FORMATS.items() if f.quantized]
OUT, IN = 4, 32  # IN divides every block size


def _stored(fmt_name: str, module: str = "m", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors ``fmt`` stores for one ``[OUT, IN]`` weight, from the registry entry alone:
    random finite weight bytes, positive scales."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for suffix, (dtype, shape) in FORMATS[fmt_name].tensors(OUT, IN).items():
        tdtype = torch_dtype(dtype)
        if suffix == "weight":
            # Bytes 0x00..0x77: finite, non-negative for E4M3; any E2M1 pair for U8.
            raw = torch.randint(0, 0x78, shape, generator=g, dtype=torch.uint8)
            out[f"{module}.{suffix}"] = raw.view(tdtype)
        else:
            values = torch.rand(shape, generator=g) + 0.25
            out[f"{module}.{suffix}"] = values.to(tdtype)
    return out


def _reference_dequant(fmt_name: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each format's dequantization written out by hand, independent of the registry."""
    from omniquant.numerics import dequantize_fp8, dequantize_nvfp4

    if fmt_name == "fp8":
        return dequantize_fp8(t["m.weight"], t["m.weight_scale"], dtype=torch.bfloat16)
    if fmt_name == "nvfp4":
        return dequantize_nvfp4(
            t["m.weight"], t["m.weight_scale"], t["m.weight_scale_2"], dtype=torch.bfloat16
        )
    raise AssertionError(f"add a hand-written reference for the new format {fmt_name!r}")


def test_lookups_round_trip():
    assert NARROWEST_FIRST == ("nvfp4", "fp8", "bf16")
    for name, fmt in FORMATS.items():
        assert get_format(name) is fmt
        assert by_stored_dtype(fmt.weight_dtype) is fmt
        assert by_stored_dtype(fmt.weight_torch_dtype) is fmt
        if fmt.quantized:
            assert by_quant_algo(fmt.hf_quant_algo) is fmt
            assert by_quant_algo(fmt.hf_quant_algo.lower()) is fmt
    assert by_stored_dtype("F32") is None and by_stored_dtype(torch.float16) is None
    assert by_quant_algo("MIXED_PRECISION") is None and by_quant_algo(None) is None
    assert [by_quant_algo(a).name for a in ("FP8", "NVFP4")] == ["fp8", "nvfp4"]
    for name, nbytes in DTYPE_BYTES.items():
        dt = torch_dtype(name)
        assert safetensors_dtype(dt) == name and dt.itemsize == nbytes
    with pytest.raises(KeyError, match="unknown format 'int4'; known formats: fp8, nvfp4, bf16"):
        get_format("int4")


def test_recipe_formats_are_the_registry():
    """A recipe may name exactly the registered formats (the recipe schema's Literal)."""
    import typing

    from omniquant.quantize.recipe import Format as RecipeFormat

    assert set(typing.get_args(RecipeFormat)) == set(FORMATS)


def test_import_stays_cheap():
    code = "import sys, omniquant.formats; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("fmt_name", QUANTIZED)
def test_emulated_loader_dequantizes_and_skips_what_the_entry_declares(fmt_name):
    from omniquant.evaluate.emulated import dequantize_state_dict

    fmt = FORMATS[fmt_name]
    stored = _stored(fmt_name)
    stored["m.bias"] = torch.ones(OUT, dtype=torch.bfloat16)
    stored["attn.k_proj.k_scale"] = torch.tensor(0.5)
    sd, act, kv = dequantize_state_dict(stored, torch.bfloat16)
    assert set(sd) == {"m.weight", "m.bias"}  # every scale the entry declares is skipped
    assert sd["m.weight"].dtype == torch.bfloat16 and tuple(sd["m.weight"].shape) == (OUT, IN)
    assert torch.equal(sd["m.weight"], _reference_dequant(fmt_name, stored))
    assert list(act) == ["m"] and act["m"][0] == fmt_name
    assert torch.equal(act["m"][1], stored[f"m.{fmt.input_scale_suffix}"].float())
    assert list(kv) == ["attn.k_proj"]


@pytest.mark.parametrize("fmt_name", QUANTIZED)
def test_activation_quantizer_is_the_formats_numerics(fmt_name):
    from omniquant.numerics import fake_quant_fp8, fake_quant_nvfp4_activation

    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor(0.01)
    want = {"fp8": fake_quant_fp8, "nvfp4": fake_quant_nvfp4_activation}[fmt_name](x, scale)
    assert torch.equal(get_format(fmt_name).activation_quantizer(scale)(x), want)
    assert not torch.equal(want, x)  # the quantizer does something
    with pytest.raises(ValueError, match="format bf16 does not quantize activations"):
        get_format("bf16").activation_quantizer(scale)


@pytest.mark.parametrize("fmt_name", QUANTIZED)
def test_audit_checks_every_scale_the_entry_declares(fmt_name):
    from omniquant.checkpoint.audit import AuditReport, _check_scales

    fmt = FORMATS[fmt_name]
    stored = _stored(fmt_name)

    reads = []

    def audit(tensors):
        report = AuditReport(path=None)
        _check_scales("m", fmt, lambda: reads.append(1) or tensors["m.weight"], tensors.get, report)
        return report.problems

    assert audit(stored) == []
    for suffix in fmt.scale_suffixes:
        without = {k: v for k, v in stored.items() if k != f"m.{suffix}"}
        assert audit(without) == [f"m.{suffix}: missing"]
        nan = dict(stored, **{f"m.{suffix}": torch.full_like(stored[f"m.{suffix}"], float("nan"))})
        problems = audit(nan)
        assert len(problems) == 1 and problems[0].startswith(f"m.{suffix}: "), problems
    # the stored weight is read only where a per-block scale needs its codes
    per_block = any(s.kind == "per_block" for s in fmt.scales)
    assert bool(reads) == per_block, (fmt_name, len(reads))


def test_audit_message_order_and_text():
    """The messages of the former per-format branches, in their former order."""
    from omniquant.checkpoint.audit import AuditReport, _check_scales

    def audit(fmt_name, tensors):
        report = AuditReport(path=None)
        _check_scales("m", FORMATS[fmt_name], lambda: tensors["m.weight"], tensors.get, report)
        return report.problems

    assert audit("fp8", {"m.weight": _stored("fp8")["m.weight"]}) == [
        "m.input_scale: missing",
        "m.weight_scale: missing",
    ]
    assert audit("nvfp4", {"m.weight": _stored("nvfp4")["m.weight"]}) == [
        "m.input_scale: missing",
        "m.weight_scale_2: missing",
        "m.weight_scale: missing",
    ]
    bad = dict(_stored("nvfp4"), **{"m.weight_scale": torch.ones(OUT, IN // 16)})
    assert audit("nvfp4", bad) == [
        "m.weight_scale: expected float8_e4m3fn (4, 2), got torch.float32 (4, 2)"
    ]


def test_verify_positive_rule_follows_scale_kinds():
    from omniquant.checkpoint.verify import SCALE_LEAVES, scale_problem

    # weight_scale is per-block in NVFP4 (a zero block scale is legal there): the
    # name-only rule cannot demand > 0 of it; every other scale is a scalar.
    assert set(SCALAR_SCALE_SUFFIXES) == {"input_scale", "weight_scale_2", "k_scale", "v_scale"}
    assert set(SCALE_LEAVES) == set(SCALE_SUFFIXES) | set(KV_SCALE_SUFFIXES)
    for suffix in SCALE_LEAVES:
        problem = scale_problem(f"m.{suffix}", torch.zeros(()))
        assert (problem is not None) == (suffix in SCALAR_SCALE_SUFFIXES), suffix


@pytest.mark.parametrize("fmt_name", QUANTIZED)
def test_export_keeps_exactly_the_entry_scales(fmt_name):
    from omniquant.quantize.export import QUANT_ALGO, _wanted

    fmt = FORMATS[fmt_name]
    qmods = {"m": fmt_name}
    assert _wanted("m.weight", qmods)
    for suffix in SCALE_SUFFIXES:
        assert _wanted(f"m.{suffix}", qmods) == (suffix in fmt.scale_suffixes), suffix
        assert not _wanted(f"other.{suffix}", qmods)  # a module the plan keeps in bf16
    for suffix in KV_SCALE_SUFFIXES:
        assert _wanted(f"attn.k_proj.{suffix}", qmods)
    assert QUANT_ALGO[fmt_name] == fmt.hf_quant_algo


def test_stage_tables_are_the_registry():
    """Every stage's name tables are the registry's: none keeps a copy of its own."""
    from omniquant.checkpoint import inspect, readers
    from omniquant.evaluate import emulated

    scales, kv = set(SCALE_SUFFIXES), set(KV_SCALE_SUFFIXES)
    assert scales == {s.suffix for f in FORMATS.values() for s in f.scales}
    assert set(emulated.SCALE_LEAVES) == scales and set(emulated.KV_LEAVES) == kv
    assert set(readers.SCALE_LEAVES) == scales and set(readers.KV_LEAVES) == kv
    assert set(inspect._SCALE_LEAVES) == scales | kv
    assert readers._SCALES_FOR == {n: set(f.scale_suffixes) for n, f in FORMATS.items()}
    assert KV_CACHE_FORMAT is FORMATS["fp8"]

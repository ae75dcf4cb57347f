"""Calibration algorithms (issue 21): modelopt's algorithms on the CPU, same bytes, recorded.

- The CPU NVFP4 fake-quant seam (``omniquant.quantize.modelopt_cpu``) gives modelopt's
  quantizers the values its CUDA kernels compute, and only while it is active.
- Every algorithm exports the same tensors (dtype, shape, byte count) as ``max``, passes
  the audit (``quantize`` audits) and both serving readers; ``max`` keeps the pinned bytes
  (``tests/test_export_pins.py``).
- ``omniquant.json`` records the algorithm, modelopt's parameters and per-layer fallbacks.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

NVFP4_DYNAMIC = {
    "num_bits": (2, 1),
    "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
}
NVFP4_STATIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}


def _linear_cfg(weight_cfg: dict, algorithm) -> dict:
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": weight_cfg},
            {"quantizer_name": "*input_quantizer", "cfg": NVFP4_DYNAMIC},
        ],
        "algorithm": algorithm,
    }


def _linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)), torch.randn(8, 64)


def test_modelopt_nvfp4_search_fails_on_the_cpu_without_the_seam():
    """Why the seam exists: modelopt 0.47's NVFP4 static fake quant needs Triton (CUDA)."""
    import modelopt.torch.quantization as mtq

    model, x = _linear()
    with pytest.raises((RuntimeError, AssertionError), match="triton|CUDA"):
        mtq.quantize(
            model,
            _linear_cfg(NVFP4_STATIC, {"method": "mse", "fp8_scale_sweep": True}),
            lambda m: m(x),
        )


def test_seam_static_fake_quant_matches_the_exported_bytes():
    """After modelopt's mse search on the CPU, the weight fake quant equals what the export
    stores: modelopt's NVFP4QTensor bytes, dequantized by omniquant's numerics."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from omniquant.numerics import dequantize_nvfp4
    from omniquant.quantize.modelopt_cpu import cpu_nvfp4_fake_quant

    model, x = _linear()
    w = model[0].weight.detach().clone()
    with cpu_nvfp4_fake_quant():
        mtq.quantize(
            model,
            _linear_cfg(NVFP4_STATIC, {"method": "mse", "fp8_scale_sweep": True}),
            lambda m: m(x),
        )
        wq = model[0].weight_quantizer
        fq = wq(w)
    s2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(wq)
    s, _ = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(wq, w, s2)
    packed = NVFP4QTensor.quantize(w, 16, s, s2)[0]._quantized_data
    stored = dequantize_nvfp4(packed, s, s2.reshape(()), dtype=torch.float32)
    # Same E2M1 codes; the scale product may differ in its last bit (modelopt's fake quant
    # multiplies by 448 / amax, the export divides by the stored scale).
    assert torch.allclose(fq.float(), stored, rtol=1e-6, atol=0)
    assert not torch.equal(fq.float(), w.float())  # it did quantize


def test_seam_dynamic_fake_quant_is_omniquants_activation_numerics_and_is_restored():
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as tq

    from omniquant.numerics import fake_quant_nvfp4_activation
    from omniquant.quantize.modelopt_cpu import cpu_nvfp4_fake_quant

    model, x = _linear()
    mtq.quantize(model, _linear_cfg(NVFP4_DYNAMIC, "max"), lambda m: m(x))  # max: no fake quant
    before = (tq.dynamic_block_quant, tq.static_blockwise_fp4_fake_quant)
    iq = model[0].input_quantizer
    with cpu_nvfp4_fake_quant(), cpu_nvfp4_fake_quant():  # re-entrant
        got = iq(x)
    assert (tq.dynamic_block_quant, tq.static_blockwise_fp4_fake_quant) == before
    want = fake_quant_nvfp4_activation(x, iq.amax.float() / (6.0 * 448.0))
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="CUDA"):  # outside the seam: modelopt's own path
        iq(x)


ALGOS = ("mse", "four_over_six", "local_hessian", "gptq")


@pytest.fixture(scope="module")
def max_aggr(quantized):
    return quantized("nvfp4_aggressive")


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_exports_the_same_tensors_and_passes_the_readers(quantized, max_aggr, algo):
    from safetensors import safe_open

    from omniquant.checkpoint.readers import READERS, read_as

    out = quantized(f"nvfp4_aggressive:{algo}")
    record = json.loads((out / "omniquant.json").read_text())
    base = json.loads((max_aggr / "omniquant.json").read_text())
    assert record["size"]["measured_bytes"] == base["size"]["measured_bytes"]
    assert record["algorithm"]["name"] == algo
    assert record["recipe"]["name"] == f"nvfp4_aggressive:{algo}"

    def layout(path):
        with safe_open(path / "model.safetensors", "pt") as fh:
            return {
                k: (fh.get_slice(k).get_dtype(), fh.get_slice(k).get_shape())
                for k in fh.keys()  # noqa: SIM118
            }

    assert layout(out) == layout(max_aggr)
    assert (out / "model.safetensors").read_bytes() != (max_aggr / "model.safetensors").read_bytes()
    for reader in READERS:
        view = read_as(out, reader)
        assert view.mismatches == [] and view.misdeclared == [] and view.unconsumed == []
    if algo == "gptq":  # modelopt's GPTQ skips fused expert containers: said per layer
        fallbacks = record["algorithm"]["fallbacks"]
        assert fallbacks and all(k.endswith(".mixer.experts") for k in fallbacks)
        assert all("is_quantized_linear" in v for v in fallbacks.values())
    else:
        assert record["algorithm"]["fallbacks"] == {}


def test_mixed_recipe_records_which_rule_ran_what(quantized):
    out = quantized("nvfp4_omni:mse")
    algo = json.loads((out / "omniquant.json").read_text())["algorithm"]
    assert algo["modelopt"] == {"method": "mse", "fp8_scale_sweep": True}
    assert algo["rules"]["0"] == "mse" and algo["rules"]["1"] == "max"
    assert "fp8 stays max" in algo["notes"]["1"]


def test_gptq_refuses_too_few_tokens_naming_the_count(tiny_dir, tmp_path):
    from omniquant.errors import CalibrationError
    from omniquant.quantize.pipeline import quantize

    with pytest.raises(
        CalibrationError, match=r"at least 128 calibration tokens.*gives \d+ \(1 sample"
    ):
        quantize(tiny_dir, "nvfp4_aggressive:gptq", tmp_path / "o", calib="synthetic",
                 overrides=["calibration.size=1"])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_cost_estimate_is_said_before_calibration(tiny_dir, tmp_path):
    from omniquant.quantize.pipeline import quantize

    lines: list[str] = []
    quantize(
        tiny_dir,
        "nvfp4_aggressive:four_over_six",
        tmp_path / "o",
        calib="synthetic",
        log=lines.append,
    )
    i = next(i for i, line in enumerate(lines) if line.startswith("algorithm four_over_six: about"))
    assert "weight-element evaluations" in lines[i] and "M elements/s measured here" in lines[i]
    assert i < next(i for i, line in enumerate(lines) if line.startswith("wrote "))


def test_max_config_is_unchanged_by_the_registry(tiny_dir):
    """max: the modelopt config is the format registry's, with dynamic NVFP4 weight scales."""
    from omniquant.models import load_model
    from omniquant.quantize.plan import NVFP4_CFG, resolve_plan, to_modelopt_config
    from omniquant.quantize.recipe import load_recipe

    loaded = load_model(tiny_dir, weights=False)
    rec, _ = load_recipe("nvfp4_aggressive")
    cfg = to_modelopt_config(resolve_plan(rec, loaded), rec)
    assert cfg["algorithm"] == "max"
    assert all(
        e["cfg"] == NVFP4_CFG
        for e in cfg["quant_cfg"][1:]
        if "weight_quantizer" in e["quantizer_name"]
    )
    rec, _ = load_recipe("nvfp4_aggressive:four_over_six")
    cfg = to_modelopt_config(resolve_plan(rec, loaded), rec)
    weights = [e["cfg"] for e in cfg["quant_cfg"][1:] if "weight_quantizer" in e["quantizer_name"]]
    assert weights and all(
        w["block_sizes"] == {**NVFP4_CFG["block_sizes"], "type": "static", "four_over_six": True}
        for w in weights
    )
    assert copy.deepcopy(NVFP4_CFG)["block_sizes"]["type"] == "dynamic"  # the registry is untouched


def test_report_names_each_candidates_algorithm(quantized, tiny_dir, tmp_path):
    """Variants sit side by side in the cliff/report under names that say the algorithm,
    also for a recipe file that differs from another only in its algorithm."""
    import yaml

    from omniquant.evaluate.describe import describe_checkpoint
    from omniquant.quantize.recipe import builtin_recipes

    info = describe_checkpoint(quantized("nvfp4_aggressive:mse"), "candidate")
    assert (info["name"], info["algorithm"]) == ("nvfp4_aggressive:mse", "mse")
    info = describe_checkpoint(quantized("nvfp4_aggressive"), "candidate")
    assert (info["name"], info["algorithm"]) == ("nvfp4_aggressive", "max")
    data = yaml.safe_load(builtin_recipes()["nvfp4_aggressive"].read_text())
    data["quantization"]["algorithm"] = "four_over_six"
    (tmp_path / "aggr46.yaml").write_text(yaml.safe_dump(data))
    from omniquant.quantize.pipeline import quantize

    out = quantize(tiny_dir, tmp_path / "aggr46.yaml", tmp_path / "o", calib="synthetic").out
    assert describe_checkpoint(out, "candidate")["name"] == "nvfp4_aggressive:four_over_six"


def test_cliff_takes_comma_separated_variants(monkeypatch):
    from omniquant.cli import main
    from omniquant.experiments import cliff

    seen = {}

    def fake_run_cliff(model, out, *, recipes, **_kw):
        seen["recipes"] = list(recipes)
        raise SystemExit(0)

    monkeypatch.setattr(cliff, "run_cliff", fake_run_cliff)
    with pytest.raises(SystemExit):
        main(["cliff", "--recipes", "nvfp4_omni,nvfp4_omni:gptq", "--recipe", "fp8_omni"])
    assert seen["recipes"] == ["nvfp4_omni", "nvfp4_omni:gptq", "fp8_omni"]

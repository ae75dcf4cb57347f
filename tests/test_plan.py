"""The plan stage: config-only planning, held to NVIDIA's releases and to exported bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from omniquant.cli import main
from omniquant.demo.tiny import SIZES, tiny_config_dict, write_config_only
from omniquant.errors import ModelLoadError, PlanError
from omniquant.formats import FORMATS
from omniquant.quantize.memory import (
    CalibrationShapes,
    MemorySpecError,
    estimate_calibration_memory,
    parse_max_memory,
    parse_size,
)
from omniquant.quantize.planner import plan_model
from omniquant.quantize.predict import measured_tensor_bytes, read_safetensors_header

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 2**30


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory) -> Path:
    """A directory holding only the released model's config.json, built in code."""
    return write_config_only(tmp_path_factory.mktemp("released") / "config-only")


# --------------------------------------------------------------- the release
def test_nvfp4_omni_predicts_nvidias_nvfp4_release(released_dir):
    report = plan_model(released_dir, "nvfp4_omni")
    assert report.config_only
    assert report.size.layers_by_format["nvfp4"] == 5888  # routed experts up/down
    assert report.size.layers_by_format["fp8"] == 98
    counts = report.plan.counts()
    # 98 FP8 = Mamba in/out 46 + shared experts 46 + attention o_proj 6.
    assert counts["mamba_in_out"] == {"fp8": 46}
    assert counts["shared_experts"] == {"fp8": 46}
    assert counts["attention_o"] == {"fp8": 6}
    assert counts["routed_experts"] == {"nvfp4": 23}
    predicted = report.size.predicted_bytes
    assert abs(predicted / GIB - 20.9) / 20.9 < 0.01
    # Exact arithmetic: 29.375 B NVFP4 elements at 4.5 bits + 1.415 B FP8 at 8 bits +
    # the rest as BF16, plus scalar scales (4 B each) and 6 x 2 KV scales.
    nv, f8 = report.size.params_by_format["nvfp4"], report.size.params_by_format["fp8"]
    assert nv == 29_374_808_064 and f8 == 1_415_307_264
    scalars = 5888 * 2 * 4 + 98 * 2 * 4 + 6 * 2 * 4
    bf16_bytes = 66_031_558_480 - 2 * (nv + f8)
    assert predicted == nv // 2 + nv // 16 + f8 + scalars + bf16_bytes


def test_fp8_recipes_against_nvidias_fp8_release(released_dir):
    omni = plan_model(released_dir, "fp8_omni").size
    backbone = plan_model(released_dir, "fp8_backbone").size
    assert abs(omni.predicted_bytes / GIB - 32.8) / 32.8 < 0.03
    assert abs(backbone.predicted_bytes / GIB - 32.8) / 32.8 < 0.01
    # fp8_omni keeps 48 GEMMs BF16 that the release quantizes: q/k/v/o of the 6
    # attention layers and in/out of the 12 Mamba layers next to them.
    assert backbone.layers_by_format["fp8"] - omni.layers_by_format["fp8"] == 48
    kept = backbone.params_by_format["fp8"] - omni.params_by_format["fp8"]
    assert kept == 604_864_512
    assert omni.predicted_bytes - backbone.predicted_bytes == kept - 48 * 2 * 4


def test_plan_json_from_the_cli(released_dir, capsys):
    assert main(["plan", "--model", str(released_dir), "--recipe", "nvfp4_omni", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers_by_format"] == {"nvfp4": 5888, "fp8": 98, "bf16": 457}
    assert isinstance(out["predicted_bytes"], int)
    assert out["predicted_bytes"] == out["size"]["predicted_bytes"]
    assert out["config_only"] is True


def test_format_registry_layouts():
    assert FORMATS["nvfp4"].tensors(1856, 2688) == {
        "weight": ("U8", (1856, 1344)),
        "weight_scale": ("F8_E4M3", (1856, 168)),
        "weight_scale_2": ("F32", ()),
        "input_scale": ("F32", ()),
    }
    assert FORMATS["fp8"].stored_bytes(64, 32) == 64 * 32 + 8
    assert FORMATS["nvfp4"].bits_per_weight(2688, 1856) == 4.5 + 64 / (2688 * 1856)  # 2 scalars
    from omniquant.quantize.plan import FP8_CFG, NVFP4_CFG

    assert FP8_CFG == {"num_bits": (4, 3), "axis": None}
    assert NVFP4_CFG["block_sizes"] == {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}


# ------------------------------------------------------------ plan == export
@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni", "nvfp4_aggressive"])
def test_tiny_prediction_equals_exported_bytes(tiny_dir, quantized, recipe):
    out = quantized(recipe)
    predicted = plan_model(tiny_dir, recipe).size.predicted_bytes
    manifest = json.loads((out / "omniquant.json").read_text())
    assert manifest["size"]["predicted_bytes"] == predicted
    assert manifest["size"]["measured_bytes"] == measured_tensor_bytes(out) == predicted
    # Headers are not counted: tensor data is what the header's offsets span.
    spans = 0
    for f in out.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        spans += sum(v["data_offsets"][1] - v["data_offsets"][0]
                     for k, v in header.items() if k != "__metadata__")  # fmt: skip
    assert spans == predicted


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni", "nvfp4_aggressive"])
def test_demo_prediction_equals_exported_bytes(demo_quantized, recipe):
    from omniquant.demo import demo_model_dir

    out = demo_quantized(recipe)
    report = plan_model(demo_model_dir(), recipe)
    assert not report.config_only
    assert measured_tensor_bytes(out) == report.size.predicted_bytes
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    layers = hf.get("quantized_layers")
    if layers is not None:  # MIXED_PRECISION: the per-layer list the prediction counts
        by_algo = {}
        for entry in layers.values():
            by_algo[entry["quant_algo"].lower()] = by_algo.get(entry["quant_algo"].lower(), 0) + 1
        quantized = {f: n for f, n in report.size.layers_by_format.items() if f != "bf16"}
        assert by_algo == quantized


def test_config_only_prediction_equals_full_checkpoint(tiny_dir, tmp_path):
    """The meta-device path (no weights) predicts what the header path predicts."""
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((tiny_dir / "config.json").read_text())
    for recipe in ("fp8_omni", "nvfp4_omni"):
        a, b = plan_model(cfg_only, recipe), plan_model(tiny_dir, recipe)
        assert a.config_only and not b.config_only
        assert a.size.predicted_bytes == b.size.predicted_bytes


# ---------------------------------------------------------------- refusals
def _config(tmp_path, edit, name="cfg") -> Path:
    kwargs = tiny_config_dict(SIZES["tiny"])
    edit(kwargs)
    return write_config_only(tmp_path / name, kwargs)


def _refused_everywhere(tmp_path, model: Path, recipe: str, needles: list[str]) -> None:
    """plan and quantize both refuse, before any weight is read (there are none: a
    quantize that got past the plan would fail on the missing weights instead)."""
    from omniquant.quantize.pipeline import quantize

    with pytest.raises(PlanError) as plan_err:
        plan_model(model, recipe)
    with pytest.raises(PlanError) as quant_err:
        quantize(model, recipe, tmp_path / "out", calib="synthetic")
    for err in (plan_err, quant_err):
        for needle in needles:
            assert needle in str(err.value)
    assert not (tmp_path / "out").exists()


def test_expert_width_not_divisible_by_the_nvfp4_block_is_refused(tmp_path):
    def edit(k):
        k["text_config"]["moe_intermediate_size"] = 72

    model = _config(tmp_path, edit)
    needles = [f"language_model.model.layers.{i}.mixer.experts.down_proj (input width 72)"
               for i in (1, 3, 5, 7)]  # fmt: skip
    _refused_everywhere(tmp_path, model, "nvfp4_omni", needles + ["block size 16"])


def test_pattern_without_moe_is_refused(tmp_path):
    def edit(k):
        k["text_config"]["layers_block_type"] = ["linear_attention", "full_attention"] * 2

    model = _config(tmp_path, edit)
    _refused_everywhere(
        tmp_path, model, "nvfp4_omni",
        ["{group: routed_experts, format: nvfp4}: this model has no routed_experts module",
         "{group: shared_experts, format: fp8}: this model has no shared_experts module"],
    )  # fmt: skip


def test_missing_audio_tower_named_by_a_rule_is_refused(tmp_path):
    def edit(k):
        k["audio_config"] = None

    model = _config(tmp_path, edit)
    recipe = tmp_path / "keep_audio.yaml"
    recipe.write_text(
        "metadata: {name: keep_audio}\n"
        "quantization:\n  rules:\n"
        "    - {group: routed_experts, format: fp8}\n"
        "    - {group: audio_tower, format: bf16}\n"
    )
    _refused_everywhere(
        tmp_path, model, str(recipe),
        [("quantization.rules.1 {group: audio_tower, format: bf16}: this model has no "
          "audio_tower module")],
    )  # fmt: skip


def test_plan_needs_only_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        plan_model(tmp_path, "fp8_omni")


# ------------------------------------------------------------------ memory
_SHAPES = CalibrationShapes(
    hidden=8, widest_linear=("lm_head", 8, 100), attention_heads=2, experts=4,
    experts_per_token=2, expert_width=16, mamba_heads=2, mamba_head_dim=4, ssm_state=4, chunk=4,
)  # fmt: skip


def test_parse_max_memory():
    assert parse_max_memory("cpu=200GiB,1=120GiB,0=120GiB") == {
        "cuda:0": 120 * GIB, "cuda:1": 120 * GIB, "cpu": 200 * GIB,
    }  # fmt: skip
    assert parse_size("80GB") == 80 * 10**9
    with pytest.raises(MemorySpecError, match="gpu0"):
        parse_max_memory("gpu0=1GiB")
    with pytest.raises(MemorySpecError, match="12 parsecs"):
        parse_max_memory("0=12 parsecs")


def test_memory_arithmetic_and_placement():
    t = 10
    est = estimate_calibration_memory([("a", 100), ("b", 100)], _SHAPES, t)
    assert est.activation_terms == {
        "widest_linear": t * (8 + 100) * 2,
        "attention_scores": 2 * t * t * 4,
        "mamba_chunk_scan": 3 * math.ceil(t / 4) * 16 * 2 * 4
        + 2 * math.ceil(t / 4) * 2 * 4 * 4 * 4,
        "moe_routing_mask": t * 2 * 5 * 8,
    }
    assert est.activation_peak_bytes == 2160
    assert est.devices[0]["total"] == 200 + 2160 and est.fits is None
    forced = estimate_calibration_memory([("a", 100)], _SHAPES, t, force_all_experts=True)
    assert forced.force_all_overhead_bytes == t * 4 * 5 * 8 + t * 4 * 4 + t * 8 * 4 + t * (
        3 * 8 * 2 + 2 * 16 * 2
    )
    # GPU 0 holds 'a' (room 2500 - 2160 reserve = 340 < 200 + 200), 'b' spills to GPU 1.
    split = estimate_calibration_memory(
        [("a", 200), ("b", 200)], _SHAPES, t, max_memory="0=2500B,1=2500B,cpu=0B"
    )
    assert [(d["device"], d["weights"]) for d in split.devices] == [
        ("cuda:0", 200), ("cuda:1", 200), ("cpu", 0),
    ]  # fmt: skip
    assert split.fits is True
    short = estimate_calibration_memory([("a", 5000)], _SHAPES, t, max_memory="0=2500B")
    assert short.fits is False


def test_header_reader_matches_safetensors(tiny_dir):
    from safetensors import safe_open

    header = read_safetensors_header(tiny_dir / "model.safetensors")
    with safe_open(tiny_dir / "model.safetensors", "pt") as fh:
        assert set(header) == set(fh.keys())
        k = "language_model.backbone.layers.0.mixer.in_proj.weight"
        assert header[k] == ("BF16", tuple(fh.get_slice(k).get_shape()))


# ------------------------------------------------------------------ slice
@pytest.mark.slice
@pytest.mark.slow
def test_slice_nvfp4_omni_plan_equals_export(tmp_path):
    """The real-width slice (3.65 B parameters): quantize with nvfp4_omni, compare bytes.
    Needs ~10 GB of RAM and several minutes on 2 cores."""
    from omniquant.demo.tiny import make_tiny
    from omniquant.quantize.pipeline import quantize

    src = make_tiny(tmp_path / "slice", size="slice")
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 1
    assert (src / "model.safetensors.index.json").is_file()
    report = plan_model(src, "nvfp4_omni")
    assert report.size.layers_by_format["nvfp4"] == 2 * 128 * 2
    out = quantize(src, "nvfp4_omni", tmp_path / "q", calib="synthetic",
                   overrides=["calibration.size=2", "calibration.expert_coverage.policy=warn"]).out  # fmt: skip
    assert measured_tensor_bytes(out) == report.size.predicted_bytes
    manifest = json.loads((out / "omniquant.json").read_text())
    assert manifest["size"]["measured_bytes"] == manifest["size"]["predicted_bytes"]


def test_device_must_have_a_budget_and_limits_placement():
    est = estimate_calibration_memory(
        [("a", 100)], _SHAPES, 10, device="cuda:1", max_memory="0=1GiB,1=1GiB,cpu=1GiB"
    )
    assert [d["device"] for d in est.devices] == ["cuda:1", "cpu"]
    assert est.devices[0]["weights"] == 100
    with pytest.raises(MemorySpecError, match="no budget for cuda:2"):
        estimate_calibration_memory([("a", 1)], _SHAPES, 10, device="cuda:2", max_memory="0=1GiB")


def test_released_naming_config_plans_the_same(released_dir, tmp_path):
    """A config.json in the hub's remote-code naming (legacy field names, as downloaded
    from the release) plans like the native one."""
    legacy_names = {  # transformers' NemotronH_Omni_Reasoning_V3_Config._legacy_field_names
        "text_config": "llm_config",
        "audio_config": "sound_config",
        "vision_hidden_size": "vit_hidden_size",
    }
    cfg = json.loads((released_dir / "config.json").read_text())
    for current, legacy in legacy_names.items():
        if current in cfg:
            cfg[legacy] = cfg.pop(current)
    cfg["sound_config"]["model_type"] = "parakeet"
    cfg["architectures"] = ["NemotronH_Nano_Omni_Reasoning_V3"]
    cfg["model_type"] = "NemotronH_Nano_Omni_Reasoning_V3"
    hub = tmp_path / "hub-config"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(cfg))
    a, b = plan_model(hub, "nvfp4_omni"), plan_model(released_dir, "nvfp4_omni")
    assert a.size.predicted_bytes == b.size.predicted_bytes
    assert a.size.layers_by_format == {"nvfp4": 5888, "fp8": 98, "bf16": 457}

"""Recipe schema, overrides and plan resolution: every failure names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniquant.errors import PlanError, RecipeError
from omniquant.models import load_model
from omniquant.quantize.plan import resolve_plan, to_modelopt_config
from omniquant.quantize.recipe import builtin_recipes, load_recipe, recipe_header


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(tiny_dir)


def _write(tmp_path, body: str):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    return p


BASE = """metadata: {name: t}
quantization:
  rules:
    - {group: routed_experts, format: fp8}
"""


def test_builtins_have_header_comments():
    names = set(builtin_recipes())
    assert names == {"fp8_omni", "nvfp4_omni", "nvfp4_aggressive", "fp8_backbone"}
    for name, path in builtin_recipes().items():
        assert path.read_text().startswith(f"# {name}:")
        assert "BF16" in recipe_header(path)


def test_typo_field(tmp_path):
    p = _write(tmp_path, BASE.replace("quantization:", "quantization:\n  kv_cahce: fp8"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid recipe:")
    assert (
        "quantization.kv_cahce: unknown field 'kv_cahce'; allowed fields here: algorithm, kv_cache, nvfp4_block_size, rules"
        in msg
    )


def test_bad_format_name(tmp_path):
    p = _write(tmp_path, BASE.replace("format: fp8", "format: fp9"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert (
        "quantization.rules.0.format: bad value \"fp9\": Input should be 'fp8', 'nvfp4' or 'bf16'"
        in str(e.value)
    )


def test_override_goes_through_validation():
    rec, _ = load_recipe("fp8_omni", ["calibration.size=3", "quantization.rules.0.format=nvfp4"])
    assert rec.calibration.size == 3 and rec.quantization.rules[0].format == "nvfp4"
    with pytest.raises(RecipeError, match=r"calibration.evs_rate: bad value 1.5"):
        load_recipe("fp8_omni", ["calibration.evs_rate=1.5"])
    with pytest.raises(RecipeError, match=r"calibration.sizes: unknown field"):
        load_recipe("fp8_omni", ["calibration.sizes=3"])
    with pytest.raises(RecipeError, match=r"is a list of 4 items; '9' is not an index"):
        load_recipe("fp8_omni", ["quantization.rules.9.format=fp8"])


def test_sha_tracks_effective_recipe():
    a, _ = load_recipe("fp8_omni")
    b, _ = load_recipe("fp8_omni", ["calibration.size=16"])  # same as the file
    c, _ = load_recipe("fp8_omni", ["calibration.size=8"])
    assert a.sha256() == b.sha256() != c.sha256()


def test_zero_match_rule(tmp_path, loaded):
    p = _write(
        tmp_path,
        BASE + "    - {modules: 'language_model.model.layers.*.mixer.nothing', format: fp8}\n",
    )
    rec, _ = load_recipe(p)
    with pytest.raises(PlanError) as e:
        resolve_plan(rec, loaded)
    assert (
        "quantization.rules.1 {modules: 'language_model.model.layers.*.mixer.nothing', format: fp8}: matches no module"
        in str(e.value)
    )


def test_unknown_group(tmp_path, loaded):
    rec, _ = load_recipe(_write(tmp_path, BASE.replace("routed_experts", "experts")))
    with pytest.raises(
        RecipeError, match="unknown group 'experts'; groups of this model: .*routed_experts"
    ):
        resolve_plan(rec, loaded)


def test_encoder_guard_fires_on_glob(tmp_path, loaded):
    rec, _ = load_recipe(_write(tmp_path, BASE + "    - {modules: '*q_proj', format: fp8}\n"))
    with pytest.raises(PlanError) as e:
        resolve_plan(rec, loaded)
    msg = str(e.value)
    assert (
        "would quantize" in msg
        and "audio_tower, vision_tower" in msg
        and "without naming them" in msg
    )


def test_encoder_named_explicitly_is_refused_for_now(tmp_path, loaded):
    rec, _ = load_recipe(_write(tmp_path, BASE + "    - {group: vision_tower, format: fp8}\n"))
    with pytest.raises(PlanError, match="vision_tower cannot be quantized to fp8"):
        resolve_plan(rec, loaded)


def test_later_rules_win_and_bf16_glob_allowed(tmp_path, loaded):
    rec, _ = load_recipe(
        _write(
            tmp_path, BASE + "    - {modules: 'language_model.model.layers.1.*', format: bf16}\n"
        )
    )
    plan = resolve_plan(rec, loaded)
    assert plan.module_format["language_model.model.layers.1.mixer.experts"] == "bf16"
    assert plan.module_format["language_model.model.layers.3.mixer.experts"] == "fp8"


def test_divisibility_lists_every_offender(tmp_path):
    import torch
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    from omniquant.demo.tiny import SIZES, TinySize, build_tiny_model, tiny_config_dict  # noqa: F401
    from omniquant.models.base import LoadedModel
    from omniquant.models.nemotron_omni import NemotronOmniAdapter

    model, tok = build_tiny_model(0)
    cfg = model.config
    cfg.text_config.moe_intermediate_size = 40  # down_proj input width 40: not divisible by 16
    cfg.text_config.moe_shared_expert_intermediate_size = 40
    torch.manual_seed(0)
    bad = NemotronH_Omni_Reasoning_V3(cfg)
    loaded = LoadedModel(model=bad, tokenizer=tok, path=tmp_path, adapter=NemotronOmniAdapter())
    rec, _ = load_recipe("nvfp4_aggressive")
    with pytest.raises(PlanError) as e:
        resolve_plan(rec, loaded)
    msg = str(e.value)
    for layer in (1, 3, 5, 7):
        assert (
            f"language_model.model.layers.{layer}.mixer.experts.down_proj (input width 40)" in msg
        )
        assert (
            f"language_model.model.layers.{layer}.mixer.shared_experts.down_proj (input width 40)"
            in msg
        )
    assert "experts.up_proj" not in msg


def test_modelopt_translation_exact(loaded):
    rec, _ = load_recipe("nvfp4_omni")
    cfg = to_modelopt_config(resolve_plan(rec, loaded), rec)
    entries = cfg["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    names = {e["quantizer_name"]: e.get("cfg") for e in entries[1:]}
    nv = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    fp8 = {"num_bits": (4, 3), "axis": None}
    assert names["model.layers.1.mixer.experts.up_proj_weight_quantizers.*"] == nv
    assert names["model.layers.1.mixer.experts.down_proj_input_quantizer"] == nv
    assert names["model.layers.0.mixer.in_proj.weight_quantizer"] == fp8
    assert names["model.layers.4.mixer.o_proj.input_quantizer"] == fp8
    assert names["model.layers.4.mixer.k_bmm_quantizer"] == fp8
    assert "model.layers.4.mixer.q_proj.weight_quantizer" not in names
    assert not any("vision" in n or "audio" in n or "lm_head" in n for n in names)
    assert cfg["algorithm"] == "max"
    # 4 MoE layers x 2 projections x 2 quantizers; (6 mamba + 8 shared + 1 o_proj) x 2; 2 kv
    assert len(entries) == 1 + 16 + 2 * (6 + 8 + 1) + 2


def test_an_algorithm_a_rule_format_cannot_take_is_refused_before_any_model_work(capsys, tmp_path):
    """four_over_six is NVFP4 only: naming it on an FP8 rule fails at recipe load, naming the rule."""
    from omniquant.cli import main

    rc = main(["quantize", "--model", str(tmp_path / "never-read"), "--recipe", "nvfp4_omni",
               "--set", "quantization.rules.1.algorithm=four_over_six", "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "quantization.rules.1 {group: mamba_in_out, format: fp8, algorithm: four_over_six}" in err
    assert "does not apply to format fp8" in err and "max, mse, gptq" in err
    assert "never-read" not in err  # the recipe is checked before the model is looked at
    # The same algorithm globally applies to the NVFP4 rules; FP8 rules stay max, said per rule.
    rec, _ = load_recipe("nvfp4_omni", ["quantization.algorithm=four_over_six"])
    from omniquant.quantize.algorithms import resolve_algorithms

    algos = resolve_algorithms(rec)
    assert algos.by_rule == {0: "four_over_six", 1: "max", 2: "max", 3: "max"}
    assert "does not apply to fp8" in algos.notes[1]
    load_recipe("fp8_omni", ["quantization.algorithm=mse"])  # fp8 + mse stays allowed


def test_unknown_and_refused_algorithms_name_the_choices():
    with pytest.raises(RecipeError) as exc:
        load_recipe("nvfp4_omni", ["quantization.algorithm=smoothquant"])
    assert "unknown algorithm; known algorithms: max, mse, four_over_six, local_hessian, gptq, awq" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        load_recipe("nvfp4_omni", ["quantization.algorithm=awq"])
    assert "algorithm awq is refused for quantization.rules.0" in str(exc.value)
    assert "pre_quant_scale" in str(exc.value)
    with pytest.raises(RecipeError) as exc:  # one search for the whole model in modelopt
        load_recipe("nvfp4_aggressive", ["quantization.algorithm=mse", "quantization.rules.0.algorithm=gptq"])
    assert "modelopt 0.47 runs one calibration algorithm per model" in str(exc.value)
    with pytest.raises(RecipeError) as exc:  # gptq touches every weight: max cannot be kept
        load_recipe("nvfp4_aggressive", ["quantization.algorithm=gptq", "quantization.rules.0.algorithm=max"])
    assert "cannot stay max under gptq" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        load_recipe("fp8_omni", ["quantization.algorithm=four_over_six"])
    assert "applies to none of the recipe's quantized rules" in str(exc.value)


def test_per_rule_algorithm_and_hash_stability():
    """A rule's own algorithm is validated and recorded; a recipe without one hashes as before."""
    from omniquant.quantize.algorithms import resolve_algorithms

    rec, _ = load_recipe("nvfp4_aggressive", ["quantization.rules.0.algorithm=mse"])
    algos = resolve_algorithms(rec)
    assert algos.active == "mse" and algos.by_rule[0] == "mse"
    assert set(algos.by_rule.values()) == {"mse", "max"}
    plain, _ = load_recipe("nvfp4_aggressive")
    assert "algorithm" not in plain.model_dump(mode="json")["quantization"]["rules"][0]
    assert rec.sha256() != plain.sha256()


def test_builtin_name_wins_over_a_same_named_entry_in_the_working_directory(tmp_path, monkeypatch):
    """``quantize --recipe fp8_omni --out fp8_omni`` twice: the second run still means the
    built-in; a local file is used when written as a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fp8_omni").mkdir()
    _, path = load_recipe("fp8_omni")
    assert path == builtin_recipes()["fp8_omni"]
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe("./fp8_omni")
    local = tmp_path / "mine.yaml"
    local.write_text(builtin_recipes()["nvfp4_omni"].read_text())
    assert load_recipe("mine.yaml")[1] == Path("mine.yaml")

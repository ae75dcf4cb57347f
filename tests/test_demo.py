"""The bundled demo model: it loads, has every block type, and reproduces its recorded accuracy."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from safetensors import safe_open

from omniquant import demo
from omniquant.cli import CLI_NAMES
from omniquant.demo import DEMO_CALIB, DEMO_TASKS, demo_model_dir, demo_training_record
from omniquant.errors import ModelLoadError, argument_style

SUBSET_PER_TASK = 2


@pytest.fixture(scope="module")
def record() -> dict:
    return demo_training_record()


@pytest.fixture(scope="module")
def loaded():
    from omniquant.models import load_model

    return load_model(demo_model_dir())


def test_names_of_the_shipped_sets():
    from omniquant.data.sets import shipped_calib_sets
    from omniquant.evaluate import shipped_task_sets

    assert DEMO_CALIB in shipped_calib_sets()
    assert DEMO_TASKS in shipped_task_sets()


def test_missing_assets_give_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(demo, "_MODEL_DIR", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        demo.demo_model_dir()
    with argument_style(CLI_NAMES):  # as the `omniquant` command prints it
        message = str(info.value)
    assert message.startswith(f"The bundled demo model is incomplete: {tmp_path} lacks model.safetensors, ")
    assert "python scripts/train_demo.py" in message and "--model DIR" in message
    assert "pass model DIR" in str(info.value)  # a Python caller reads the argument's name
    monkeypatch.setattr(demo, "_RECORD", tmp_path / "accuracy.json")
    with pytest.raises(ModelLoadError, match=r"has no training record"):
        demo.demo_training_record()


def test_checkpoint_is_small_bf16_hub_layout_with_every_block_type():
    model_dir = demo_model_dir()
    assert sum(p.stat().st_size for p in model_dir.iterdir()) <= 10 * 2**20
    with safe_open(model_dir / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        dtypes = {str(fh.get_tensor(k).dtype) for k in keys if "e_score_correction_bias" not in k}
        bias = fh.get_tensor("language_model.backbone.layers.1.mixer.gate.e_score_correction_bias")
    assert dtypes <= {"torch.bfloat16", "torch.int64"}, dtypes
    assert bias.abs().sum() > 0
    for needle in [
        "language_model.backbone.layers.0.mixer.in_proj.weight",  # Mamba2
        "language_model.backbone.layers.0.mixer.conv1d.weight",
        "language_model.backbone.layers.1.mixer.experts.7.down_proj.weight",  # routed experts
        "language_model.backbone.layers.1.mixer.shared_experts.up_proj.weight",
        "language_model.backbone.layers.1.mixer.gate.weight",  # sigmoid router
        "language_model.backbone.layers.4.mixer.q_proj.weight",  # attention
        "vision_model.radio_model.model.patch_generator.video_embedder.weight",  # Conv3D video path
        "vision_model.radio_model.model.blocks.1.attn.qkv.weight",
        "mlp1.1.weight",
        "sound_encoder.encoder.layers.1.self_attn.q_proj.weight",  # Parakeet
        "sound_projection.linear1.weight",
        "language_model.lm_head.weight",
    ]:
        assert needle in keys, needle
    assert not any(k.startswith("language_model.model.") for k in keys)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h_omni"
    assert set(cfg["text_config"]["layers_block_type"]) == {"linear_attention", "moe", "full_attention"}
    # NVFP4 blocks of 16 along every backbone input width
    text = cfg["text_config"]
    for width in (text["hidden_size"], text["moe_intermediate_size"],
                  text["mamba_num_heads"] * text["mamba_head_dim"]):  # fmt: skip
        assert width % 16 == 0


def test_loads_with_no_missing_or_unexpected_weights(loaded):
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    _, info = NemotronH_Omni_Reasoning_V3.from_pretrained(demo_model_dir(), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    groups = loaded.adapter.module_groups(loaded.model)
    for group in ("mamba_in_out", "mamba_conv1d", "routed_experts", "shared_experts", "router",
                  "attention_qkv", "attention_o", "embeddings", "lm_head", "vision_tower",
                  "vision_projector", "audio_tower", "audio_projector"):  # fmt: skip
        assert groups[group], group
    assert str(loaded.model.dtype) == "torch.bfloat16"


def test_record_meets_the_target(record):
    """Issue 6: at least 90% on every evaluation task, BF16 weights, omniquant's evaluator."""
    from omniquant.evaluate import validate_task_set

    entries = validate_task_set(DEMO_TASKS)
    assert record["seed"] == 0
    assert set(record["predictions"]) == {e.id for e in entries}
    assert set(record["per_task"]) == {e.task for e in entries}
    assert min(record["per_task"].values()) >= 0.9, record["per_task"]
    for task, accuracy in record["per_task"].items():  # the summary matches the per-sample scores
        scores = [record["scores"][e.id] for e in entries if e.task == task]
        assert accuracy == pytest.approx(sum(scores) / len(scores), abs=1e-12)


def test_fixed_subset_reproduces_the_recorded_predictions(loaded, record):
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate import evaluate_model, prepare_task_items, validate_task_set

    taken: dict[str, int] = defaultdict(int)
    subset = []
    for entry in validate_task_set(DEMO_TASKS):
        if taken[entry.task] < SUBSET_PER_TASK:
            taken[entry.task] += 1
            subset.append(entry)
    items = prepare_task_items(OmniProcessor.from_pretrained(demo_model_dir()), subset)
    evaluation = evaluate_model(loaded, items)
    got = {r.id: r.prediction for r in evaluation.samples}
    assert got == {e.id: record["predictions"][e.id] for e in subset}
    assert {r.id: r.score for r in evaluation.samples} == {e.id: record["scores"][e.id] for e in subset}

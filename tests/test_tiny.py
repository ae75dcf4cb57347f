"""The tiny checkpoint: hub layout, every block type, deterministic, working tokenizer."""

from __future__ import annotations

import hashlib
import json

from safetensors import safe_open

from omniquant.cli import main
from omniquant.demo.tiny import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN


def _keys(d):
    with safe_open(d / "model.safetensors", "pt") as fh:
        return set(fh.keys())


def test_hub_layout_and_block_types(tiny_dir):
    keys = _keys(tiny_dir)
    for needle in [
        "language_model.backbone.layers.0.mixer.in_proj.weight",  # Mamba2
        "language_model.backbone.layers.0.mixer.conv1d.weight",
        "language_model.backbone.layers.1.mixer.experts.0.up_proj.weight",  # routed experts
        "language_model.backbone.layers.1.mixer.experts.7.down_proj.weight",
        "language_model.backbone.layers.1.mixer.shared_experts.up_proj.weight",
        "language_model.backbone.layers.1.mixer.gate.e_score_correction_bias",  # sigmoid router
        "language_model.backbone.layers.4.mixer.q_proj.weight",  # attention
        "vision_model.radio_model.model.patch_generator.video_embedder.weight",  # Conv3D video path
        "vision_model.radio_model.model.blocks.0.attn.qkv.weight",
        "mlp1.1.weight",
        "sound_encoder.encoder.layers.0.self_attn.q_proj.weight",  # Parakeet
        "sound_projection.linear1.weight",
        "language_model.lm_head.weight",
    ]:
        assert needle in keys, needle
    assert not any(k.startswith("language_model.model.") for k in keys)
    with safe_open(tiny_dir / "model.safetensors", "pt") as fh:
        assert fh.get_tensor("language_model.backbone.layers.0.mixer.in_proj.weight").dtype.__str__() == "torch.bfloat16"
        bias = fh.get_tensor("language_model.backbone.layers.1.mixer.gate.e_score_correction_bias")
        assert bias.abs().sum() > 0
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h_omni"
    assert set(cfg["text_config"]["layers_block_type"]) == {"linear_attention", "moe", "full_attention"}
    size = sum(p.stat().st_size for p in tiny_dir.iterdir())
    assert size < 4 * 2**20


def test_tokenizer_placeholders(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    ids = tok(f"a{IMAGE_TOKEN}{IMAGE_TOKEN}b{AUDIO_TOKEN}{VIDEO_TOKEN}", add_special_tokens=False).input_ids
    assert ids.count(cfg["image_token_id"]) == 2
    assert ids.count(cfg["audio_token_id"]) == 1
    assert ids.count(cfg["video_token_id"]) == 1
    assert tok.decode(tok("how many beeps?").input_ids) == "how many beeps?"


def test_deterministic(tmp_path):
    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    assert main(["make-tiny", "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["make-tiny", "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    assert main(["make-tiny", "--out", str(tmp_path / "c"), "--seed", "4"]) == 0
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a")["model.safetensors"] != digests(tmp_path / "c")["model.safetensors"]


def _meta_params(kwargs) -> int:
    import torch
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    with torch.device("meta"):
        model = NemotronH_Omni_Reasoning_V3(NemotronH_Omni_Reasoning_V3_Config(**kwargs))
    return sum(p.numel() for p in model.parameters())


def test_released_and_slice_configs_have_the_released_sizes():
    """The released config builds to 33.016 B parameters = 61.50 GiB in BF16 (vLLM's
    'Checkpoint size: 61.50 GiB'); the slice keeps its widths with 4 text layers."""
    from omniquant.demo.tiny import RELEASED_PATTERN, released_config_dict, slice_config_dict

    assert len(RELEASED_PATTERN) == 52
    assert [RELEASED_PATTERN.count(c) for c in "ME*"] == [23, 23, 6]
    released = _meta_params(released_config_dict())
    assert released == 33_015_727_040
    assert round(released * 2 / 2**30, 2) == 61.50
    sliced = slice_config_dict()
    assert sliced["text_config"]["hidden_size"] == 2688
    assert sliced["text_config"]["n_routed_experts"] == 128
    assert _meta_params(sliced) == 3_654_859_072

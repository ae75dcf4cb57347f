"""A checkpoint whose config.json uses the released (remote-code) naming loads like the native one.

The released hub checkpoints name their class ``NemotronH_Nano_Omni_Reasoning_V3`` and use
legacy field names (``llm_config``, ``sound_config``, ``img_context_token_id``, ...; see
shared FIELD_NOTES), which transformers' ``nemotron_h_omni`` config maps itself. This test
rewrites a tiny native checkpoint's config.json into that naming; the released files
themselves cannot be downloaded here, so their exact ``model_type`` string is not known:
omniquant recognises them by ``architectures``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from omniquant.errors import ModelLoadError

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY = {
    "text_config": "llm_config",
    "audio_config": "sound_config",
    "image_token_id": "img_context_token_id",
    "video_token_id": "video_context_token_id",
    "audio_token_id": "sound_context_token_id",
    "vision_hidden_size": "vit_hidden_size",
}


@pytest.fixture(scope="module")
def hub_style(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "model"
    shutil.copytree(tiny_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    for current, legacy in LEGACY.items():
        cfg[legacy] = cfg.pop(current)
    cfg["sound_config"]["model_type"] = "parakeet"  # as released: not a registered type
    cfg["architectures"] = ["NemotronH_Nano_Omni_Reasoning_V3"]
    cfg["model_type"] = "NemotronH_Nano_Omni_Reasoning_V3"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def test_released_naming_loads_and_computes_like_the_native_checkpoint(tiny_dir, hub_style):
    from omniquant.data.processing import OmniProcessor
    from omniquant.data.synthetic import synthetic_samples
    from omniquant.models import load_model

    native, hub = load_model(tiny_dir, dtype="float32"), load_model(hub_style, dtype="float32")
    assert type(hub.adapter) is type(native.adapter)
    p_native, p_hub = (
        OmniProcessor.from_pretrained(tiny_dir),
        OmniProcessor.from_pretrained(hub_style),
    )
    assert p_hub.settings == p_native.settings
    assert (p_hub.image_token_id, p_hub.audio_token_id) == (
        p_native.image_token_id,
        p_native.audio_token_id,
    )
    assert hub.adapter.placeholder_ids(hub.model) == native.adapter.placeholder_ids(native.model)
    with torch.no_grad():
        for a, b in zip(synthetic_samples(native, 4, seed=1), synthetic_samples(hub, 4, seed=1)):
            out_a = native.adapter.forward(native.model, a).logits
            out_b = hub.adapter.forward(hub.model, b).logits
            assert torch.equal(out_a, out_b), a.id


def test_unknown_model_type_and_architecture_is_refused_naming_both(hub_style, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hub_style, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["SomethingElse"]
    (bad / "config.json").write_text(json.dumps(cfg))
    from omniquant.models import load_model

    with pytest.raises(ModelLoadError) as err:
        load_model(bad)
    msg = str(err.value)
    assert "NemotronH_Nano_Omni_Reasoning_V3" in msg and "SomethingElse" in msg
    assert str(bad / "config.json") in msg


def test_released_naming_quantizes_to_the_same_bytes_and_reloads(hub_style, quantized, tmp_path):
    """Same weights, same calibration: the export of the released-naming checkpoint has the
    native export's shard checksums, keeps its own config.json naming, and reloads with
    serving numerics."""
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.quantize.pipeline import quantize

    native = json.loads((quantized("fp8_omni") / "omniquant.json").read_text())
    res = quantize(hub_style, "fp8_omni", tmp_path / "q", calib="synthetic")
    assert res.manifest["shards"] == native["shards"]
    cfg = json.loads((res.out / "config.json").read_text())
    assert "llm_config" in cfg and "text_config" not in cfg
    assert cfg["quantization_config"]["quant_algo"] == "FP8"
    loaded = load_emulated(res.out, dtype="float32")
    assert loaded.emulation

"""Config naming (issue 25): the native <-> released converter, ``make-tiny --naming`` and the
construction check (``omniquant.checkpoint.construction``) on checkpoints in both namings.

The serving stacks' field lists and their source lines live in
``omniquant/models/nemotron_omni_serving.py`` (vLLM 0.33.0 ``nano_nemotron_vl.py`` and its
processor; TensorRT-LLM ``modeling_nemotron_nano.py`` @ ``01a04b9b0f77``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from omniquant.checkpoint.construction import check_construction
from omniquant.checkpoint.readers import READERS
from omniquant.models.nemotron_omni_naming import (
    RELEASED_ARCHITECTURE,
    RELEASED_ONLY,
    naming_of,
    to_native,
    to_released,
)
from omniquant.models.nemotron_omni_serving import FIELDS, reader_view

pytestmark = pytest.mark.usefixtures("one_thread")

#: What stays for a released-naming export of the *tiny* model after conversion: the
#: released model_type is remote code omniquant cannot ship, and vLLM builds RADIO from a
#: timm name whose widths the tiny tower (32 wide, 2 blocks) does not have.
TINY_RELEASED_LEFT = {
    "vllm": {("config_class", "config_class"), ("vision_config.args.model", "missing")},
    "trtllm": {("config_class", "config_class")},
}


def _json(path):
    return json.loads(path.read_text())


def _findings(path, reader):
    return {(f.field, f.kind) for f in check_construction(path, reader).findings}


@pytest.fixture(scope="module")
def released_tiny(tmp_path_factory):
    from omniquant.demo.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("rel") / "model", seed=0, naming="released")


def _get(cfg, path):
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_released_config_carries_every_field_both_readers_read(tiny_dir, which):
    from omniquant.demo import demo_model_dir

    src = tiny_dir if which == "tiny" else demo_model_dir()
    native = _json(src / "config.json")
    released = to_released(native, _json(src / "preprocessor_config.json"))
    assert naming_of(native) == "native" and naming_of(released) == "released"
    assert released["architectures"] == [RELEASED_ARCHITECTURE]
    assert released["model_type"] == RELEASED_ARCHITECTURE
    view = reader_view(released)
    for reader in READERS:
        for field in FIELDS[reader]:
            if field.path == "vision_config.args.model":
                continue  # no timm ViT has these widths (checked below)
            _get(view, field.path)  # KeyError names a field the converter does not write
    # Values come from the source.
    assert released["llm_config"]["hidden_size"] == native["text_config"]["hidden_size"]
    assert released["llm_config"]["hybrid_override_pattern"] == "MEME*EME"
    assert released["vit_hidden_size"] == native["vision_hidden_size"]
    assert released["patch_size"] == native["vision_config"]["patch_size"] == 16
    assert released["img_context_token_id"] == native["image_token_id"]
    assert released["sound_context_token_id"] == native["audio_token_id"]
    assert released["norm_mean"] == native["vision_config"]["norm_mean"]
    assert released["sound_config"]["model_type"] == "parakeet"
    # Keys vLLM passes itself beside **sound_config (a second value is a TypeError).
    assert not {"attention_bias", "scale_input", "max_position_embeddings"} & set(released["sound_config"])
    args = released["vision_config"]["args"]
    n_cls, n_reg = (
        native["vision_config"]["num_cls_tokens"],
        native["vision_config"]["num_registers"],
    )
    assert len(args["teachers"]) == n_cls and args["register_multiple"] == n_cls + n_reg
    assert [t["use_summary"] for t in args["teachers"]] == [True, True, False]
    assert "model" not in args
    assert released["force_image_size"] == RELEASED_ONLY["force_image_size"][0] == 512


def test_real_width_radio_gets_its_timm_name():
    from omniquant.demo.tiny import released_config_dict

    released = to_released(
        {**released_config_dict(), "architectures": ["NemotronH_Omni_Reasoning_V3"]}
    )
    assert released["vision_config"]["args"]["model"] == "vit_huge_patch16_224"
    # 3 class tokens (summary 0, 1) + 7 registers: the released RADIO's register_multiple 10.
    assert released["vision_config"]["args"]["register_multiple"] == 10


def test_native_round_trip_and_idempotence(tiny_dir):
    native = _json(tiny_dir / "config.json")
    pre = _json(tiny_dir / "preprocessor_config.json")
    released = to_released(native, pre)
    back = to_native(released)
    # The only change: force_image_size, null natively, a number for the readers.
    assert back.pop("force_image_size") == 512 and native.pop("force_image_size") is None
    assert back == native
    assert to_released(released, pre) == released


def test_a_released_source_keeps_its_own_values(tiny_dir):
    released = to_released(_json(tiny_dir / "config.json"))
    released["template"] = "nemotron-h-omni"
    released["auto_map"] = {"AutoConfig": "configuration.X"}
    released["vision_config"]["args"]["register_multiple"] = 99
    again = to_released(released)
    assert again["template"] == "nemotron-h-omni"
    assert again["auto_map"] == {"AutoConfig": "configuration.X"}
    assert again["vision_config"]["args"]["register_multiple"] == 99
    assert "auto_map" not in to_native(again)


def test_make_tiny_released_has_the_same_tensors_and_computes_the_same(tiny_dir, released_tiny):
    from omniquant.data.synthetic import synthetic_samples
    from omniquant.models import load_model

    assert (released_tiny / "model.safetensors").read_bytes() == (
        tiny_dir / "model.safetensors"
    ).read_bytes()
    assert naming_of(_json(released_tiny / "config.json")) == "released"
    native, rel = load_model(tiny_dir, dtype="float32"), load_model(released_tiny, dtype="float32")
    assert rel.adapter.placeholder_ids(rel.model) == native.adapter.placeholder_ids(native.model)
    with torch.no_grad():
        for a, b in zip(synthetic_samples(native, 3, seed=2), synthetic_samples(rel, 3, seed=2)):
            assert torch.equal(
                native.adapter.forward(native.model, a).logits,
                rel.adapter.forward(rel.model, b).logits,
            ), a.id


def test_make_tiny_refuses_an_unknown_naming(tmp_path):
    from omniquant.cli import main

    assert main(["make-tiny", "--out", str(tmp_path / "x"), "--naming", "hub"]) != 0


NATIVE_MISSING_VLLM = {
    "force_image_size", "patch_size", "template", "ps_version", "image_tag_type",
    "vit_hidden_size", "vision_config.args", "vision_config.args.model", "norm_mean",
    "norm_std", "use_thumbnail", "sound_config", "sound_config.hidden_size",
    "sound_config.projection_hidden_size", "sound_config.projection_bias",
    "sound_config.sampling_rate", "sound_config.num_mel_bins", "sound_config.subsampling_factor",
    "sound_config.subsampling_conv_kernel_size", "sound_config.subsampling_conv_stride",
}  # fmt: skip
NATIVE_MISSING_TRTLLM = {
    "force_image_size", "patch_size", "ps_version", "vit_hidden_size", "llm_config",
    "llm_config.hidden_size", "llm_config.vocab_size", "img_context_token_id",
    "video_context_token_id", "sound_context_token_id", "sound_config", "img_context_token",
    "video_context_token", "img_start_token", "img_end_token", "sound_context_token",
    "max_sequence_length", "vision_config.args",
}  # fmt: skip


def test_construction_check_names_what_a_native_config_lacks(tiny_dir):
    vllm = check_construction(tiny_dir, "vllm")
    assert set(vllm.missing) == NATIVE_MISSING_VLLM and not vllm.ok
    trt = check_construction(tiny_dir, "trtllm")
    assert set(trt.missing) == NATIVE_MISSING_TRTLLM
    assert ("config_class", "config_class") in _findings(tiny_dir, "trtllm")  # not registered
    assert ("config_class", "config_class") not in _findings(tiny_dir, "vllm")  # registry.py:553


@pytest.mark.parametrize("reader", READERS)
def test_construction_check_on_a_released_tiny(released_tiny, reader):
    assert _findings(released_tiny, reader) == TINY_RELEASED_LEFT[reader]


def test_remote_code_beside_the_config_satisfies_the_config_class(released_tiny, tmp_path):
    ckpt = tmp_path / "rc"
    shutil.copytree(released_tiny, ckpt)
    cfg = _json(ckpt / "config.json")
    cfg["auto_map"] = {"AutoConfig": "configuration.NemotronH_Nano_Omni_Reasoning_V3_Config"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert ("config_class", "config_class") in _findings(ckpt, "trtllm")  # the file is missing
    (ckpt / "configuration.py").write_text("# stands for NVIDIA's remote code\n")
    assert _findings(ckpt, "trtllm") == set()


def _edited(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = _json(dst / "config.json")
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_construction_check_compares_fields_with_the_weights_and_tokenizer(released_tiny, tmp_path):
    def patch14(c):
        c["patch_size"] = 14

    def wrong_token(c):
        c["img_context_token_id"] = c["video_context_token_id"]

    def registers(c):
        c["vision_config"]["args"]["register_multiple"] = 8

    def projector(c):
        c["projector_hidden_size"] *= 2

    def pattern(c):
        c["llm_config"]["hybrid_override_pattern"] += "M"

    def scale_input(c):  # vLLM passes it itself: TypeError (parakeet.py:30-35, seen run)
        c["sound_config"]["scale_input"] = False

    cases = [
        (patch14, "vllm", "patch_size"),
        (wrong_token, "trtllm", "img_context_token_id"),
        (registers, "vllm", "vision_config.args.register_multiple"),
        (projector, "vllm", "projector_hidden_size"),
        (pattern, "vllm", "text_config.hybrid_override_pattern"),
        (scale_input, "vllm", "sound_config.scale_input"),
    ]
    for edit, reader, field in cases:
        bad = _edited(released_tiny, tmp_path / edit.__name__, edit)
        new = _findings(bad, reader) - TINY_RELEASED_LEFT[reader]
        assert (field, "inconsistent") in new, (edit.__name__, new)


def test_placeholders_must_be_single_tokens(released_tiny, tmp_path):
    from omniquant.models.nemotron_omni_serving import construction_findings

    ckpt = tmp_path / "tok"
    shutil.copytree(released_tiny, ckpt)
    from omniquant.checkpoint.construction import _tensor_headers

    findings = construction_findings(
        "vllm", _json(ckpt / "config.json"), _tensor_headers(ckpt),
        lambda s: [1, 2] if s == "<img>" else [7], {"config.json"},
    )  # fmt: skip
    assert ("tokenizer:<img>", "inconsistent") in {(f.field, f.kind) for f in findings}


def test_inspect_as_flags_a_native_checkpoint_naming_missing_fields(tiny_dir, capsys):
    from omniquant.cli import main

    assert main(["inspect", str(tiny_dir), "--as", "vllm"]) == 4
    out = capsys.readouterr().out
    assert (
        "  MISSING patch_size: absent (an integer needed) [model_executor/models/nano_nemotron_vl.py:969"
        in out
    )
    assert (
        "vllm: would NOT construct the model" in out
        and "missing: force_image_size, patch_size" in out
    )
    assert main(["inspect", str(tiny_dir), "--as", "trtllm", "--json"]) == 4
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["construction"]["missing"]) == NATIVE_MISSING_TRTLLM
    assert "reader" not in summary  # BF16: no quantization view


def _remote_code_dir(path, auto_map=True):
    path.mkdir()
    cfg = {"architectures": [RELEASED_ARCHITECTURE]}
    if auto_map:
        cfg["auto_map"] = {
            "AutoConfig": "configuration.NemotronH_Nano_Omni_Reasoning_V3_Config",
            "AutoModelForCausalLM": "modeling.NemotronH_Nano_Omni_Reasoning_V3",
        }
    (path / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration.py", "modeling.py"):
        (path / name).write_text(f"# stands for the released {name}\n")
    return path


def test_quantize_with_remote_code_constructs_for_trtllm(tiny_dir, tmp_path):
    """``remote_code``: the released checkpoint's *.py files and auto_map go into the export;
    the construction check then has nothing left for TensorRT-LLM (vLLM still lacks a timm
    RADIO of the tiny's widths)."""
    from omniquant.quantize.pipeline import quantize

    rc = _remote_code_dir(tmp_path / "rc")
    out = quantize(tiny_dir, "fp8_omni", tmp_path / "q", calib="synthetic", remote_code=rc).out
    assert (out / "configuration.py").read_bytes() == (rc / "configuration.py").read_bytes()
    assert (out / "modeling.py").is_file()
    assert _json(out / "config.json")["auto_map"] == _json(rc / "config.json")["auto_map"]
    assert _findings(out, "trtllm") == set()
    assert _findings(out, "vllm") == {("vision_config.args.model", "missing")}


def test_remote_code_without_auto_map_is_refused_before_calibration(tiny_dir, tmp_path, capsys):
    from omniquant.cli import main

    rc = _remote_code_dir(tmp_path / "rc", auto_map=False)
    code = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni",
                 "--out", str(tmp_path / "q"), "--remote-code", str(rc)])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "--remote-code" in err and "has no auto_map" in err
    assert not (tmp_path / "q").exists()


def test_unknown_config_naming_is_refused_before_calibration(tiny_dir, tmp_path, capsys):
    from omniquant.cli import main

    code = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni",
                 "--out", str(tmp_path / "q"), "--config-naming", "hub"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "--config-naming" in err and "source, released, native" in err
    assert not (tmp_path / "q").exists()

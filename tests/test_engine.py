"""Engine bundles (issue 7): compatibility, bundle files and fields, options schema,
the LLM API calls (against a stand-in ``tensorrt_llm``) and the CLI.

Everything here runs on CPU in well under a second per test: checkpoints are tiny
directories written by ``write_checkpoint`` below, the one place that knows the
checkpoint format (swap it for real quantized tiny checkpoints later).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from omniquant.cli import CLI_NAMES
from omniquant.engine import (
    build_engine_bundle,
    load_llm_api_options,
    validate_engine,
    validate_llm_api_options,
)
from omniquant.errors import EngineError, argument_style
from omniquant.outdir import OUTPUT_MARKER

# --------------------------------------------------------------------------------------
# Fixture: tiny checkpoint directories in the layout omniquant's export writes.
# --------------------------------------------------------------------------------------

EXPERT = "language_model.backbone.layers.1.mixer.experts.0.up_proj"
IN_PROJ = "language_model.backbone.layers.0.mixer.in_proj"
O_PROJ = "language_model.backbone.layers.2.mixer.o_proj"

QUANT_CONFIGS = {
    "bf16": None,
    "fp8": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
    "fp8_bf16kv": {"quant_algo": "FP8", "kv_cache_quant_algo": None},
    "nvfp4": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16},
    "nvfp4_bf16kv": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16},
    "mixed": {
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": "FP8",
        "quantized_layers": {
            EXPERT: {"quant_algo": "NVFP4", "group_size": 16},
            IN_PROJ: {"quant_algo": "FP8"},
            O_PROJ: {"quant_algo": "FP8"},
        },
    },
    "mixed_fp8_only": {
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": "FP8",
        "quantized_layers": {IN_PROJ: {"quant_algo": "FP8"}, O_PROJ: {"quant_algo": "FP8"}},
    },
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(path: Path, kind: str = "fp8") -> Path:
    """A tiny checkpoint: config.json, one real safetensors shard, tokenizer and processor
    files, ``hf_quant_config.json`` (not for bf16) and ``omniquant.json`` with the shard's
    sha256."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    quant = QUANT_CONFIGS[kind]
    config = {
        "architectures": ["NemotronH_Nano_Omni_Reasoning_V3"],
        "model_type": "nemotron_h_omni",
        "llm_config": {"hidden_size": 8},
        "vision_config": {"model_type": "radio"},
        "sound_config": {"model_type": "parakeet"},
    }
    if quant is not None:
        config["quantization_config"] = {"quant_method": "modelopt", **quant}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            f"{EXPERT}.weight": torch.randn(8, 8, generator=gen).to(torch.bfloat16),
            f"{IN_PROJ}.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
            "mlp1.0.weight": torch.randn(8, generator=gen).to(torch.bfloat16),
        },
        str(path / "model.safetensors"),
    )
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 8192}')
    (path / "preprocessor_config.json").write_text('{"patch_size": 16}')
    if quant is not None:
        (path / "hf_quant_config.json").write_text(
            json.dumps(
                {
                    "producer": {"name": "modelopt", "version": "0.47.0"},
                    "quantization": {"exclude_modules": ["lm_head", "vision_model*"], **quant},
                }
            )
        )
    (path / "omniquant.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "shards": {"model.safetensors": _sha256(path / "model.safetensors")},
                "recipe": {"name": f"{kind}_omni"},
            }
        )
    )
    return path


@pytest.fixture
def checkpoint(tmp_path):
    """Factory: ``checkpoint("nvfp4")`` -> path of a fresh tiny checkpoint."""

    def make(kind: str = "fp8") -> Path:
        return write_checkpoint(tmp_path / f"ckpt_{kind}", kind)

    return make


# --------------------------------------------------------------------------------------

# Besides these, the ownership marker that lets --force replace the bundle (issue #20).
BUNDLE_FILES = [
    "bench.sh",
    "bundle.json",
    "checkpoint",
    "eval.sh",  # issue 15
    "llm_api_options.yaml",
    "serve.sh",
    "vllm_serve.sh",
]
CHECKPOINT_FILES = [
    "config.json", "hf_quant_config.json", "model.safetensors", "omniquant.json",
    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
]  # fmt: skip


def expected_options(
    kv_dtype: str, moe_backend: str, max_batch_size: int = 8, max_seq_len: int = 8192
):
    sizes = {8: [1, 2, 4, 8], 12: [1, 2, 4, 8, 12]}[max_batch_size]
    return {
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "enable_chunked_prefill": False,
        "kv_cache_config": {
            "dtype": kv_dtype,
            "mamba_ssm_cache_dtype": "float32",
            "enable_block_reuse": False,
            "free_gpu_memory_fraction": 0.6,
        },
        "cuda_graph_config": {
            "batch_sizes": sizes,
            "max_batch_size": max_batch_size,
            "enable_padding": True,
        },
        "moe_config": {"backend": moe_backend},
    }


def check_bundle(out: Path, src: Path, *, target, sm, precision, kv_dtype, moe, vllm_fp8, rate=None,
                 max_batch_size=8, max_seq_len=8192):  # fmt: skip
    """Every file and field of a copied bundle."""
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, *BUNDLE_FILES])
    assert not list(out.parent.glob(f".{out.name}.*")), "staging directory left behind"

    # checkpoint/: a byte-identical copy, not a link
    ckpt = out / "checkpoint"
    assert ckpt.is_dir() and not ckpt.is_symlink()
    expected_files = [f for f in CHECKPOINT_FILES if (src / f).exists()]
    assert sorted(p.name for p in ckpt.iterdir()) == expected_files
    for name in expected_files:
        assert (ckpt / name).read_bytes() == (src / name).read_bytes()

    # llm_api_options.yaml: exact content, and it passes the schema
    options = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    assert options == expected_options(kv_dtype, moe, max_batch_size, max_seq_len)
    assert load_llm_api_options(out / "llm_api_options.yaml").to_dict() == options

    # bundle.json
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["target"] == target and manifest["sm"] == sm
    assert manifest["precision"] == precision
    assert manifest["quantization"]["kv_cache_dtype"] == kv_dtype
    assert manifest["model"] == {
        "model_type": "nemotron_h_omni",
        "architectures": ["NemotronH_Nano_Omni_Reasoning_V3"],
        "modalities": ["text", "image", "video", "audio"],
    }
    shard_sha = _sha256(src / "model.safetensors")
    assert manifest["checkpoint"]["path"] == "checkpoint"
    assert manifest["checkpoint"]["source"] == str(src.resolve())
    assert manifest["checkpoint"]["mode"] == "copy"
    assert manifest["checkpoint"]["verified_against"] == "omniquant.json"
    assert manifest["checkpoint"]["shards"] == {"model.safetensors": shard_sha}
    assert manifest["checkpoint"]["sha256"] == {f: _sha256(src / f) for f in expected_files}
    assert manifest["checkpoint"]["recipe"] == {"name": f"{precision}_omni"} or precision == "bf16"
    versions = manifest["versions"]
    assert versions["omniquant"] == "0.1.0"
    assert versions["tensorrt_llm_min"] == "1.3.0rc13"
    assert versions["tensorrt_llm_installed"] is None
    assert manifest["options_file"] == "llm_api_options.yaml"
    assert manifest["options"] == options
    assert manifest["video_pruning_rate"] == rate
    assert manifest["scripts"] == ["bench.sh", "eval.sh", "serve.sh", "vllm_serve.sh"]
    assert manifest["engine_validated"] is False
    assert manifest["validation"] is None
    assert manifest["warnings"] == []
    assert "run only on a GPU host with tensorrt_llm >= 1.3.0rc13 installed" in manifest["note"]
    assert "tensorrt_llm is not installed" in manifest["note"]

    # commands, and the scripts that run them
    cmds = manifest["commands"]
    env = {"TLLM_VIDEO_PRUNING_RATIO": format(rate, "g")} if rate is not None else {}
    assert cmds["env"] == env
    assert cmds["serve"] == (
        "trtllm-serve serve checkpoint --trust_remote_code --extra_llm_api_options "
        f"llm_api_options.yaml --max_batch_size {max_batch_size} --max_seq_len {max_seq_len}"
    )
    assert cmds["bench"].startswith(
        "trtllm-bench --model checkpoint --model_path checkpoint throughput --backend pytorch "
        "--extra_llm_api_options llm_api_options.yaml --dataset bench_dataset.jsonl "
        f"--max_batch_size {max_batch_size} --max_seq_len {max_seq_len}"
    )
    assert cmds["bench_dataset"].startswith(
        "trtllm-bench --model checkpoint prepare-dataset --trust-remote-code"
    )
    vllm = (
        f"vllm serve checkpoint --trust-remote-code --max-num-seqs {max_batch_size} "
        f"--max-model-len {max_seq_len} --mamba-ssm-cache-dtype float32"
    )
    if vllm_fp8:
        vllm += " --kv-cache-dtype fp8"
    if rate is not None:
        vllm += f" --video-pruning-rate {format(rate, 'g')}"
    assert cmds["vllm_serve"] == vllm
    assert cmds["validate"] == (
        f"python -c \"from omniquant.engine import validate_engine; validate_engine('{out}')\""
    )
    for name in manifest["scripts"]:
        script = out / name
        assert script.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail\n" in text
        assert f"for {target} (SM{sm}), precision {precision}." in text
        has_env = f"export TLLM_VIDEO_PRUNING_RATIO={format(rate, 'g')}" in text if rate else False
        # eval.sh starts serve.sh, which sets the variable itself (issue 15)
        assert has_env == (rate is not None and name not in ("vllm_serve.sh", "eval.sh"))
    assert f'exec {cmds["serve"]} "$@"' in (out / "serve.sh").read_text()
    assert f'exec {cmds["vllm_serve"]} "$@"' in (out / "vllm_serve.sh").read_text()
    bench_sh = (out / "bench.sh").read_text()
    assert cmds["bench"].replace("bench_dataset.jsonl", '"$DATASET"') in bench_sh
    assert cmds["bench_dataset"].replace("bench_dataset.jsonl", '"$DATASET"') in bench_sh
    return manifest


# --------------------------------------------------------------------------------------
# Bundles that build
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, sm, moe, rate",
    [("hopper", 90, "CUTLASS", None), ("blackwell", 100, "TRTLLM", 0.5)],
)
def test_fp8_bundle(checkpoint, tmp_path, target, sm, moe, rate):
    src = checkpoint("fp8")
    out = tmp_path / "bundles" / f"fp8_{target}"
    out.parent.mkdir()  # the output's parent must exist (omniquant.outdir.check_out)
    result = build_engine_bundle(src, target, out, video_pruning_rate=rate)
    manifest = check_bundle(
        out,
        src,
        target=target,
        sm=sm,
        precision="fp8",
        kv_dtype="fp8",
        moe=moe,
        vllm_fp8=True,
        rate=rate,
    )
    assert manifest["quantization"] == {
        "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "kv_cache_dtype": "fp8",
        "group_size": None, "layer_algos": {}, "nvfp4_layers": 0,
    }  # fmt: skip
    assert manifest["versions"]["checkpoint_producer"] == {"name": "modelopt", "version": "0.47.0"}
    assert result.path == out and result.target == target and result.sm == sm
    assert (result.precision, result.kv_cache_dtype, result.moe_backend) == ("fp8", "fp8", moe)
    assert result.checkpoint_mode == "copy" and result.engine_validated is False
    assert result.files == tuple(BUNDLE_FILES)
    assert result.options == manifest["options"] and result.commands == manifest["commands"]


def test_nvfp4_bundle_on_blackwell(checkpoint, tmp_path):
    src = checkpoint("nvfp4")
    out = tmp_path / "nvfp4_bw"
    build_engine_bundle(src, "blackwell", out, max_batch_size=12, max_seq_len=4096)
    manifest = check_bundle(
        out, src, target="blackwell", sm=100, precision="nvfp4", kv_dtype="fp8", moe="TRTLLM",
        vllm_fp8=True, max_batch_size=12, max_seq_len=4096,
    )  # fmt: skip
    assert manifest["quantization"]["quant_algo"] == "NVFP4"
    assert manifest["quantization"]["group_size"] == 16


def test_mixed_bundle_on_blackwell(checkpoint, tmp_path):
    src = checkpoint("mixed")
    out = tmp_path / "mixed_bw"
    build_engine_bundle(src, "blackwell", out)
    manifest = check_bundle(
        out,
        src,
        target="blackwell",
        sm=100,
        precision="mixed",
        kv_dtype="fp8",
        moe="TRTLLM",
        vllm_fp8=True,
    )
    assert manifest["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert manifest["quantization"]["layer_algos"] == {"FP8": 2, "NVFP4": 1}
    assert manifest["quantization"]["nvfp4_layers"] == 1


def test_bf16_and_fp8_only_mixed_bundles_on_hopper(checkpoint, tmp_path):
    src = checkpoint("bf16")
    check_bundle_result = build_engine_bundle(src, "hopper", tmp_path / "bf16")
    manifest = check_bundle(
        tmp_path / "bf16", src, target="hopper", sm=90, precision="bf16", kv_dtype="auto",
        moe="CUTLASS", vllm_fp8=False,
    )  # fmt: skip
    assert manifest["quantization"]["quant_algo"] is None
    assert check_bundle_result.kv_cache_dtype == "auto"
    # MIXED_PRECISION without NVFP4 layers runs on Hopper
    assert (
        build_engine_bundle(checkpoint("mixed_fp8_only"), "hopper", tmp_path / "m").precision
        == "mixed"
    )


def test_fp8_without_fp8_kv_cache(checkpoint, tmp_path):
    result = build_engine_bundle(checkpoint("fp8_bf16kv"), "hopper", tmp_path / "b")
    assert result.options["kv_cache_config"]["dtype"] == "auto"
    assert "--kv-cache-dtype" not in result.commands["vllm_serve"]


def test_nvfp4_without_fp8_kv_scales_warns_about_vllms_unit_scales(checkpoint, tmp_path):
    result = build_engine_bundle(checkpoint("nvfp4_bf16kv"), "blackwell", tmp_path / "b")
    assert result.options["kv_cache_config"]["dtype"] == "auto"
    assert "--kv-cache-dtype fp8" in result.commands["vllm_serve"]  # vLLM's NVFP4 path needs it
    (warning,) = [w for w in result.warnings if "NVFP4 without FP8 KV scales" in w]
    assert "unit k/v scales" in warning and "quantization.kv_cache=fp8" in warning


def test_unknown_architecture_is_a_warning(checkpoint, tmp_path):
    src = checkpoint("fp8")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["NemotronH_Omni_Reasoning_V3"]  # transformers' native class
    (src / "config.json").write_text(json.dumps(config))
    result = build_engine_bundle(src, "blackwell", tmp_path / "b")
    expected = (
        f"{src.resolve() / 'config.json'}: architectures ['NemotronH_Omni_Reasoning_V3'] has none "
        "of NemotronH_Nano_Omni_Reasoning_V3, NemotronH_Nano_VL_V2, the names TensorRT-LLM "
        "registers for this model family; loading will fail with 'Unknown architecture' unless "
        "the checkpoint carries the hub config.json"
    )
    assert result.warnings == (expected,)
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["warnings"] == [expected]


def test_link_mode_symlinks_and_verifies(checkpoint, tmp_path):
    src = checkpoint("fp8")
    out = tmp_path / "linked"
    result = build_engine_bundle(src, "hopper", out, link=True)
    assert (out / "checkpoint").is_symlink()
    assert (out / "checkpoint").resolve() == src.resolve()
    manifest = json.loads((out / "bundle.json").read_text())
    assert result.checkpoint_mode == manifest["checkpoint"]["mode"] == "link"
    assert manifest["checkpoint"]["shards"] == {
        "model.safetensors": _sha256(src / "model.safetensors")
    }


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


def test_nvfp4_on_hopper_suggests_fp8_recipe(checkpoint, tmp_path):
    src = checkpoint("nvfp4")
    out = tmp_path / "nope"
    with pytest.raises(EngineError) as err:
        build_engine_bundle(src, "hopper", out)
    assert str(err.value) == (
        f'{src.resolve()}: is NVFP4 (hf_quant_config.json quantization.quant_algo = "NVFP4"), '
        "and NVFP4 GEMMs need Blackwell (SM100+); target hopper is SM90. Build with --target "
        "blackwell, or quantize again with the FP8 recipe (--recipe fp8_omni), which runs on "
        "Hopper and Blackwell."
    )
    assert not out.exists()


def test_mixed_with_nvfp4_on_hopper_fails(checkpoint, tmp_path):
    src = checkpoint("mixed")
    with pytest.raises(EngineError) as err:
        build_engine_bundle(src, "hopper", tmp_path / "nope")
    assert str(err.value).startswith(
        f"{src.resolve()}: is MIXED_PRECISION with 1 NVFP4 layer(s) (hf_quant_config.json "
        f"quantization.quantized_layers, e.g. '{EXPERT}'), and NVFP4 GEMMs need Blackwell"
    )
    assert "(--recipe fp8_omni)" in str(err.value)


def test_checksum_mismatch_names_the_shard(checkpoint, tmp_path):
    src = checkpoint("fp8")
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # corrupt after omniquant.json recorded the digest
    shard.write_bytes(bytes(data))
    out = tmp_path / "b"
    with pytest.raises(EngineError) as err:
        build_engine_bundle(src, "blackwell", out)
    message = str(err.value)
    assert message.startswith(f"{shard.resolve()}: sha256 {_sha256(shard)} does not match ")
    assert "recorded in omniquant.json" in message
    assert not out.exists()
    assert not list(tmp_path.glob(".b.*")), "staging directory left behind"


def test_unlisted_shard_is_refused(checkpoint, tmp_path):
    src = checkpoint("fp8")
    (src / "model-extra.safetensors").write_bytes(b"x")
    with pytest.raises(EngineError, match="model-extra.safetensors: not listed in omniquant.json"):
        build_engine_bundle(src, "blackwell", tmp_path / "b")


def test_existing_out_needs_force(checkpoint, tmp_path):
    src = checkpoint("fp8")
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(EngineError) as err:
        build_engine_bundle(src, "hopper", out)
    # One output-directory policy (omniquant.outdir.check_out) for every stage: the
    # bundle's message is quantize's.
    with argument_style(CLI_NAMES):  # as `omniquant build-engine` prints it
        assert str(err.value) == f"--out {out}: already exists; pass --force to overwrite it."
    assert str(err.value) == f"out {out}: already exists; pass force to overwrite it."
    assert (out / "keep.txt").exists()
    # force never deletes a file omniquant did not write (issue #20): refused, kept ...
    with pytest.raises(EngineError, match=r"holds files omniquant did not write \(keep.txt\)"):
        build_engine_bundle(src, "hopper", out, force=True)
    assert (out / "keep.txt").read_text() == "old"
    # ... while an empty directory and a previous bundle are replaced.
    (out / "keep.txt").unlink()
    build_engine_bundle(src, "hopper", out, force=True)
    build_engine_bundle(src, "hopper", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, *BUNDLE_FILES])
    assert not list(tmp_path.glob(".b.*"))


def test_out_inside_checkpoint_is_refused(checkpoint):
    src = checkpoint("fp8")
    with pytest.raises(EngineError, match="must not contain, or be inside, the checkpoint"):
        build_engine_bundle(src, "hopper", src / "bundle")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        # Python callers read the argument's name; the CLI prints its flag (the corpus).
        ({"video_pruning_rate": 1.0}, "video_pruning_rate 1.0: must be in [0, 1)"),
        ({"max_batch_size": 0}, "max_batch_size 0: must be a positive integer"),
        ({"max_seq_len": 8}, "max_seq_len 8: must be an integer >= 16"),
    ],
)
def test_bad_arguments(checkpoint, tmp_path, kwargs, fragment):
    with pytest.raises(EngineError) as err:
        build_engine_bundle(checkpoint("fp8"), "hopper", tmp_path / "b", **kwargs)
    assert fragment in str(err.value)


def test_unsupported_quant_algo_names_field(checkpoint, tmp_path):
    src = checkpoint("fp8")
    qc = json.loads((src / "hf_quant_config.json").read_text())
    qc["quantization"]["quant_algo"] = "W4A8_AWQ"
    (src / "hf_quant_config.json").write_text(json.dumps(qc))
    with pytest.raises(EngineError) as err:
        build_engine_bundle(src, "blackwell", tmp_path / "b")
    assert str(err.value) == (
        f"{src.resolve() / 'hf_quant_config.json'}: quantization.quant_algo = 'W4A8_AWQ' is not "
        "supported for engine bundles; allowed: FP8, NVFP4, MIXED_PRECISION"
    )


# --------------------------------------------------------------------------------------
# Options schema
# --------------------------------------------------------------------------------------


def test_options_schema_rejects_typo_keys():
    good = expected_options("fp8", "TRTLLM")
    assert validate_llm_api_options(good, "x.yaml").to_dict() == good

    nested = json.loads(json.dumps(good))
    nested["kv_cache_config"]["mamba_ssm_cache_dtyp"] = nested["kv_cache_config"].pop(
        "mamba_ssm_cache_dtype"
    )
    with pytest.raises(EngineError) as err:
        validate_llm_api_options(nested, "opts.yaml")
    assert str(err.value) == (
        "opts.yaml: invalid LLM API options: kv_cache_config.mamba_ssm_cache_dtype: required key "
        "missing; kv_cache_config.mamba_ssm_cache_dtyp: unknown key; did you mean "
        "'mamba_ssm_cache_dtype'? (allowed here: dtype, mamba_ssm_cache_dtype, enable_block_reuse, "
        "free_gpu_memory_fraction). Fix the key (names as in TensorRT-LLM's LLM API reference) "
        "or rebuild the bundle"
    )

    top = dict(good, enable_chunked_prefil=False)
    with pytest.raises(
        EngineError,
        match=r"enable_chunked_prefil: unknown key; did you mean 'enable_chunked_prefill'",
    ):
        validate_llm_api_options(top, "opts.yaml")


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (
            ("kv_cache_config", "mamba_ssm_cache_dtype"),
            "fp32",
            "kv_cache_config.mamba_ssm_cache_dtype: Input should be",
        ),
        (
            ("kv_cache_config", "free_gpu_memory_fraction"),
            1.5,
            "free_gpu_memory_fraction: Input should be less",
        ),
        (
            ("kv_cache_config", "enable_block_reuse"),
            "no",
            "enable_block_reuse: Input should be a valid boolean",
        ),
        (("moe_config", "backend"), "trtllm", "moe_config.backend: Input should be"),
        (("cuda_graph_config", "max_batch_size"), 16, "must equal max(batch_sizes) 8"),
    ],
)
def test_options_schema_rejects_bad_values(path, value, fragment):
    data = expected_options("fp8", "TRTLLM")
    data[path[0]][path[1]] = value
    with pytest.raises(EngineError) as err:
        validate_llm_api_options(data, "opts.yaml")
    assert fragment in str(err.value)


def test_hand_edited_options_file_is_caught(checkpoint, tmp_path):
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("fp8"), "blackwell", out)
    path = out / "llm_api_options.yaml"
    path.write_text(path.read_text().replace("enable_padding", "enable_paddding"))
    with pytest.raises(EngineError, match=r"cuda_graph_config.enable_paddding: unknown key"):
        load_llm_api_options(path)


# --------------------------------------------------------------------------------------
# LLM API calls, against a stand-in tensorrt_llm (checks the calls omniquant makes only)
# --------------------------------------------------------------------------------------


class _FakeLLM:
    instances: ClassVar[list[_FakeLLM]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.env_at_init = os.environ.get("TLLM_VIDEO_PRUNING_RATIO")
        self.generate_calls = []
        self.shut_down = False
        self.tokenizer = "tokenizer-object"
        _FakeLLM.instances.append(self)

    def generate(self, inputs, sampling_params):
        self.generate_calls.append((inputs, sampling_params))
        completion = types.SimpleNamespace(text=" a reply", token_ids=[5, 6, 7])
        return [types.SimpleNamespace(outputs=[completion])]

    def shutdown(self):
        self.shut_down = True


@pytest.fixture
def fake_trtllm(monkeypatch):
    """Install a stand-in ``tensorrt_llm`` and a fake SM100 GPU; returns the loader call log."""
    loader_calls = []

    def default_multimodal_input_loader(**kwargs):
        loader_calls.append(kwargs)
        return [
            {"prompt": kwargs["prompts"][0], "multi_modal_data": {kwargs["modality"]: ["data"]}}
        ]

    trt = types.ModuleType("tensorrt_llm")
    trt.__version__ = "1.3.0rc13"
    trt.LLM = _FakeLLM
    trt.SamplingParams = lambda **kw: ("SamplingParams", kw)
    inputs = types.ModuleType("tensorrt_llm.inputs")
    inputs.default_multimodal_input_loader = default_multimodal_input_loader
    trt.inputs = inputs
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.inputs", inputs)
    monkeypatch.setattr("omniquant.engine.validate._cuda_device", lambda: ("NVIDIA B200", 100))
    monkeypatch.delenv("TLLM_VIDEO_PRUNING_RATIO", raising=False)
    _FakeLLM.instances.clear()
    return trt, loader_calls


def _media(tmp_path) -> dict[str, Path]:
    media = {}
    for kind, name in [("image", "a.png"), ("video", "a.mp4"), ("audio", "a.wav")]:
        media[kind] = tmp_path / name
        media[kind].write_bytes(b"stand-in")
    return media


def test_validate_engine_calls_llm_api(checkpoint, tmp_path, fake_trtllm, monkeypatch):
    _, loader_calls = fake_trtllm
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("nvfp4"), "blackwell", out, video_pruning_rate=0.5)
    media = _media(tmp_path)
    monkeypatch.setenv("TLLM_VIDEO_PRUNING_RATIO", "0")  # restored after the test

    report = validate_engine(out, media=media, max_tokens=16)

    (llm,) = _FakeLLM.instances
    options = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    assert llm.kwargs == {"model": str(out / "checkpoint"), "trust_remote_code": True, **options}
    assert llm.env_at_init == "0.5"  # EVS ratio set from bundle.json before the engine loads
    prompts = [inputs for inputs, _ in llm.generate_calls]
    assert prompts[:2] == [["Hello."], ["Name the three primary colours of light in one sentence."]]
    assert all(sp == ("SamplingParams", {"max_tokens": 16}) for _, sp in llm.generate_calls)
    assert len(prompts) == 5 and llm.shut_down
    assert [c["modality"] for c in loader_calls] == ["image", "video", "audio"]
    for call in loader_calls:
        assert call["tokenizer"] == "tokenizer-object"
        assert call["model_dir"] == str(out / "checkpoint")
        assert call["model_type"] == "nemotron_h_omni"
        assert call["media"] == [str(media[call["modality"]])]
        assert call["device"] == "cuda" and call["num_frames"] == 8
    assert prompts[2:] == [
        [{"prompt": c["prompts"][0], "multi_modal_data": {c["modality"]: ["data"]}}]
        for c in loader_calls
    ]

    assert report.engine_validated and report.device == "NVIDIA B200" and report.sm == 100
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["engine_validated"] is True
    assert (
        manifest["note"]
        == "engine loaded and smoke-tested on NVIDIA B200 (SM100) with tensorrt_llm 1.3.0rc13"
    )
    assert manifest["versions"]["tensorrt_llm_installed"] == "1.3.0rc13"
    validation = manifest["validation"]
    assert validation["tensorrt_llm_version"] == "1.3.0rc13"
    assert validation["video_pruning_ratio_env"] == "0.5"
    assert [s["modality"] for s in validation["smoke"]] == ["text", "image", "video", "audio"]
    for entry in validation["smoke"]:
        assert entry["output_text"] == " a reply" and entry["output_tokens"] == 3 and entry["ok"]
        assert entry["latency_s"] >= 0
    assert validation["load_s"] >= 0 and validation["warmup_s"] >= 0


def test_validate_engine_refuses_older_gpu(checkpoint, tmp_path, fake_trtllm, monkeypatch):
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("nvfp4"), "blackwell", out)
    monkeypatch.setattr("omniquant.engine.validate._cuda_device", lambda: ("NVIDIA H100", 90))
    with pytest.raises(
        EngineError,
        match=r"bundle targets blackwell \(SM100\), but this GPU is NVIDIA H100 \(SM90\)",
    ):
        validate_engine(out, media=_media(tmp_path))
    assert not _FakeLLM.instances


def test_validate_engine_refuses_trtllm_moe_kernels_off_sm100(
    checkpoint, tmp_path, fake_trtllm, monkeypatch
):
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("nvfp4"), "blackwell", out)
    monkeypatch.setattr("omniquant.engine.validate._cuda_device", lambda: ("RTX PRO 6000", 120))
    with pytest.raises(EngineError, match=r"built for SM100/SM103 only.*SM120.*backend: CUTLASS"):
        validate_engine(out, media=_media(tmp_path))
    assert not _FakeLLM.instances


def test_validate_engine_records_load_failure(checkpoint, tmp_path, fake_trtllm):
    trt, _ = fake_trtllm
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("fp8"), "hopper", out)

    def broken(**kwargs):
        raise RuntimeError("Unknown architecture")

    trt.LLM = broken
    with pytest.raises(
        EngineError,
        match="the engine failed on NVIDIA B200 with tensorrt_llm 1.3.0rc13: RuntimeError: Unknown architecture",
    ):
        validate_engine(out, media=_media(tmp_path))
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["engine_validated"] is False
    assert manifest["validation"]["error"] == "RuntimeError: Unknown architecture"


def test_validate_engine_refuses_old_tensorrt_llm(checkpoint, tmp_path, fake_trtllm):
    trt, _ = fake_trtllm
    trt.__version__ = "1.2.1"
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("fp8"), "hopper", out)
    with pytest.raises(
        EngineError,
        match=r"tensorrt_llm 1.2.1 is installed; Nemotron omni models need >= 1.3.0rc13",
    ):
        validate_engine(out, media=_media(tmp_path))


def test_validate_engine_rejects_unknown_media_key(checkpoint, tmp_path, fake_trtllm):
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("fp8"), "hopper", out)
    with pytest.raises(EngineError, match="media key 'images' is not a smoke-test modality"):
        validate_engine(out, media={"images": tmp_path / "a.png"})


def test_validate_engine_without_tensorrt_llm(checkpoint, tmp_path):
    out = tmp_path / "b"
    build_engine_bundle(checkpoint("fp8"), "hopper", out)
    with pytest.raises(EngineError, match="the engine warm-up runs only on a GPU host"):
        validate_engine(out)


def test_smoke_media_image_and_audio(tmp_path):
    import soundfile
    from PIL import Image

    from omniquant.engine.validate import write_smoke_media

    paths = write_smoke_media(tmp_path, ("image", "audio"))
    assert Image.open(paths["image"]).size == (448, 448)
    audio, rate = soundfile.read(paths["audio"])
    assert rate == 16000 and audio.shape == (32000,)


def test_smoke_media_video_decodes(tmp_path):
    """The smoke video is written with PyAV (a declared dependency) and decodes to 32 frames."""
    import av

    from omniquant.engine.validate import write_smoke_media

    paths = write_smoke_media(tmp_path, ("video",))
    with av.open(str(paths["video"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 32 and frames[0].shape == (448, 448, 3)
    # the green square moves left to right: its centre column grows
    cols = [f[224, :, 1].argmax() for f in (frames[0], frames[-1])]
    assert cols[0] < cols[1]


# --------------------------------------------------------------------------------------
# CLI and import hygiene
# --------------------------------------------------------------------------------------


def test_cli_build_engine(checkpoint, tmp_path, capsys):
    from omniquant.cli import main

    src = checkpoint("nvfp4")
    out = tmp_path / "cli_bundle"
    rc = main([
        "build-engine", "--checkpoint", str(src), "--target", "blackwell", "--out", str(out),
        "--max-batch-size", "12", "--max-seq-len", "4096", "--video-pruning-rate", "0.5",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert (
        "bundle for blackwell (SM100): precision nvfp4, KV cache fp8, MoE backend TRTLLM" in printed
    )
    assert f"wrote {out}" in printed
    assert "engine warm-up and smoke test not run here: tensorrt_llm is not installed." in printed
    assert "They run on the GPU host with tensorrt_llm installed" in printed
    check_bundle(
        out, src, target="blackwell", sm=100, precision="nvfp4", kv_dtype="fp8", moe="TRTLLM",
        vllm_fp8=True, rate=0.5, max_batch_size=12, max_seq_len=4096,
    )  # fmt: skip

    rc = main(
        [
            "build-engine",
            "--checkpoint",
            str(src),
            "--target",
            "hopper",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith(f"error: {src.resolve()}: is NVFP4")
    assert "(--recipe fp8_omni)" in captured.err and "Traceback" not in captured.err

    rc = main(
        ["build-engine", "--checkpoint", str(src), "--target", "blackwell", "--out", str(out)]
    )
    assert rc == 2 and "pass --force to overwrite it" in capsys.readouterr().err


def test_import_does_not_pull_tensorrt_llm():
    code = (
        "import sys, omniquant, omniquant.engine; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt_llm', 'torch')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_build_engine_validates_where_it_can(
    checkpoint, tmp_path, capsys, fake_trtllm, monkeypatch
):
    def fake_media(directory, modalities):
        return {kind: path for kind, path in _media(tmp_path).items() if kind in modalities}

    monkeypatch.setattr("omniquant.engine.validate.write_smoke_media", fake_media)
    from omniquant.cli import main

    out = tmp_path / "b"
    rc = main(
        [
            "build-engine",
            "--checkpoint",
            str(checkpoint("fp8")),
            "--target",
            "blackwell",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "engine validated on NVIDIA B200 (load " in printed
    assert "  audio   3 tokens in " in printed
    assert json.loads((out / "bundle.json").read_text())["engine_validated"] is True
    assert len(_FakeLLM.instances) == 1

    rc = main(["build-engine", "--checkpoint", str(checkpoint("bf16")), "--target", "hopper",
               "--out", str(tmp_path / "c"), "--no-validate"])  # fmt: skip
    assert (
        rc == 0
        and "engine warm-up and smoke test skipped (--no-validate)" in capsys.readouterr().out
    )
    assert len(_FakeLLM.instances) == 1


def test_bundles_from_real_quantized_checkpoints(quantized, tmp_path):
    """End to end with checkpoints omniquant itself exported (not hand-written fixtures)."""
    from omniquant.errors import EngineError

    fp8 = build_engine_bundle(quantized("fp8_omni"), "hopper", tmp_path / "fp8_hopper")
    options = yaml.safe_load((fp8.path / "llm_api_options.yaml").read_text())
    assert options["kv_cache_config"]["dtype"] == "fp8"
    assert options["kv_cache_config"]["mamba_ssm_cache_dtype"] == "float32"
    bundle = json.loads((fp8.path / "bundle.json").read_text())
    assert bundle["precision"] == "fp8" and bundle["target"] == "hopper"

    with pytest.raises(EngineError, match="fp8_omni"):
        build_engine_bundle(quantized("nvfp4_omni"), "hopper", tmp_path / "nv_hopper")
    nv = build_engine_bundle(quantized("nvfp4_omni"), "blackwell", tmp_path / "nv_bw")
    assert json.loads((nv.path / "bundle.json").read_text())["precision"] == "mixed"

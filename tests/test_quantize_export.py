"""quantize -> export -> audit on the tiny model: layout, formats, manifests, safety."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omniquant.checkpoint.audit import audit_checkpoint
from omniquant.checkpoint.inspect import inspect_checkpoint
from omniquant.cli import main
from omniquant.errors import AuditError

SCALE_LEAVES = {"weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale"}


def _tensors(d):
    return load_file(str(d / "model.safetensors"))


def test_fp8_names_formats_and_untouched_towers(tiny_dir, quantized):
    out = quantized("fp8_omni")
    src, dst = _tensors(tiny_dir), _tensors(out)
    assert set(src) <= set(dst)
    extra = set(dst) - set(src)
    assert extra and all(k.rsplit(".", 1)[-1] in SCALE_LEAVES for k in extra)
    for k in extra:  # every scale sits beside a source tensor
        base = k.rsplit(".", 1)[0]
        assert f"{base}.weight" in src

    fp8 = {k for k, v in dst.items() if v.dtype == torch.float8_e4m3fn}
    expect = set()
    for layer in (1, 3, 5, 7):
        for e in range(8):
            for p in ("up_proj", "down_proj"):
                expect.add(f"language_model.backbone.layers.{layer}.mixer.experts.{e}.{p}.weight")
        for p in ("up_proj", "down_proj"):
            expect.add(f"language_model.backbone.layers.{layer}.mixer.shared_experts.{p}.weight")
    # Mamba layer 0 is FP8; layers 2 and 6 neighbour the attention layer 4 and stay BF16.
    expect |= {
        f"language_model.backbone.layers.0.mixer.{p}.weight" for p in ("in_proj", "out_proj")
    }
    assert fp8 == expect
    for k in fp8:
        base = k[: -len(".weight")]
        assert (
            dst[f"{base}.weight_scale"].dtype == torch.float32
            and dst[f"{base}.weight_scale"].numel() == 1
        )
        assert dst[f"{base}.input_scale"].dtype == torch.float32
    assert "language_model.backbone.layers.4.mixer.k_proj.k_scale" in dst
    assert "language_model.backbone.layers.4.mixer.v_proj.v_scale" in dst

    untouched_prefixes = (
        "vision_model.",
        "sound_encoder.",
        "mlp1.",
        "sound_projection.",
        "language_model.lm_head.",
    )
    checked = 0
    for k, v in src.items():
        if k not in fp8:
            assert dst[k].dtype == v.dtype and torch.equal(
                dst[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
            ), k
            checked += k.startswith(untouched_prefixes)
    assert checked > 50


def test_fp8_quant_configs(tiny_dir, quantized):
    out = quantized("fp8_omni")
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "FP8" and hq["kv_cache_quant_algo"] == "FP8"
    assert "quantized_layers" not in hq
    excl = set(hq["exclude_modules"])
    with safe_open(tiny_dir / "model.safetensors", "pt") as fh:
        # Every weight of >= 2 dims: Linears, and conv1d (TensorRT-LLM keeps it in a Linear).
        linear_like = {
            k[:-7]
            for k in fh.keys()  # noqa: SIM118 (a safetensors handle is not iterable)
            if k.endswith(".weight") and len(fh.get_slice(k).get_shape()) >= 2
        }
    quantized_mods = {k[:-7] for k, v in _tensors(out).items() if v.dtype == torch.float8_e4m3fn}
    assert excl == linear_like - quantized_mods
    for needle in ("vision_model.radio_model.model.blocks.0.attn.qkv", "sound_encoder.encoder.layers.0.self_attn.q_proj",
                   "mlp1.1", "sound_projection.linear1", "language_model.lm_head",
                   "language_model.backbone.layers.1.mixer.gate", "language_model.backbone.layers.2.mixer.in_proj",
                   "language_model.backbone.layers.0.mixer.conv1d"):  # fmt: skip
        assert needle in excl
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((tiny_dir / "config.json").read_text())
    # config.json carries modelopt's converter output (the shape vLLM reads), not the legacy one.
    block = cfg.pop("quantization_config")
    assert block == {
        "config_groups": {
            "group_0": {
                "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                "targets": ["Linear"],
            }
        },
        "ignore": hq["exclude_modules"],
        "quant_algo": "FP8",
        "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
        "producer": json.loads((out / "hf_quant_config.json").read_text())["producer"],
        "quant_method": "modelopt",
    }
    # The rest of config.json is the source's in the released naming (issue 25's default),
    # and the processor config gains the released keys; the other files are copied.
    from omniquant.models.nemotron_omni_naming import released_preprocessor, to_released

    src_pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert cfg == to_released(src_cfg, src_pre)
    assert json.loads((out / "preprocessor_config.json").read_text()) == released_preprocessor(
        src_pre, src_cfg
    )
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_dir / f).read_bytes()


def test_manifest_fields(quantized):
    out = quantized("fp8_omni")
    meta = json.loads((out / "omniquant.json").read_text())
    assert meta["recipe"]["name"] == "fp8_omni" and len(meta["recipe_sha256"]) == 64
    assert set(meta["versions"]) == {"torch", "transformers", "modelopt", "omniquant"}
    cal = meta["calibration"]
    assert cal["samples"] == 16
    assert set(cal["tokens_by_modality"]) == {"text", "image", "video", "audio"}
    assert all(v > 0 for v in cal["tokens_by_modality"].values())
    assert len(cal["expert_tokens"]) == 4 and all(
        len(v) == 8 for v in cal["expert_tokens"].values()
    )
    assert (
        meta["quantized"]["routed_experts"] == "fp8" and meta["quantized"]["vision_tower"] == "bf16"
    )
    assert meta["plan"]["counts"]["mamba_in_out"] == {"bf16": 4, "fp8": 2}
    for shard, digest in meta["shards"].items():
        assert hashlib.sha256((out / shard).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni", "nvfp4_aggressive"])
def test_builtin_recipes_pass_audit(recipe, quantized):
    report = audit_checkpoint(quantized(recipe))
    assert report.ok, report.problems
    assert report.checked_weights > 0


def test_nvfp4_omni_mixed_layout(quantized):
    out = quantized("nvfp4_omni")
    summary = inspect_checkpoint(out)
    g = summary["groups"]
    assert g["routed_experts"]["precision"] == "nvfp4"
    assert g["mamba_in_out"]["precision"] == "fp8"
    assert g["shared_experts"]["precision"] == "fp8" and g["attention_o"]["precision"] == "fp8"
    assert g["vision_tower"]["precision"] == "bf16" and g["audio_tower"]["precision"] == "bf16"
    assert 4.5 < g["routed_experts"]["bits_per_weight"] < 4.6  # 4 bits + E4M3 per 16 + fp32 scalars
    assert summary["total"]["bits_per_weight"] < 16
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MIXED_PRECISION"
    layers = hq["quantized_layers"]
    assert layers["language_model.backbone.layers.1.mixer.experts.3.up_proj"] == {
        "quant_algo": "NVFP4",
        "group_size": 16,
    }
    assert layers["language_model.backbone.layers.0.mixer.in_proj"] == {"quant_algo": "FP8"}
    assert not set(layers) & set(hq["exclude_modules"])
    t = _tensors(out)
    w = t["language_model.backbone.layers.1.mixer.experts.3.up_proj.weight"]
    assert w.dtype == torch.uint8 and tuple(w.shape) == (64, 32)
    assert (
        t["language_model.backbone.layers.1.mixer.experts.3.up_proj.weight_scale"].dtype
        == torch.float8_e4m3fn
    )
    assert tuple(
        t["language_model.backbone.layers.1.mixer.experts.3.up_proj.weight_scale"].shape
    ) == (64, 4)
    assert (
        t["language_model.backbone.layers.1.mixer.experts.3.up_proj.weight_scale_2"].dtype
        == torch.float32
    )


def test_inspect_cli_json(quantized, capsys):
    ckpt = quantized("nvfp4_omni")
    capsys.readouterr()  # modelopt prints while the fixture builds, when this test builds it
    assert main(["inspect", str(ckpt), "--json", "--audit"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["audit"]["ok"] is True and data["precision"] == "MIXED_PRECISION"


def test_plain_inspect_says_when_nothing_vouches_for_the_shards(
    tiny_dir, quantized, tmp_path, capsys
):
    """Issue #20: a directory without omniquant.json (a source, a released checkpoint, an
    unfinished run) is shown under one line that says so; a finished export is not."""
    assert main(["inspect", str(quantized("fp8_omni"))]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out
    assert main(["inspect", str(tiny_dir)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "note: no omniquant.json: a source checkpoint (not written by `omniquant quantize`), "
        "or an unfinished run; shard checksums not verified."
    )
    foreign = tmp_path / "released"
    shutil.copytree(quantized("fp8_omni"), foreign)
    (foreign / "omniquant.json").unlink()
    assert main(["inspect", str(foreign), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checksums_verified"] is False
    assert data["note"].startswith("note: no omniquant.json: a checkpoint another tool wrote")


def test_two_runs_identical_checksums(tiny_dir, quantized, tmp_path):
    first = json.loads((quantized("nvfp4_omni") / "omniquant.json").read_text())
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tiny_dir),
                "--recipe",
                "nvfp4_omni",
                "--calib",
                "synthetic",
                "--out",
                str(tmp_path / "again"),
                "--quiet",
            ]
        )
        == 0
    )
    second = json.loads((tmp_path / "again" / "omniquant.json").read_text())
    assert first["shards"] == second["shards"]
    assert first["recipe_sha256"] == second["recipe_sha256"]


def _with_nan_scale(quantized, out):
    """A copy of the nvfp4_omni checkpoint at ``out`` with one global scale set to NaN (its
    omniquant.json left as it was); returns the scale's name."""
    shutil.copytree(quantized("nvfp4_omni"), out)
    t = _tensors(out)
    name = "language_model.backbone.layers.3.mixer.experts.2.down_proj.weight_scale_2"
    t[name] = torch.tensor(float("nan"))
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return name


def test_nan_scale_fails_audit_naming_tensor(quantized, tmp_path):
    out = tmp_path / "corrupt"
    name = _with_nan_scale(quantized, out)
    with pytest.raises(AuditError) as e:
        audit_checkpoint(out, raise_on_error=True)
    msg = str(e.value)
    assert f"{name}: scale is nan" in msg
    assert "model.safetensors: sha256 does not match omniquant.json" in msg
    assert main(["inspect", str(out), "--audit"]) == 3


def test_nan_block_scale_byte(quantized, tmp_path):
    out = tmp_path / "corrupt_block"
    shutil.copytree(quantized("nvfp4_omni"), out)
    t = _tensors(out)
    name = "language_model.backbone.layers.1.mixer.experts.0.up_proj.weight_scale"
    raw = t[name].view(torch.uint8).clone()
    raw[0, 0] = 0x7F  # E4M3 NaN
    t[name] = raw.view(torch.float8_e4m3fn)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = audit_checkpoint(out)
    assert f"{name}: 1 NaN/Inf block scale(s)" in report.problems


def test_zero_block_scale_on_non_zero_codes_is_found_in_the_file(quantized, tmp_path):
    """The audit reads the codes from the file (direct I/O, omniquant.checkpoint
    .safetensors_file) to tell a zero block scale on data from a zero block."""
    out = tmp_path / "zero_block"
    shutil.copytree(quantized("nvfp4_omni"), out)
    t = _tensors(out)
    module = "language_model.backbone.layers.1.mixer.experts.0.up_proj"
    codes = t[f"{module}.weight"].view(t[f"{module}.weight"].shape[0], -1, 8)
    row, block = (codes != 0).any(-1).nonzero()[0].tolist()
    scale = t[f"{module}.weight_scale"].view(torch.uint8).clone()
    scale[row, block] = 0
    t[f"{module}.weight_scale"] = scale.view(torch.float8_e4m3fn)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = audit_checkpoint(out, checksums=False)
    assert report.problems == [f"{module}.weight_scale: 1 zero block scale(s) on non-zero blocks"]


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_quantized_layer_also_excluded_fails_audit(quantized, tmp_path, recipe):
    """Single-format and MIXED_PRECISION configs alike: a quantized layer must not be excluded."""
    out = tmp_path / "contradiction"
    shutil.copytree(quantized(recipe), out)
    cfg_file = out / "hf_quant_config.json"
    cfg = json.loads(cfg_file.read_text())
    module = "language_model.backbone.layers.0.mixer.in_proj"  # quantized by both recipes
    cfg["quantization"]["exclude_modules"].append("language_model.backbone.layers.0.*")
    cfg_file.write_text(json.dumps(cfg))
    problems = [p for p in audit_checkpoint(out).problems if p.startswith(f"{module}.weight")]
    assert problems, f"{recipe}: the contradiction went unreported"


_KILL_SCRIPT = """
import os, signal, sys
import omniquant.quantize.export as ex
orig = ex.write_checkpoint
def killer(loaded, plan, out, *rest, **kw):  # whatever else the pipeline passes
    result = orig(loaded, plan, out, *rest, **kw)
    os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    return result
ex.write_checkpoint = killer
from omniquant.quantize.pipeline import quantize
quantize(sys.argv[1], "fp8_omni", sys.argv[2])
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_run_leaves_no_finished_checkpoint(tiny_dir, tmp_path, sig, capsys):
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tiny_dir), str(out), sig],
        capture_output=True,
        check=False,
    )
    assert proc.returncode != 0
    assert not out.exists()
    leftovers = list(tmp_path.glob(".omniquant-tmp-*"))
    if sig == "SIGTERM":
        assert leftovers == []  # cleaned up
    for d in leftovers:  # SIGKILL cannot be caught: what remains is marked unfinished
        assert not (d / "omniquant.json").exists()
        assert not audit_checkpoint(d).ok
    lock = tmp_path / ".killed.omniquant-lock"
    if sig == "SIGKILL":  # its lock file stays (the kernel dropped the flock): taken over
        from omniquant.cli import main

        dead = int(lock.read_text())
        out.mkdir()  # an existing --out: the next run stops right after the lock and cleanup
        rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out",
                   str(out), "--quiet"])  # fmt: skip
        assert rc == 2
        notes = capsys.readouterr().out
        assert f"note: took over {lock}, left by a run that was killed (pid {dead})" in notes
        assert list(tmp_path.glob(".omniquant-tmp-*")) == []
    assert not lock.exists()


def test_exported_nvfp4_dequantizes_like_modelopt(quantized):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from omniquant.numerics import dequantize_nvfp4

    t = _tensors(quantized("nvfp4_aggressive"))
    names = [k[:-7] for k, v in t.items() if k.endswith(".weight") and v.dtype == torch.uint8]
    assert len(names) == 82
    for module in names:
        packed, bs, gs = (
            t[f"{module}.weight"],
            t[f"{module}.weight_scale"],
            t[f"{module}.weight_scale_2"],
        )
        shape = (packed.shape[0], packed.shape[1] * 2)
        ref = NVFP4QTensor(torch.Size(shape), torch.bfloat16, packed).dequantize(
            dtype=torch.bfloat16, scale=bs, double_scale=gs, block_sizes={-1: 16}
        )
        ours = dequantize_nvfp4(packed, bs, gs, dtype=torch.bfloat16)
        assert torch.equal(ours.view(torch.int16), ref.view(torch.int16)), module


def test_force_replaces_the_old_checkpoint_and_leaves_nothing_beside_it(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    args = ["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--calib", "synthetic",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    first = (out / "omniquant.json").stat().st_ino
    assert main([*args, "--force"]) == 0
    assert (out / "omniquant.json").is_file() and (out / "omniquant.json").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # A file omniquant did not write makes it no longer a previous checkpoint: refused, kept
    # (issue #20: --force never deletes what omniquant did not write).
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--force"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_output_files_readable_by_other_users(tiny_dir, quantized):
    """Every file of make-tiny's and quantize's output has ``0o666 & ~umask`` (0644 under the
    usual 022), shards included: safetensors creates them 0600, so a server running as
    another user could read config.json but not model.safetensors."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for root in (tiny_dir, quantized("fp8_omni")):
        modes = {p.name: p.stat().st_mode & 0o777 for p in root.iterdir() if p.is_file()}
        assert any(n.endswith(".safetensors") for n in modes)
        assert modes == {n: 0o666 & ~umask for n in modes}, root


def test_the_source_finite_check_counts_exactly_what_a_full_count_finds():
    """``check_finite_source`` decides per chunk with one aminmax pass and counts only a
    chunk that holds NaN/Inf: the counts equal the full isfinite count, wherever the bad
    values sit and whatever the float dtype; a finite or empty chunk is 0."""
    import random

    from omniquant.checkpoint.verify import _non_finite

    rng = random.Random(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        base = torch.randn(257, 129).to(dtype)
        assert _non_finite(base) == 0
        assert _non_finite(base[:0]) == 0
        for bad in (float("nan"), float("inf"), float("-inf")):
            for n in (1, 3):
                x = base.clone()
                for i in rng.sample(range(x.numel()), n):
                    x.view(-1)[i] = bad
                assert _non_finite(x) == int((~torch.isfinite(x)).sum()) == n
        x = torch.tensor(float("nan"), dtype=dtype)  # a 0-d tensor
        assert _non_finite(x) == 1


@pytest.mark.parametrize("slice_elements", [1 << 24, 1000, 97])
def test_fp8_packing_by_slices_is_the_whole_weight_divided_in_float32(monkeypatch, slice_elements):
    """The export's FP8 packing (a reused float32 buffer, a slice of rows at a time) gives
    the bytes of ``(weight.float() / scale).to(float8_e4m3fn)`` for per-tensor, per-row and
    per-expert scales, whatever the slice size (the export pins cover only the default)."""
    from omniquant.quantize import packing

    monkeypatch.setattr(packing, "_FP8_SLICE_ELEMENTS", slice_elements)
    gen = torch.Generator().manual_seed(0)
    cases = [((300, 517), None), ((300, 517), (300, 1)), ((6, 64, 96), (6, 1, 1)),
             ((6, 64, 96), None), ((1, 9), None), ((5,), None)]  # fmt: skip
    for shape, scale_shape in cases:
        w = (torch.randn(shape, generator=gen) * 3).to(torch.bfloat16)
        scale = torch.rand(scale_shape, generator=gen) + 0.01 if scale_shape else torch.tensor(0.37)
        want = (w.float() / scale).to(torch.float8_e4m3fn)
        got = packing._fp8_single_rounded(w, scale)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (shape, scale_shape)


def test_the_writers_own_audit_skips_only_the_hashing(quantized, tmp_path):
    """``checksums=False`` (the quantize run's audit, right after the writer hashed the files
    it wrote) still checks every tensor and that each listed shard exists; only the sha256
    comparison is left to later consumers, which keep it."""
    out = tmp_path / "changed"
    name = _with_nan_scale(quantized, out)
    problems = audit_checkpoint(out, checksums=False).problems
    assert any(f"{name}: scale is nan" in p for p in problems)
    assert not any("sha256" in p for p in problems)
    assert any("sha256 does not match" in p for p in audit_checkpoint(out).problems)
    (out / "model.safetensors").unlink()
    assert any("listed in omniquant.json but missing" in p
               for p in audit_checkpoint(out, checksums=False).problems)  # fmt: skip


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_releasing_the_model_while_exporting_changes_no_byte(tiny_dir, quantized, tmp_path,
                                                             monkeypatch, recipe):  # fmt: skip
    """quantize frees each layer once exported (write_checkpoint's ``release``); the shards
    are those of an export that keeps the model, and the model's tensors are then on meta."""
    from omniquant.quantize import export, pipeline

    seen = {}
    real = export.write_checkpoint

    def keep_model(loaded, *args, release=False, **kwargs):
        seen["model"] = loaded.model
        return real(loaded, *args, release=False, **kwargs)

    monkeypatch.setattr(export, "write_checkpoint", keep_model)
    kept = pipeline.quantize(tiny_dir, recipe, tmp_path / "kept", calib="synthetic", quiet=True)
    assert any(p.device.type != "meta" for p in seen["model"].parameters())
    released = json.loads((quantized(recipe) / "omniquant.json").read_text())["shards"]
    assert kept.manifest["shards"] == released

    def spy(loaded, *args, **kwargs):
        seen["model"] = loaded.model
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(export, "write_checkpoint", spy)
    pipeline.quantize(tiny_dir, recipe, tmp_path / "released", calib="synthetic", quiet=True)
    on = {p.device.type for p in seen["model"].parameters()}
    assert on == {"meta"}, on


def test_a_weight_that_overflows_bfloat16_on_load_is_refused_by_name(tiny_dir, tmp_path):
    """The finite check runs on the loaded tensors (not a second read of every shard): a
    float32 source value beyond bfloat16's range is finite in the file but Inf once loaded,
    and is named by its parameter before any calibration."""
    from omniquant.errors import ModelLoadError
    from omniquant.quantize.pipeline import quantize

    src = tmp_path / "overflow"
    shutil.copytree(tiny_dir, src)
    t = load_file(str(src / "model.safetensors"))
    name = next(k for k in t if k.endswith("mixer.in_proj.weight"))
    t[name] = t[name].float()
    t[name][0, 0] = 3.4e38  # finite in float32, rounds to inf in bfloat16 (max 3.39e38)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="loaded weights hold NaN/Inf although the files do not"):
        quantize(src, "fp8_omni", tmp_path / "out", calib="synthetic", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("per_block", [8, 4, 2, 3])
@pytest.mark.parametrize("offset", [0, 3])
def test_nonzero_blocks_wide_view_equals_bytewise(per_block, offset):
    """The audit's one-integer-per-block test agrees with the bytewise one: blocks that are
    all zero, one non-zero byte at every position, and a storage offset that forbids the
    wide view (``offset`` 3)."""
    from omniquant.checkpoint.audit import _nonzero_blocks

    rows, blocks = 5, 2 * per_block + 1
    w = torch.zeros(rows, blocks * per_block, dtype=torch.uint8)
    for b in range(blocks - 1):  # block b has one non-zero byte, at position b % per_block
        w[b % rows, b * per_block + b % per_block] = 1 + b
    base = torch.zeros(w.numel() + offset, dtype=torch.uint8)
    shifted = base[offset:].view(w.shape)
    shifted.copy_(w)
    want = (w.view(rows, -1, per_block) != 0).any(-1)
    assert want.sum() == blocks - 1
    assert torch.equal(_nonzero_blocks(shifted, rows, per_block), want)

"""Table-driven bad inputs, one family per issue-12 item, through the CLI in-process.

Each case builds its bad input under ``tmp_path`` (damaged copies of the tiny model or
of its FP8 export, never the shared originals), runs ``omniquant.cli.main(argv)`` and
asserts: the exact exit code, a fragment of the message, no traceback, and that no
input file changed (every existing path in ``argv`` except ``--out`` is hashed before
and after). Every case must fail before calibration or evaluation starts, so the whole
table runs in seconds after the shared fixtures are built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from corpus_tally import RESULTS
from safetensors.torch import load_file, save_file

from omniquant.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Env:
    """Inputs of one case: shared read-only checkpoints and a fresh directory."""

    tmp: Path
    tiny: Path
    fp8: Path
    tiny1: Path

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst


def _tensors(d: Path, fn: Callable[[dict], None], resum: bool = False) -> Path:
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    if resum:  # keep omniquant.json consistent, so only the tensor itself is wrong
        meta = json.loads((d / "omniquant.json").read_text())
        digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        meta["shards"]["model.safetensors"] = digest
        (d / "omniquant.json").write_text(json.dumps(meta))
    return d


def _first(t: dict, suffix: str) -> str:
    return min(k for k in t if k.endswith(suffix))


def _nan_scale(e: Env) -> Path:
    d = e.copy(e.fp8, "nan_scale")

    def poison(t):
        t[_first(t, "input_scale")] = torch.tensor(float("nan"))

    return _tensors(d, poison, resum=True)


def _set_config(d: Path, **fields) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _calib_set(e: Env, lines: list[dict], files: dict[str, bytes] | None = None) -> Path:
    d = e.tmp / "set"
    d.mkdir()
    for name, data in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    (d / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def _png_bytes() -> bytes:
    root = Path(__file__).resolve().parents[2] / "calib_data" / "omni-demo" / "image"
    return next(iter(sorted(root.glob("*.png")))).read_bytes()


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _task_set(e: Env, lines: list[dict], files: dict[str, bytes] | None = None) -> Path:
    d = e.tmp / "tasks"
    d.mkdir()
    for name, data in (files or {}).items():
        (d / name).write_bytes(data)
    (d / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def _q(e: Env, model: Path | None = None, recipe: str = "fp8_omni", *extra: str) -> list[str]:
    return ["quantize", "--model", str(model or e.tiny), "--recipe", recipe,
            "--out", str(e.tmp / "out"), "--quiet", *extra]  # fmt: skip


def _report(e: Env, candidate: Path, baseline: Path | None = None, tasks="omni-smoke") -> list[str]:
    return ["report", "--baseline", str(baseline or e.tiny), "--candidate", str(candidate),
            "--tasks", str(tasks), "--out", str(e.tmp / "report")]  # fmt: skip


def _engine(e: Env, ckpt: Path, *extra: str) -> list[str]:
    return ["build-engine", "--checkpoint", str(ckpt), "--target", "hopper",
            "--out", str(e.tmp / "bundle"), "--no-validate", *extra]  # fmt: skip


def _edit(d: Path, change: Callable[[Path], object]) -> Path:
    change(d)
    return d


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


_GOOD_RECIPE = (
    "metadata:\n  name: x\nquantization:\n  rules:\n    - {group: routed_experts, format: fp8}\n"
)
_GOOD_TASK = {"id": "t", "task": "qa", "modality": "text", "prompt": "hi", "answer": "a",
              "metric": "exact_match"}  # fmt: skip


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _lie_header(path: Path, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", length)
    path.write_bytes(bytes(data))


def _temp_dir(e: Env) -> Path:
    d = e.tmp / ".omniquant-tmp-ckpt-999999999"
    shutil.copytree(e.fp8, d)
    return d


def _strip_meta(e: Env) -> Path:
    d = e.copy(e.fp8, "no_marker")
    (d / "omniquant.json").unlink()
    return d


def _changed_shard(e: Env) -> Path:
    d = e.copy(e.fp8, "changed")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    return d


def _nan_weight(e: Env, value: float) -> Path:
    d = e.copy(e.tiny, "nan_model")

    def poison(t):
        t["language_model.backbone.layers.0.mixer.dt_bias"][0] = value

    return _tensors(d, poison)


_IN_PROJ = "language_model.backbone.layers.0.mixer.in_proj.weight"


def _without(e: Env, src: Path, *names: str) -> Path:
    d = e.copy(src, "m")
    for name in names:
        (d / name).unlink()
    return d


def _linked_out(e: Env, as_dir: bool) -> Path:
    """A calibration set whose image is a symlink (to the file, or to a directory above
    it) pointing outside the set."""
    outside = _mkdir(e.tmp / "elsewhere")
    _write(outside / "i.png", _png_bytes())
    d = _calib_set(e, [{"id": "a", "prompt": "x", "image": "img/i.png" if as_dir else "i.png"}])
    (d / ("img" if as_dir else "i.png")).symlink_to(outside if as_dir else outside / "i.png")
    return d


_BIG_PROMPT = {"id": "big", "prompt": "word " * 40000}  # about 200 KB


@dataclass
class Case:
    family: str
    name: str
    argv: Callable[[Env], list[str]]
    rc: int
    fragment: str


# One line per case, kept on one line each so the table reads as a table.
# fmt: off
CASES = [
    # ---- recipes and --set (items 3, 4, 6)
    Case("recipe", "non-utf8", lambda e: _q(e, None, str(_write(e.tmp / "r.yaml", b"metadata:\n  name: \xff\xfe\n"))), 2, "not UTF-8 text"),
    Case("recipe", "duplicate-key", lambda e: _q(e, None, str(_write(e.tmp / "r.yaml", _GOOD_RECIPE + "metadata:\n  name: y\n"))), 2, "found duplicate key 'metadata'"),
    Case("recipe", "duplicate-nested-key", lambda e: _q(e, None, str(_write(e.tmp / "r.yaml", _GOOD_RECIPE + "calibration:\n  size: 2\n  size: 3\n"))), 2, "found duplicate key 'size'"),
    Case("recipe", "directory", lambda e: _q(e, None, str(_mkdir(e.tmp / "rdir"))), 2, "no such recipe file (it is a directory)"),
    Case("recipe", "missing-file", lambda e: _q(e, None, str(e.tmp / "none.yaml")), 2, "no such recipe file"),
    Case("recipe", "show-unknown-name", lambda e: ["recipes", "show", "nosuch"], 2, "error: recipes show nosuch: unknown recipe name; built-in recipes are fp8_backbone, fp8_omni, nvfp4_aggressive, nvfp4_omni, or pass a path to a .yaml file.\n"),
    Case("recipe", "show-missing-file", lambda e: ["recipes", "show", str(e.tmp / "r.yaml")], 2, "error: recipes show {tmp}/r.yaml: no such recipe file.\n"),
    Case("recipe", "unknown-name", lambda e: _q(e, None, "fp9_everything"), 2, "unknown recipe name"),
    Case("recipe", "not-yaml", lambda e: _q(e, None, str(_write(e.tmp / "r.yaml", "metadata: [\n"))), 2, "not valid YAML"),
    Case("recipe", "a-list", lambda e: _q(e, None, str(_write(e.tmp / "r.yaml", "- 1\n- 2\n"))), 2, "a recipe must be a mapping"),
    Case("recipe", "unknown-field", lambda e: _q(e, None, str(_write(e.tmp / "r.yaml", _GOOD_RECIPE + "extra: 1\n"))), 2, "unknown field 'extra'"),
    Case("recipe", "model-types", lambda e: _q(e, None, "fp8_omni", "--set", "metadata.model_types=[llama]"), 2, "metadata.model_types ['llama'] does not include the model type 'nemotron_h_omni'"),
    Case("recipe", "size-huge", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size=1000000000"), 2, "calibration.size: bad value 1000000000: Input should be less than or equal to 65536"),
    Case("recipe", "size-zero", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size=0"), 2, "calibration.size: bad value 0"),
    Case("recipe", "seed-huge", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.seed=99999999999999999999999"), 2, "calibration.seed: bad value 99999999999999999999999"),
    Case("recipe", "seed-negative", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.seed=-1"), 2, "calibration.seed: bad value -1"),
    # Calibration algorithms (issue 21): mse with nvfp4 now runs on the CPU; these are refused.
    Case("recipe", "algorithm-unknown", lambda e: _q(e, None, "nvfp4_omni", "--set", "quantization.algorithm=smoothquant"), 2, "unknown algorithm; known algorithms: max, mse"),
    Case("recipe", "algorithm-wrong-format", lambda e: _q(e, None, "nvfp4_omni", "--set", "quantization.rules.1.algorithm=four_over_six"), 2, "does not apply to format fp8"),
    Case("recipe", "algorithm-variant-unknown", lambda e: _q(e, None, "nvfp4_omni:best"), 2, "unknown algorithm 'best' after ':'"),
    Case("recipe", "gptq-few-tokens", lambda e: _q(e, None, "nvfp4_aggressive:gptq", "--calib", "synthetic", "--set", "calibration.size=1"), 2, "needs at least 128 calibration tokens"),
    # --set blamed on --set, not on the file (item 6)
    Case("set", "empty-key", lambda e: _q(e, None, "fp8_omni", "--set", "=3"), 2, "--set '=3': the key '' has an empty part"),
    Case("set", "empty-part", lambda e: _q(e, None, "fp8_omni", "--set", "calibration..size=3"), 2, "has an empty part"),
    Case("set", "list-for-int", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size=[1,2]"), 2, "invalid --set override(s) for recipe"),
    Case("set", "list-for-int-named", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size=[1,2]"), 2, "(from --set 'calibration.size=[1,2]')"),
    Case("set", "no-equals", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size"), 2, "expected key.path=value"),
    Case("set", "bad-index", lambda e: _q(e, None, "fp8_omni", "--set", "quantization.rules.99.format=fp8"), 2, "is not an index into it"),
    Case("set", "bad-yaml-value", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size=[1"), 2, "value is not valid YAML"),
    Case("set", "not-a-section", lambda e: _q(e, None, "fp8_omni", "--set", "calibration.size.x=1"), 2, "calibration.size is not a section"),
    # ---- the source model (items 3, 4)
    Case("model", "already-quantized", lambda e: _q(e, e.fp8), 2, "already quantized"),
    Case("model", "nan-weight", lambda e: _q(e, _nan_weight(e, float("nan"))), 2, "language_model.backbone.layers.0.mixer.dt_bias: 1 NaN/Inf value(s)"),
    Case("model", "inf-weight", lambda e: _q(e, _nan_weight(e, float("inf"))), 2, "the source weights hold NaN/Inf"),
    Case("model", "missing", lambda e: _q(e, e.tmp / "nope"), 2, "directory does not exist"),
    Case("model", "no-config", lambda e: _q(e, _mkdir(e.tmp / "empty")), 2, "no config.json"),
    Case("model", "config-not-json", lambda e: _q(e, _write(e.copy(e.tiny, "m") / "config.json", "{").parent), 2, "invalid JSON"),
    Case("model", "truncated-shard", lambda e: _q(e, _edit(e.copy(e.tiny, "m"), lambda d: _truncate(d / "model.safetensors", 5000))), 2, "not a readable safetensors file"),
    Case("model", "lying-header", lambda e: _q(e, _edit(e.copy(e.tiny, "m"), lambda d: _lie_header(d / "model.safetensors", 10**12))), 2, "not a readable safetensors file"),
    Case("model", "image-token-id", lambda e: _q(e, _set_config(e.copy(e.tiny, "m"), image_token_id=7)), 2, "image_token_id = 7, but the tokenizer's <image> is id 4"),
    Case("model", "audio-token-id", lambda e: _q(e, _set_config(e.copy(e.tiny, "m"), audio_token_id=4)), 2, "audio_token_id = 4, but the tokenizer's <so_embedding> is id 6"),
    Case("model", "video-token-id", lambda e: _q(e, _set_config(e.copy(e.tiny, "m"), video_token_id=9)), 2, "video_token_id = 9, but the tokenizer's <video> is id 5"),
    Case("model", "missing-tensor", lambda e: _q(e, _tensors(e.copy(e.tiny, "m"), lambda t: t.pop(_IN_PROJ))), 2, f"missing from the safetensors files or have the wrong shape: {_IN_PROJ};"),
    Case("model", "wrong-shape", lambda e: _q(e, _tensors(e.copy(e.tiny, "m"), lambda t: t.update({_IN_PROJ: torch.zeros(3, 5, dtype=torch.bfloat16)}))), 2, f"{_IN_PROJ} (file (3, 5), config (328, 64))"),
    Case("model", "no-tokenizer-json", lambda e: _q(e, _without(e, e.tiny, "tokenizer.json")), 2, "error: {tmp}/m: cannot load the tokenizer: tokenizer.json is missing (the directory holds config.json, generation_config.json, model.safetensors, preprocessor_config.json, tokenizer_config.json); copy it from the checkpoint the weights came from.\n"),
    Case("model", "make-tiny-seed-huge", lambda e: ["make-tiny", "--out", str(e.tmp / "t"), "--seed", str(10**23)], 2, "Invalid value for '--seed'"),
    Case("model", "make-tiny-seed-negative", lambda e: ["make-tiny", "--out", str(e.tmp / "t"), "--seed", "-1"], 2, "Invalid value for '--seed'"),
    # ---- calibration sets (item 3)
    Case("calib-set", "dotdot-escape", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "image": "../out.png"}]))), 2, "media path '../out.png' leaves the set directory"),
    Case("calib-set", "dotdot-inner", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "audio": "sub/../../a.flac"}]))), 2, "leaves the set directory"),
    Case("calib-set", "absolute", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "image": "/etc/passwd"}]))), 2, "is absolute"),
    Case("calib-set", "png-as-video", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "video": "v.mp4"}], {"v.mp4": _png_bytes()}))), 2, "the file holds PNG image bytes"),
    Case("calib-set", "jpeg-as-video", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "video": "v.webm"}], {"v.webm": _jpeg_bytes()}))), 2, "the file holds JPEG image bytes"),
    Case("calib-set", "png-as-audio", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "audio": "a.wav"}], {"a.wav": _png_bytes()}))), 2, "cannot decode audio"),
    Case("calib-set", "text-as-image", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "image": "i.png"}], {"i.png": b"not an image"}))), 2, "cannot decode image"),
    Case("calib-set", "missing-media", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x", "image": "gone.png"}]))), 2, "file not found"),
    Case("calib-set", "bad-json-line", lambda e: _q(e, None, "fp8_omni", "--calib", str(_edit(_calib_set(e, []), lambda d: _write(d / "manifest.jsonl", "{oops\n")))), 2, "line 1"),
    Case("calib-set", "non-utf8-manifest", lambda e: _q(e, None, "fp8_omni", "--calib", str(_edit(_calib_set(e, []), lambda d: _write(d / "manifest.jsonl", b'{"id": "\xff"}\n')))), 2, "error: Calibration manifest {tmp}/set/manifest.jsonl: 1 of 1 samples are bad:\n  line 1: not UTF-8 text: byte 9 of the line (offset 8 in the file) is 0xff; save the file as UTF-8\n"),
    Case("calib-set", "non-utf8-second-line", lambda e: _q(e, None, "fp8_omni", "--calib", str(_edit(_calib_set(e, []), lambda d: _write(d / "manifest.jsonl", b'{"id": "a", "prompt": "x"}\r\n{"id": "b", "prompt": "caf\xe9"}\n')))), 2, "  line 2: not UTF-8 text: byte 27 of the line (offset 54 in the file) is 0xe9; save the file as UTF-8\nFix or remove these lines, or skip them with --skip-bad."),
    # A BOM is read (not a bad first line): the media error below is the only problem.
    Case("calib-set", "bom-then-bad-media", lambda e: _q(e, None, "fp8_omni", "--calib", str(_edit(_calib_set(e, []), lambda d: _write(d / "manifest.jsonl", b'\xef\xbb\xbf{"id": "a", "prompt": "x", "image": "gone.png"}\n')))), 2, "1 of 1 samples are bad:\n  line 1 (id 'a'): gone.png: file not found"),
    Case("calib-set", "symlink-out", lambda e: _q(e, None, "fp8_omni", "--calib", str(_linked_out(e, as_dir=False))), 2, "line 1 (id 'a'): i.png: leaves the set directory through the symlink 'i.png' (it points to {tmp}/elsewhere/i.png); copy the file into the directory of manifest.jsonl instead of linking it"),
    Case("calib-set", "symlinked-dir-out", lambda e: _q(e, None, "fp8_omni", "--calib", str(_linked_out(e, as_dir=True))), 2, "img/i.png: leaves the set directory through the symlink 'img' (it points to {tmp}/elsewhere/i.png)"),
    # Refused after the model loads and before any calibration forward (it would run for minutes).
    Case("calib-set", "prompt-longer-than-positions", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, [{"id": "a", "prompt": "x"}, _BIG_PROMPT]))), 2, "error: Calibration set {tmp}/set: 1 sample(s) cannot be processed:\n  line 2: sample 'big' is 80,002 tokens long, more than the model's 4,096 positions (max_position_embeddings of its config); shorten or split the prompt\nFix or remove these lines, or skip them with --skip-bad."),
    Case("calib-set", "empty", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, []))), 2, "has no samples"),
    Case("calib-set", "no-set", lambda e: _q(e, None, "fp8_omni", "--calib", str(e.tmp / "none")), 2, "none"),
    # ---- checkpoints given to inspect / build-engine / report (items 2, 4, 6)
    Case("checkpoint", "inspect-missing", lambda e: ["inspect", str(e.tmp / "nope")], 2, "inspect {tmp}/nope: no such directory"),
    # Plain inspect shows a checkpoint another tool wrote (a released one, for --as); the
    # audit, like report and build-engine, refuses it.
    Case("checkpoint", "inspect-audit-no-marker", lambda e: ["inspect", "--audit", str(_strip_meta(e))], 3, "omniquant.json: missing; this is not a finished omniquant checkpoint"),
    Case("checkpoint", "inspect-temp-dir", lambda e: ["inspect", str(_temp_dir(e))], 2, "a temporary directory of an unfinished `omniquant quantize` run"),
    Case("checkpoint", "inspect-audit-temp-dir", lambda e: ["inspect", "--audit", str(_temp_dir(e))], 3, "a temporary directory of an unfinished"),
    # The missing shard is the one fault (its absent k_scale/v_scale are not a second one).
    Case("checkpoint", "inspect-audit-missing-shard", lambda e: ["inspect", "--audit", str(_without(e, e.fp8, "model.safetensors"))], 3, "error: audit of {tmp}/m failed (1 problem(s)):\n  model.safetensors: listed in omniquant.json but missing\n"),
    Case("checkpoint", "inspect-changed-shard", lambda e: ["inspect", str(_changed_shard(e))], 2, "sha256 does not match omniquant.json"),
    Case("checkpoint", "inspect-nan-scale", lambda e: ["inspect", str(_nan_scale(e))], 2, "NaN/Inf scale value(s)"),
    Case("checkpoint", "inspect-audit-nan-scale", lambda e: ["inspect", "--audit", str(_nan_scale(e))], 3, "scale is nan"),
    Case("checkpoint", "inspect-truncated-source", lambda e: ["inspect", str(_edit(e.copy(e.tiny, "m"), lambda d: _truncate(d / "model.safetensors", 3)))], 2, "not a readable safetensors file"),
    Case("checkpoint", "inspect-lying-source", lambda e: ["inspect", str(_edit(e.copy(e.tiny, "m"), lambda d: _lie_header(d / "model.safetensors", 10**12)))], 2, "not a readable safetensors file"),
    Case("checkpoint", "inspect-garbage-header", lambda e: ["inspect", str(_edit(e.copy(e.tiny, "m"), lambda d: _write(d / "model.safetensors", struct.pack("<Q", 4) + b"{{{{")))], 2, "not a readable safetensors file"),
    Case("checkpoint", "inspect-bad-quant-json", lambda e: ["inspect", str(_edit(e.copy(e.fp8, "m"), lambda d: _write(d / "hf_quant_config.json", "{")))], 2, "hf_quant_config.json: not valid JSON"),
    Case("checkpoint", "inspect-bad-omniquant-json", lambda e: ["inspect", str(_edit(e.copy(e.fp8, "m"), lambda d: _write(d / "omniquant.json", "{")))], 2, "omniquant.json: not valid JSON"),
    Case("checkpoint", "inspect-bad-config-json", lambda e: ["inspect", str(_write(e.copy(e.tiny, "m") / "config.json", b"\xff{").parent)], 2, "config.json"),
    Case("checkpoint", "engine-nan-scale", lambda e: _engine(e, _nan_scale(e)), 2, "NaN/Inf scale value(s)"),
    Case("checkpoint", "engine-no-marker", lambda e: _engine(e, _strip_meta(e)), 2, "quantized but has no omniquant.json"),
    Case("checkpoint", "engine-temp-dir", lambda e: _engine(e, _temp_dir(e)), 2, "a temporary directory of an unfinished"),
    Case("checkpoint", "engine-changed-shard", lambda e: _engine(e, _changed_shard(e)), 2, "does not match"),
    Case("checkpoint", "report-nan-scale", lambda e: _report(e, _nan_scale(e)), 2, "--candidate {tmp}/nan_scale: refused"),
    Case("checkpoint", "report-no-marker", lambda e: _report(e, _strip_meta(e)), 2, "quantized but has no omniquant.json"),
    Case("checkpoint", "report-changed-shard", lambda e: _report(e, _changed_shard(e)), 2, "sha256 does not match omniquant.json"),
    Case("checkpoint", "report-other-model", lambda e: _report(e, e.tiny1), 2, "from another model"),
    Case("checkpoint", "report-export-of-other-model", lambda e: _report(e, e.fp8, e.tiny1), 2, "from another model"),
    Case("checkpoint", "report-other-processing", lambda e: _report(e, _edit(e.copy(e.tiny, "m"), lambda d: _write(d / "preprocessor_config.json", json.dumps({**json.loads((e.tiny / "preprocessor_config.json").read_text()), "max_num_patches": 32})))), 2, "tokenizer or processing settings differ"),
    Case("checkpoint", "report-temp-baseline", lambda e: _report(e, e.fp8, _temp_dir(e)), 2, "--baseline"),
    # ---- absurd values and CLI misuse (item 3)
    Case("cli", "engine-batch-huge", lambda e: _engine(e, e.fp8, "--max-batch-size", str(10**30)), 2, "--max-batch-size 1000000000000000000000000000000: at most 4096"),
    Case("cli", "engine-batch-zero", lambda e: _engine(e, e.fp8, "--max-batch-size", "0"), 2, "error: --max-batch-size 0: must be a positive integer."),
    Case("cli", "engine-seq-huge", lambda e: _engine(e, e.fp8, "--max-seq-len", str(10**12)), 2, "--max-seq-len 1000000000000: at most 1048576"),
    Case("cli", "engine-seq-small", lambda e: _engine(e, e.fp8, "--max-seq-len", "8"), 2, "error: --max-seq-len 8: must be an integer >= 16.\n"),
    Case("cli", "engine-rate", lambda e: _engine(e, e.fp8, "--video-pruning-rate", "1.5"), 2, "--video-pruning-rate 1.5: must be in [0, 1)"),
    Case("cli", "report-threshold", lambda e: [*_report(e, e.tiny), "--recovery-threshold", "2"], 2, "--recovery-threshold 2.0: must be in (0, 1]"),
    Case("cli", "report-max-new-tokens", lambda e: [*_report(e, e.tiny), "--max-new-tokens", "0"], 2, "--max-new-tokens 0: must be >= 1"),
    Case("cli", "quantize-no-out", lambda e: ["quantize", "--model", str(e.tiny), "--recipe", "fp8_omni"], 2, "Missing option '--out'"),
    Case("cli", "unknown-command", lambda e: ["quantise"], 2, "No such command"),
    Case("cli", "out-exists", lambda e: ["quantize", "--model", str(e.tiny), "--recipe", "fp8_omni", "--out", str(e.fp8)], 2, "already exists; pass --force"),
    Case("cli", "out-is-model", lambda e: ["quantize", "--model", str(e.tiny), "--recipe", "fp8_omni", "--out", str(e.tiny), "--force"], 2, "replacing --out would delete it"),
    Case("cli", "out-is-file", lambda e: ["quantize", "--model", str(e.tiny), "--recipe", "fp8_omni", "--out", str(_write(e.tmp / "f", "x")), "--force"], 2, "exists and is not a directory"),
    Case("cli", "engine-out-in-ckpt", lambda e: ["build-engine", "--checkpoint", str(e.fp8), "--target", "hopper", "--out", str(e.fp8 / "b")], 2, "must not contain, or be inside, the checkpoint"),
    # ---- task sets given to report
    Case("task-set", "missing", lambda e: _report(e, e.tiny, tasks=e.tmp / "none"), 2, "none"),
    Case("task-set", "dotdot", lambda e: _report(e, e.tiny, tasks=_task_set(e, [{**_GOOD_TASK, "modality": "image", "prompt": "<image>", "image": "../x.png"}])), 2, "media path '../x.png' leaves the set directory; keep media files inside the directory of tasks.jsonl\n"),
    Case("task-set", "absolute", lambda e: _report(e, e.tiny, tasks=_task_set(e, [{**_GOOD_TASK, "modality": "image", "prompt": "<image>", "image": "/x.png"}])), 2, "media path '/x.png' is absolute; make it relative to the directory of tasks.jsonl\n"),
    Case("task-set", "non-utf8", lambda e: _report(e, e.tiny, tasks=_edit(_task_set(e, []), lambda d: _write(d / "tasks.jsonl", b'{"id": "\xfe"}\n'))), 2, "error: Task set {tmp}/tasks/tasks.jsonl: 1 of 1 samples are bad:\n  line 1: not UTF-8 text: byte 9 of the line (offset 8 in the file) is 0xfe; save the file as UTF-8\nFix or remove these lines (format: tasks/README.md)."),
    Case("task-set", "bad-json", lambda e: _report(e, e.tiny, tasks=_edit(_task_set(e, []), lambda d: _write(d / "tasks.jsonl", "{\n"))), 2, "line 1"),
    Case("task-set", "png-as-video", lambda e: _report(e, e.tiny, tasks=_task_set(e, [{**_GOOD_TASK, "modality": "video", "prompt": "<video>", "video": "v.mp4"}], {"v.mp4": _png_bytes()})), 2, "the file holds PNG image bytes"),
    Case("task-set", "empty", lambda e: _report(e, e.tiny, tasks=_task_set(e, [])), 2, "tasks.jsonl"),
]
# fmt: on


def _snapshot(argv: list[str]) -> dict[str, str]:
    """sha256 of every file under every existing path in ``argv`` (``--out`` excepted)."""
    digests = {}
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg == "--out":
            skip_next = True
            continue
        p = Path(arg)
        if not arg.startswith("-") and p.exists():
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            for f in files:
                digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def shared(tiny_dir, quantized, other_tiny_dir):
    return tiny_dir, quantized("fp8_omni"), other_tiny_dir


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}:{c.name}" for c in CASES])
def test_bad_input_is_refused_cleanly(case, shared, tmp_path, capsys):
    tiny, fp8, tiny1 = shared
    env = Env(tmp=tmp_path, tiny=tiny, fp8=fp8, tiny1=tiny1)
    originals = {p: _tree_digest(p) for p in (tiny, fp8, tiny1)}
    argv = case.argv(env)
    before = _snapshot(argv)
    traceback = False
    try:
        rc = main(argv)
    except Exception:  # noqa: BLE001 (a bug: recorded, then the test fails below)
        traceback, rc = True, None
    err = capsys.readouterr().err
    after = _snapshot(argv)
    damaged = before != after or originals != {p: _tree_digest(p) for p in originals}
    fragment = case.fragment.replace("{tmp}", str(tmp_path))
    clean = rc == case.rc and fragment in err and "Traceback" not in err
    RESULTS.append((case.family, clean, traceback or "Traceback" in err, rc == 0, damaged))
    assert not traceback, f"{case.name}: raised instead of a clean error"
    assert rc == case.rc, f"{case.name}: exit {rc}, expected {case.rc}; stderr:\n{err}"
    assert fragment in err, f"{case.name}: {fragment!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not damaged, f"{case.name}: an input file changed"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- concurrency and leftovers


def test_a_second_run_to_a_locked_out_is_refused(tiny_dir, tmp_path, capsys):
    from omniquant.outdir import out_lock

    out = tmp_path / "ckpt"
    with out_lock(out):
        rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out)])
    err = capsys.readouterr().err
    RESULTS.append(("leftovers", rc == 2 and "another omniquant run" in err, False, rc == 0, False))
    assert rc == 2
    assert f"--out {out}: another omniquant run (pid {os.getpid()}) is writing it" in err
    assert not out.exists() and not (tmp_path / ".ckpt.omniquant-lock").exists()


def test_stale_temp_dirs_of_dead_runs_are_removed_and_a_moved_aside_checkpoint_restored(
    tiny_dir, quantized, tmp_path, capsys
):
    dead = 2**22 + 12345  # above pid_max's default 2**22: no such process
    out = tmp_path / "ckpt"
    stale_new = tmp_path / f".omniquant-tmp-ckpt-{dead}"
    stale_old = tmp_path / f".omniquant-old-ckpt-{dead}"
    other = tmp_path / f".omniquant-tmp-other-{dead}"  # another --out's: not ours to touch
    for d in (stale_new, stale_old, other):
        shutil.copytree(quantized("fp8_omni"), d)
    # The leftover holds omniquant.json and passes the audit, yet no consumer accepts it.
    assert main(["inspect", str(stale_new)]) == 2
    # quantize to the same --out (refused later: --out exists once restored) cleans first.
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out)])
    captured = capsys.readouterr()
    ok = rc == 2 and not stale_new.exists() and not stale_old.exists() and out.is_dir()
    RESULTS.append(("leftovers", ok, False, rc == 0, False))
    assert "already exists; pass --force" in captured.err
    assert not stale_new.exists() and not stale_old.exists()
    assert (out / "omniquant.json").is_file() and other.exists()
    assert main(["inspect", "--audit", str(out)]) == 0


_DEAD_PID = 2**22 + 12345  # above pid_max's default 2**22: no such process


def test_a_lock_file_left_by_a_killed_run_is_taken_over_with_a_note(tiny_dir, tmp_path, capsys):
    out = _mkdir(tmp_path / "ckpt")  # an existing --out: the run stops right after the lock
    lock = tmp_path / ".ckpt.omniquant-lock"
    lock.write_text(str(_DEAD_PID))  # what SIGKILL leaves: the file, its flock dropped
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out)])
    captured = capsys.readouterr()
    note = f"note: took over {lock}, left by a run that was killed (pid {_DEAD_PID})"
    ok = rc == 2 and note in captured.out and not lock.exists()
    RESULTS.append(("leftovers", ok, "Traceback" in captured.err, rc == 0, False))
    assert rc == 2 and "already exists; pass --force" in captured.err
    assert note in captured.out
    assert not lock.exists()


def test_a_lock_held_while_its_pid_is_dead_names_the_file_to_remove(tiny_dir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "ckpt"
    lock = tmp_path / ".ckpt.omniquant-lock"
    lock.write_text(str(_DEAD_PID))
    fd = os.open(lock, os.O_RDWR)  # held as by a child that outlived its killed parent
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out)])
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    want = (
        f"error: --out {out}: the lock file {lock} is locked, but pid {_DEAD_PID} written in it "
        "is not running: a process it started still holds the lock, or a run on another host "
        f"writes this directory. Stop that process; if nothing is writing --out, remove {lock} "
        "and run again.\n"
    )
    RESULTS.append(("leftovers", rc == 2 and want in err, "Traceback" in err, rc == 0, False))
    assert rc == 2 and want in err, err
    assert lock.read_text() == str(_DEAD_PID) and not out.exists()


def test_a_lock_file_that_cannot_be_opened_is_named(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    lock = _mkdir(tmp_path / ".ckpt.omniquant-lock")  # not openable for writing, even by root
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out)])
    err = capsys.readouterr().err
    want = (
        f"error: --out {out}: the lock file {lock} (pid unknown) cannot be opened (Is a "
        "directory). If no omniquant run is writing --out, it was left by a killed run: remove "
        f"{lock} and run again.\n"
    )
    RESULTS.append(("leftovers", rc == 2 and want in err, "Traceback" in err, rc == 0, False))
    assert rc == 2 and want in err, err
    assert lock.is_dir() and not out.exists()


# ---------------------------------------------------------------- warnings that name the cause


def test_a_short_set_says_how_many_samples_are_missing_and_coverage_names_them(
    tiny_dir, tmp_path, capsys
):
    """Five samples for calibration.size 1000: a warning before calibration; the coverage
    error after it names the samples that ran."""
    d = _mkdir(tmp_path / "set")
    lines = [{"id": f"s{i}", "prompt": "x" * (i + 1)} for i in range(5)]
    _write(d / "manifest.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    before = _tree_digest(d)
    out = tmp_path / "out"
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out),
               "--calib", str(d), "--set", "calibration.size=1000", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    warning = (
        f"warning: calibration.size is 1000 but the calibration set {d} has 5 usable sample(s): "
        "calibrating on 5, 995 missing. Add samples to the set, or set calibration.size=5 if "
        "that is intended.\n"
    )
    ran = "\nCalibration ran on 5 sample(s): 's0' (line 1, "
    ok = rc == 2 and warning in captured.out and ran in captured.err
    damaged = _tree_digest(d) != before
    RESULTS.append(("calib-set", ok, "Traceback" in captured.err, rc == 0, damaged))
    assert warning in captured.out, captured.out
    assert rc == 2 and ran in captured.err and "'s4' (line 5, " in captured.err, captured.err
    assert not damaged and not out.exists()


def test_a_rule_a_later_rule_overrides_is_named_with_it(tiny_dir, tmp_path, capsys):
    recipe = _write(
        tmp_path / "r.yaml",
        _GOOD_RECIPE
        + "    - {group: mamba_in_out, format: fp8}\n"
        + "    - {modules: '*.experts', format: bf16}\n",
    )
    before = recipe.read_bytes()
    rc = main(["plan", "--model", str(tiny_dir), "--recipe", str(recipe)])
    out = capsys.readouterr().out
    want = (
        "warning: quantization.rules.0 {group: routed_experts, format: fp8} has no effect: "
        "quantization.rules.2 {modules: '*.experts', format: bf16} sets every module it "
        "selects again (later rules win); remove it, or narrow the later rule.\n"
    )
    # A warning, not an error: whether a rule is covered depends on the model's config
    # (recipes are shared between configs), and the plan stays what the rules say.
    RESULTS.append(("recipe", rc == 0 and want in out, False, False, recipe.read_bytes() != before))
    assert rc == 0 and want in out, out
    assert out.count("has no effect") == 1
    assert recipe.read_bytes() == before

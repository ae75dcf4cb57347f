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
    Case("calib-set", "non-utf8-manifest", lambda e: _q(e, None, "fp8_omni", "--calib", str(_edit(_calib_set(e, []), lambda d: _write(d / "manifest.jsonl", b'{"id": "\xff"}\n')))), 2, "manifest"),
    Case("calib-set", "empty", lambda e: _q(e, None, "fp8_omni", "--calib", str(_calib_set(e, []))), 2, "has no samples"),
    Case("calib-set", "no-set", lambda e: _q(e, None, "fp8_omni", "--calib", str(e.tmp / "none")), 2, "none"),
    # ---- checkpoints given to inspect / build-engine / report (items 2, 4, 6)
    Case("checkpoint", "inspect-missing", lambda e: ["inspect", str(e.tmp / "nope")], 2, "inspect {tmp}/nope: no such directory"),
    # Plain inspect shows a checkpoint another tool wrote (a released one, for --as); the
    # audit, like report and build-engine, refuses it.
    Case("checkpoint", "inspect-audit-no-marker", lambda e: ["inspect", "--audit", str(_strip_meta(e))], 3, "omniquant.json: missing; this is not a finished omniquant checkpoint"),
    Case("checkpoint", "inspect-temp-dir", lambda e: ["inspect", str(_temp_dir(e))], 2, "a temporary directory of an unfinished `omniquant quantize` run"),
    Case("checkpoint", "inspect-audit-temp-dir", lambda e: ["inspect", "--audit", str(_temp_dir(e))], 3, "a temporary directory of an unfinished"),
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
    Case("cli", "engine-batch-huge", lambda e: _engine(e, e.fp8, "--max-batch-size", str(10**30)), 2, "max_batch_size = 1000000000000000000000000000000: at most 4096"),
    Case("cli", "engine-batch-zero", lambda e: _engine(e, e.fp8, "--max-batch-size", "0"), 2, "must be a positive integer"),
    Case("cli", "engine-seq-huge", lambda e: _engine(e, e.fp8, "--max-seq-len", str(10**12)), 2, "at most 1048576"),
    Case("cli", "engine-rate", lambda e: _engine(e, e.fp8, "--video-pruning-rate", "1.5"), 2, "must be in [0, 1)"),
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
    Case("task-set", "dotdot", lambda e: _report(e, e.tiny, tasks=_task_set(e, [{**_GOOD_TASK, "modality": "image", "prompt": "<image>", "image": "../x.png"}])), 2, "leaves the set directory"),
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

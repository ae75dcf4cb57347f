"""Shipped calibration sets: name resolution, the shipped omni-mix, its generator."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from omniquant.data.manifest import validate_manifest
from omniquant.data.sets import CALIB_ROOT_ENV, resolve_calib_set, shipped_calib_sets
from omniquant.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_calib_data", REPO / "scripts" / "make_calib_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_resolve_shipped_name_and_directory(tmp_path: Path):
    assert "omni-mix" in shipped_calib_sets()
    assert resolve_calib_set("omni-mix") == REPO / "calib_data" / "omni-mix"
    (tmp_path / "manifest.jsonl").write_text('{"id": "a", "prompt": "p"}\n')
    assert resolve_calib_set(tmp_path) == tmp_path.resolve()
    assert resolve_calib_set(str(tmp_path)) == tmp_path.resolve()


def test_unknown_name_lists_shipped_sets():
    shipped = shipped_calib_sets()
    assert "omni-mix" in shipped
    with pytest.raises(DataError) as info:
        resolve_calib_set("omni-max")
    assert str(info.value) == (
        "Unknown calibration set 'omni-max': it is neither a shipped set nor a directory. "
        f"Shipped sets: {', '.join(shipped)}. Or pass a directory with a manifest.jsonl."
    )


def test_directory_without_manifest(tmp_path: Path):
    with pytest.raises(DataError, match=r"has no manifest.jsonl"):
        resolve_calib_set(tmp_path)


def test_calib_root_env_override(tmp_path: Path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.jsonl").write_text('{"id": "a", "prompt": "p"}\n')
    monkeypatch.setenv(CALIB_ROOT_ENV, str(tmp_path))
    assert shipped_calib_sets() == ["mine"]
    assert resolve_calib_set("mine") == (tmp_path / "mine").resolve()


def test_shipped_omni_mix_is_valid_small_and_covers_every_modality():
    root = resolve_calib_set("omni-mix")
    entries, skipped = validate_manifest(root)
    assert skipped == [] and 24 <= len(entries) <= 40
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 5_000_000
    kinds = {
        "image": [e for e in entries if e.images],
        "video": [e for e in entries if e.video],
        "audio": [e for e in entries if e.audio],
        "text": [e for e in entries if not e.media_relpaths()],
    }
    assert {k: len(v) >= 4 for k, v in kinds.items()} == dict.fromkeys(kinds, True)
    suffixes = {Path(p).suffix for e in entries for p in e.media_relpaths()}
    assert suffixes == {".png", ".jpg", ".mp4", ".webm", ".wav", ".flac"}
    # the first five samples already cover every modality
    first = entries[:5]
    assert all(any(e in kinds[k] for e in first) for k in kinds)


def test_generator_is_deterministic_and_matches_the_shipped_manifest(tmp_path: Path):
    generator = _generator()
    only = {"image", "video", "tone", "text"}  # everything that needs no espeak-ng
    first = generator.generate(tmp_path / "a", seed=0, only=only)
    second = generator.generate(tmp_path / "b", seed=0, only=only)
    assert _digests(first) == _digests(second)
    # a subset writes the same manifest lines as the full shipped set (per-sample RNGs)
    shipped = [
        json.loads(line)
        for line in (REPO / "calib_data" / "omni-mix" / "manifest.jsonl").read_text().splitlines()
    ]
    ours = [json.loads(line) for line in (first / "manifest.jsonl").read_text().splitlines()]
    ids = {line["id"] for line in ours}
    assert ours == [line for line in shipped if line["id"] in ids]
    assert len(ours) == 8 + 8 + 4 + 6
    other_seed = generator.generate(tmp_path / "c", seed=1, only={"image"})
    assert _digests(other_seed) != {
        k: v for k, v in _digests(first).items() if k.startswith("images")
    }


def test_load_calibration_set_processes_a_prefix(tiny_dir):
    from types import SimpleNamespace

    from omniquant.data.sets import load_calibration_set, preflight_calibration_set

    entries, skipped = preflight_calibration_set("omni-mix")
    assert skipped == [] and len(entries) == 33
    samples, skipped = load_calibration_set(SimpleNamespace(path=tiny_dir), "omni-mix", size=5)
    assert skipped == []
    assert [s.id for s in samples] == [e.id for e in entries[:5]]
    modalities = {m for s in samples for m in s.modalities}
    assert modalities == {"text", "image", "video", "audio"}
    assert samples[0].meta["calib_set"] == "omni-mix" and samples[0].meta["line"] == 1


def test_load_calibration_set_skips_lines_that_fail_processing(tiny_dir, tmp_path: Path):
    from types import SimpleNamespace

    from omniquant.data.sets import load_calibration_set

    lines = [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "hi <so_embedding>"}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    loaded = SimpleNamespace(path=tiny_dir)
    with pytest.raises(
        DataError, match=r"1 sample\(s\) cannot be processed:\n  line 2: sample 'b'"
    ):
        load_calibration_set(loaded, tmp_path)
    samples, skipped = load_calibration_set(loaded, tmp_path, skip_bad=True)
    assert [s.id for s in samples] == ["a"]
    assert [bad.line for bad in skipped] == [2] and "placeholder tokens" in str(skipped[0])

"""The demo's synthetic tasks: shipped splits, their formats, disjointness, the generator."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from omniquant.data.manifest import validate_manifest
from omniquant.data.sets import resolve_calib_set
from omniquant.demo import DEMO_CALIB, DEMO_TASKS

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "calib_data" / DEMO_CALIB
TASKS = REPO / "tasks" / DEMO_TASKS
HAS_ESPEAK = shutil.which("espeak-ng") is not None


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _digest(root: Path, line: dict) -> str:
    """Independent of the generator's own check: sha256 of prompt + media file bytes."""
    h = hashlib.sha256(line["prompt"].encode())
    for key in ("image", "video", "audio"):
        if key in line:
            h.update((root / line[key]).read_bytes())
    return h.hexdigest()


def _same_media(a: Path, b: Path) -> bool:
    """Same file bytes, or for video the same decoded frames: libx264 occasionally
    writes a different bitstream for the same frames."""
    if a.read_bytes() == b.read_bytes():
        return True
    from omniquant.data.media import read_video

    return a.suffix == ".mp4" and bool((read_video(a).frames == read_video(b).frames).all())


def test_calibration_split_is_a_valid_manifest_with_every_modality():
    assert resolve_calib_set(DEMO_CALIB) == CALIB
    entries, skipped = validate_manifest(CALIB)
    assert skipped == [] and 24 <= len(entries) <= 40
    # modalities interleave: the first 4 samples already hold image, video, audio and text
    first = _lines(CALIB / "manifest.jsonl")[:4]
    assert [sorted(set(x) & {"image", "video", "audio"}) for x in first] == [["image"], ["video"], ["audio"], []]
    # exactly the omni-mix manifest fields
    assert {k for line in _lines(CALIB / "manifest.jsonl") for k in line} <= {"id", "image", "video", "audio", "prompt", "answer"}


def test_evaluation_split_is_a_valid_task_set():
    from omniquant.evaluate import validate_task_set

    entries = validate_task_set(TASKS)
    per_task = Counter(e.task for e in entries)
    assert set(per_task) == set(_generator().TASKS)
    assert all(10 <= n <= 20 for n in per_task.values()), per_task
    assert {e.modality for e in entries} == {"text", "image", "video", "audio"}
    for entry in entries:  # balanced answers, every choice set contains its answer
        if entry.metric == "multiple_choice":
            assert entry.answer in entry.choices
    answers = Counter((e.task, e.answer) for e in entries)
    for task in per_task:
        counts = [c for (t, _), c in answers.items() if t == task]
        assert max(counts) - min(counts) <= 1 or task == "next_number", (task, counts)


def test_calibration_and_evaluation_share_no_sample():
    seen = {_digest(CALIB, line): line["id"] for line in _lines(CALIB / "manifest.jsonl")}
    evaluation = {_digest(TASKS, line): line["id"] for line in _lines(TASKS / "tasks.jsonl")}
    assert len(seen) == 36 and len(evaluation) == len(_lines(TASKS / "tasks.jsonl"))
    assert not set(seen) & set(evaluation)
    # and by the generator's own check (prompt + decoded media, within and across splits)
    assert _generator().check_disjoint({"calib": CALIB, "eval": TASKS}) == {"calib": 36, "eval": 144}


def test_training_split_shares_no_sample_with_the_shipped_ones(tmp_path: Path):
    gen = _generator()
    tasks = [t for t in gen.TASKS if HAS_ESPEAK or t != "spoken_digit"]
    gen.generate_split(tmp_path / "train", "train", 3, tasks=tasks)
    gen.check_disjoint({"calib": CALIB, "eval": TASKS, "train": tmp_path / "train"})
    # the discrete parameters are partitioned too: no counting sequence of one split in another
    prompts = {split: {x["prompt"] for x in _lines(root) if x.get("task", x["id"]).find("next_number") >= 0}
               for split, root in (("calib", CALIB / "manifest.jsonl"), ("eval", TASKS / "tasks.jsonl"))}  # fmt: skip
    train_prompts = {f"Continue the sequence: {' '.join(str(n) for n in range(s, s + k))}"
                     for s, k in gen.sequence_specs("train")}  # fmt: skip
    assert not train_prompts & (prompts["calib"] | prompts["eval"])
    assert not prompts["calib"] & prompts["eval"]


def test_generator_is_deterministic_and_reproduces_the_shipped_files(tmp_path: Path):
    gen = _generator()
    tasks = [t for t in gen.TASKS if t != "spoken_digit"]  # no espeak needed
    a = gen.generate_split(tmp_path / "a", "eval", 2, tasks=tasks)
    b = gen.generate_split(tmp_path / "b", "eval", 2, tasks=tasks)
    assert a == b
    shipped = {x["id"]: x for x in _lines(TASKS / "tasks.jsonl")}
    for line in a:
        assert line == shipped[line["id"]]
        for key in ("image", "video", "audio"):
            if key in line:
                made = tmp_path / "a" / line[key]
                assert _same_media(made, tmp_path / "b" / line[key]), line[key]
                assert _same_media(made, TASKS / line[key]), f"{line[key]} differs from the shipped file"


@pytest.mark.skipif(not HAS_ESPEAK, reason="needs espeak-ng (generation only)")
def test_speech_is_deterministic(tmp_path: Path):
    gen = _generator()
    a = gen.generate_split(tmp_path / "a", "eval", 1, tasks=["spoken_digit"])
    gen.generate_split(tmp_path / "b", "eval", 1, tasks=["spoken_digit"])
    rel = a[0]["audio"]
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()

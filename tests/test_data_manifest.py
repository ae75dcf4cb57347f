"""Manifest parsing and whole-manifest validation (one error listing every bad line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from media_factory import _png, _write_manifest

from omniquant.cli import CLI_NAMES
from omniquant.data.manifest import BadLine, load_manifest, validate_manifest
from omniquant.errors import DataError, argument_style


def test_bad_media_fail_with_one_message_listing_all(bad_set: Path):
    with pytest.raises(DataError) as info:
        validate_manifest(bad_set)
    with argument_style(CLI_NAMES):  # the message as the `omniquant` command prints it
        message = str(info.value)
    assert str(info.value).endswith("skip them with skip_bad.")  # a Python caller's words
    assert message.startswith(
        f"Calibration manifest {bad_set / 'manifest.jsonl'}: 3 of 5 samples are bad:"
    )
    lines = message.splitlines()
    assert lines[1].startswith("  line 2 (id 'trunc'): img/trunc.png: cannot decode image: ")
    assert lines[2].startswith("  line 3 (id 'fake'): vid/fake.mp4: cannot decode video: ")
    assert lines[3] == "  line 4 (id 'nowav'): aud/missing.wav: file not found"
    assert "--skip-bad" in lines[4]
    assert len(lines) == 5


def test_skip_bad_returns_good_entries_and_three_skipped(bad_set: Path):
    entries, skipped = validate_manifest(bad_set, skip_bad=True)
    assert [e.id for e in entries] == ["ok-image", "ok-audio"]
    assert [(s.line, s.path) for s in skipped] == [
        (2, "img/trunc.png"),
        (3, "vid/fake.mp4"),
        (4, "aud/missing.wav"),
    ]
    assert all(isinstance(s, BadLine) and s.reason for s in skipped)
    assert skipped[2].reason == "file not found"
    assert entries[0].resolve(entries[0].images[0]) == (bad_set / "img" / "good.png").resolve()


def test_schema_problems_are_listed_per_line(tmp_path: Path):
    _png(tmp_path / "s" / "a.png")
    root = _write_manifest(
        tmp_path / "s",
        [
            '{"id": "x", "prompt": ',
            {"prompt": "no id"},
            {"id": "y", "prompt": "p", "colour": "red"},
            {"id": "z", "prompt": "p", "image": "a.png", "video": "v.mp4"},
            {"id": "m", "prompt": "<image> <image>", "image": "a.png"},
            {"id": "ok", "prompt": "fine"},
            {"id": "ok", "prompt": "again"},
            {"id": "f", "prompt": "p", "video": "v.mp4", "video_fps": 2, "video_frames": 3},
            "[1, 2]",
        ],
    )
    with pytest.raises(DataError) as info:
        load_manifest(root)
    lines = str(info.value).splitlines()
    assert lines[0].endswith("8 of 9 samples are bad:")
    assert lines[1].startswith("  line 1: bad JSON: ")
    assert lines[2] == "  line 2: missing field 'id'"
    assert lines[3].startswith("  line 3 (id 'y'): unknown field 'colour' (allowed: id, prompt,")
    assert lines[4].startswith("  line 4 (id 'z'): a sample carries images or a video, not both")
    assert lines[5].startswith(
        "  line 5 (id 'm'): prompt has 2 <image> marker(s) but the line names 1"
    )
    assert lines[6] == "  line 7 (id 'ok'): duplicate id 'ok' (first on line 6)"
    assert lines[7] == "  line 8 (id 'f'): give video_fps or video_frames, not both"
    assert lines[8] == "  line 9: a line must be a JSON object"


def test_entry_forms_are_normalized(tmp_path: Path):
    root = _write_manifest(
        tmp_path / "s",
        [
            {"id": "a", "prompt": "p", "image": "x.png", "answer": "yes"},
            {"id": "b", "prompt": "p", "images": ["x.png", "y.png"], "audio": ["a.wav", "b.flac"]},
            {"id": "c", "prompt": "p", "video": "v.webm", "video_fps": 2.5, "audio": "a.wav"},
            "",
        ],
    )
    a, b, c = load_manifest(root)
    assert (a.images, a.answer, a.line) == (("x.png",), "yes", 1)
    assert b.media_relpaths() == ["x.png", "y.png", "a.wav", "b.flac"]
    assert (c.video, c.video_fps, c.audio) == ("v.webm", 2.5, ("a.wav",))
    assert c.root == root.resolve()


def test_missing_manifest_and_empty_manifest(tmp_path: Path):
    with pytest.raises(DataError, match=r"has no manifest.jsonl"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"has no samples"):
        validate_manifest(tmp_path)


def test_skip_bad_with_nothing_left_fails(tmp_path: Path):
    root = _write_manifest(tmp_path / "s", [{"id": "a", "prompt": "p", "audio": "gone.wav"}])
    with pytest.raises(DataError, match=r"No usable sample is left"):
        validate_manifest(root, skip_bad=True)


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path):
    """JSON allows U+2028/U+2029/U+0085 unescaped in strings; they are not line breaks here."""
    from omniquant.evaluate.tasks import validate_task_set

    task = {"id": "t1", "task": "qa", "modality": "text", "prompt": "one\u2028two\u2029",
            "answer": "five", "metric": "exact_match"}  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text(json.dumps(task, ensure_ascii=False) + "\r\n")
    (entry,) = validate_task_set(tmp_path)
    assert entry.prompt == "one\u2028two\u2029" and entry.line == 1
    sample = {"id": "c1", "prompt": "caf\u0085 menu"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(sample, ensure_ascii=False) + "\n")
    (got,) = load_manifest(tmp_path)
    assert got.prompt == "caf\u0085 menu"


def test_a_byte_order_mark_is_read_not_a_bad_first_line(tmp_path: Path):
    """Windows editors save UTF-8 with a BOM; the first sample stays (--skip-bad, as the
    manifest once suggested, would have dropped it)."""
    lines = [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": "second"}]
    data = "".join(json.dumps(x) + "\r\n" for x in lines).encode()
    (tmp_path / "manifest.jsonl").write_bytes(b"\xef\xbb\xbf" + data)
    entries, skipped = validate_manifest(tmp_path)
    assert [(e.id, e.line, e.prompt) for e in entries] == [("a", 1, "first"), ("b", 2, "second")]
    assert skipped == []


def test_a_line_that_is_not_utf8_is_a_bad_line_others_are_kept(tmp_path: Path):
    (tmp_path / "manifest.jsonl").write_bytes(
        b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "caf\xe9"}\n{"id": "c", "prompt": "ok"}\n'
    )
    entries, skipped = validate_manifest(tmp_path, skip_bad=True)
    assert [e.id for e in entries] == ["a", "c"] and [e.line for e in entries] == [1, 3]
    assert skipped == [
        BadLine(2, None, "not UTF-8 text: byte 27 of the line (offset 54 in the file) is 0xe9; "
                "save the file as UTF-8")
    ]  # fmt: skip

"""Calibration-set manifests: a directory with ``manifest.jsonl``, one sample per line.

Policy: a manifest is validated whole before any model work. Every problem of every
line (bad JSON, missing or unknown fields, media that are missing, unreadable or
corrupt, prompt markers that do not match the media) is collected first; then either
one ``DataError`` lists them all, or, with ``skip_bad``, the bad lines are dropped and
returned so the caller can warn with a count. Media are really decoded here (Pillow
verify + load, PyAV first frame, soundfile full read), not just stat'ed.

Line format (JSON object; unknown keys are an error)::

    {"id": "chart-03",                  # required, unique in the manifest
     "prompt": "<image>\\nWhat is the tallest bar?",   # required text
     "image": "img/chart-03.png",       # or "images": [...]; paths relative to the manifest
     "video": "vid/scroll.mp4",         # at most one video; not together with images
     "video_frames": 16,                # or "video_fps": 2.0 (how frames are sampled)
     "audio": "aud/beeps.flac",         # or a list of paths
     "answer": "March"}                 # optional reference answer

Prompt markers: ``<image>``, ``<video>`` and ``<audio>`` in the prompt mark where each
medium goes, in order. For each modality the prompt has either no marker (its media are
then put before the text, see ``processing``) or exactly one marker per file.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omniquant.errors import DataError, arg_ref
from omniquant.schema import field_problems

MANIFEST_NAME = "manifest.jsonl"
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
AUDIO_MARKER = "<audio>"


class ManifestEntry(BaseModel):
    """One manifest line, with media paths as written (relative to ``root``).

    Attributes:
        id: Sample id, unique within the manifest.
        prompt: Prompt text, optionally with ``<image>``/``<video>``/``<audio>`` markers.
        images: Image paths (the line's ``image`` or ``images``).
        video: Video path.
        audio: Audio paths (the line's ``audio``, a string or a list).
        answer: Reference answer text.
        video_fps: Sample the video at this many frames per second.
        video_frames: Sample this many frames uniformly from the video.
        root: Directory the media paths are relative to (the manifest's directory).
        line: 1-based line number in ``manifest.jsonl`` (0 for entries built in code).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: The file these entries are lines of, as messages name it (a task set: tasks.jsonl).
    INDEX_NAME: ClassVar[str] = MANIFEST_NAME

    id: str = Field(min_length=1)
    prompt: str
    images: tuple[str, ...] = ()
    video: str | None = None
    audio: tuple[str, ...] = ()
    answer: str | None = None
    video_fps: float | None = Field(default=None, gt=0)
    video_frames: int | None = Field(default=None, gt=0)
    root: Path = Path(".")
    line: int = 0

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "image" in data:
            if "images" in data:
                raise ValueError("give 'image' or 'images', not both")
            data["images"] = [data.pop("image")]
        if isinstance(data.get("images"), str):
            data["images"] = [data["images"]]
        if isinstance(data.get("audio"), str):
            data["audio"] = [data["audio"]]
        return data

    @model_validator(mode="after")
    def _check(self) -> ManifestEntry:
        if self.images and self.video:
            raise ValueError(
                "a sample carries images or a video, not both (the model cannot tell them "
                "apart in the sequence); split it into two lines"
            )
        if (self.video_fps is not None or self.video_frames is not None) and not self.video:
            raise ValueError("video_fps/video_frames given without a video")
        if self.video_fps is not None and self.video_frames is not None:
            raise ValueError("give video_fps or video_frames, not both")
        for rel in self.media_relpaths():
            if not rel:
                raise ValueError("empty media path")
            if Path(rel).is_absolute():
                raise ValueError(
                    f"media path {rel!r} is absolute; make it relative to the directory of "
                    f"{self.INDEX_NAME}"
                )
            if os.path.normpath(rel).split(os.sep)[0] == "..":
                raise ValueError(
                    f"media path {rel!r} leaves the set directory; keep media files inside "
                    f"the directory of {self.INDEX_NAME}"
                )
        for marker, count in (
            (IMAGE_MARKER, len(self.images)),
            (VIDEO_MARKER, 1 if self.video else 0),
            (AUDIO_MARKER, len(self.audio)),
        ):
            found = self.prompt.count(marker)
            if found and found != count:
                raise ValueError(
                    f"prompt has {found} {marker} marker(s) but the line names {count} such "
                    f"file(s); use one marker per file, or none to put the media first"
                )
        return self

    def media_relpaths(self) -> list[str]:
        """Media paths as written in the manifest: images, then video, then audio."""
        return [*self.images, *([self.video] if self.video else []), *self.audio]

    def resolve(self, rel: str) -> Path:
        """Absolute path of a media path of this entry."""
        return (self.root / rel).resolve()


@dataclass(frozen=True)
class BadLine:
    """A manifest line that failed validation.

    Attributes:
        line: 1-based line number.
        path: The media path at fault, as written in the manifest (``None`` when the
            line itself is bad: JSON, fields, markers). When several files of one line
            are bad, the first.
        reason: What is wrong; with several problems on one line, all of them, each
            after the first prefixed by its path.
    """

    line: int
    path: str | None
    reason: str

    def __str__(self) -> str:
        return (
            f"line {self.line}: {self.path}: {self.reason}"
            if self.path
            else f"line {self.line}: {self.reason}"
        )


class ValidatedManifest(NamedTuple):
    """Result of ``validate_manifest``: the good entries and the lines skipped."""

    entries: list[ManifestEntry]
    skipped: list[BadLine]


def manifest_file(path: str | Path) -> Path:
    """The ``manifest.jsonl`` of a calibration-set directory (or the file itself)."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {MANIFEST_NAME}" if path.is_dir() else f"{path} does not exist"
        raise DataError(
            f"Calibration set: {where}. A calibration set is a directory with a "
            f"{MANIFEST_NAME} file (one JSON sample per line)."
        )
    return file


def load_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parse and schema-check a manifest without decoding media.

    Args:
        path: A calibration-set directory or its ``manifest.jsonl``.

    Returns:
        The entries in file order.

    Raises:
        DataError: One error listing every bad line (JSON, fields, markers, ids).
    """
    file = manifest_file(path)
    entries, problems = _parse(file)
    if problems:
        raise DataError(_format_problems(file, problems, len(entries) + len(problems)))
    if not entries:
        raise DataError(f"Calibration manifest {file} has no samples.")
    return entries


def validate_manifest(path: str | Path, skip_bad: bool = False) -> ValidatedManifest:
    """Validate a whole manifest, decoding every media file it names.

    Args:
        path: A calibration-set directory or its ``manifest.jsonl``.
        skip_bad: Drop bad lines instead of failing; they are returned in ``skipped``.

    Returns:
        ``(entries, skipped)``: the good entries in file order and one ``BadLine`` per
        dropped line (empty without ``skip_bad``).

    Raises:
        DataError: Without ``skip_bad``, one error listing every bad line with the
            manifest path, line number, media path and reason. With ``skip_bad``, only
            when no good line is left.
    """
    file = manifest_file(path)
    entries, problems = _parse(file)
    total = len(entries) + len(problems)
    good: list[ManifestEntry] = []
    for entry in entries:
        found = media_problems(entry)
        if found:
            problems.append(line_problem(entry.line, entry.id, found))
        else:
            good.append(entry)
    problems.sort(key=lambda p: p[0].line)
    if problems and not skip_bad:
        raise DataError(_format_problems(file, problems, total))
    if not good:
        raise DataError(
            _format_problems(file, problems, total, tail="No usable sample is left.")
            if problems
            else f"Calibration manifest {file} has no samples."
        )
    return ValidatedManifest(good, [bad for bad, _ in problems])


# A problem is (BadLine, sample id or None when the line could not be parsed).
Problem = tuple[BadLine, "str | None"]

MANIFEST_FIELDS = (
    "id",
    "prompt",
    "image",
    "images",
    "video",
    "video_fps",
    "video_frames",
    "audio",
    "answer",
)


def line_problem(line: int, sample_id: str | None, found: list[tuple[str | None, str]]) -> Problem:
    """One ``Problem`` for a line from its ``(media path or None, reason)`` findings."""
    path, reason = found[0]
    rest = [f"{p}: {r}" if p else r for p, r in found[1:]]
    return BadLine(line, path, "; ".join([reason, *rest])), sample_id


def media_problems(entry: ManifestEntry) -> list[tuple[str | None, str]]:
    """``(media path, reason)`` for every media file of ``entry`` that does not decode, or
    that leaves the set directory through a symlink."""
    from omniquant.data import media

    checkers = {"image": media.check_image, "video": media.check_video, "audio": media.check_audio}
    found: list[tuple[str | None, str]] = []
    for kind, rels in (
        ("image", entry.images),
        ("video", (entry.video,) if entry.video else ()),
        ("audio", entry.audio),
    ):
        for rel in rels:
            outside = _escapes(entry, rel)
            if outside:
                found.append((rel, outside))
                continue
            try:
                checkers[kind](entry.resolve(rel))
            except media.MediaError as err:
                found.append((rel, err.reason))
    return found


def _escapes(entry: ManifestEntry, rel: str) -> str | None:
    """Why ``rel`` leaves the set directory through a symlink (None when it stays inside).

    One rule with the ``../`` check of ``ManifestEntry``: what a set reads lies inside its
    directory, so a set can be copied or shipped whole and never reads files elsewhere.
    """
    target = entry.resolve(rel)  # symlinks followed
    root = entry.root.resolve()
    if target == root or root in target.parents:
        return None
    link = entry.root / rel
    while link != entry.root and not link.is_symlink():
        link = link.parent  # the symlink on the way: the file itself or a directory above it
    shown = os.path.relpath(link, entry.root) if link != entry.root else rel
    return (
        f"leaves the set directory through the symlink {shown!r} (it points to {target}); "
        f"copy the file into the directory of {entry.INDEX_NAME} instead of linking it"
    )


def parse_lines(
    file: Path, model: type[ManifestEntry], allowed: tuple[str, ...], what: str
) -> tuple[list, list[Problem]]:
    """Parse a JSON-lines sample file into ``model`` entries, collecting every bad line.

    Shared by calibration manifests and task sets: bad JSON, a non-object line, the
    reserved keys ``root``/``line``, schema errors (unknown fields listed with
    ``allowed``) and duplicate ids are problems; media are not decoded here.

    Args:
        file: The ``.jsonl`` file; media paths are relative to its directory.
        model: The entry schema (``ManifestEntry`` or a subclass).
        allowed: Field names shown in "unknown field" messages.
        what: How errors name the file ("Calibration manifest", "Task set").

    The file is UTF-8; a leading byte-order mark (Windows editors write one) is skipped,
    and a line that is not UTF-8 is a problem naming its byte.

    Raises:
        DataError: The file cannot be read.
    """
    entries: list = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    root = file.parent.resolve()
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DataError(f"{what} {file}: cannot read it ({err.strerror}).") from err
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    # Split on "\n" only (a byte UTF-8 never uses inside a character): str.splitlines()
    # also breaks at U+2028/U+2029/U+0085, which JSON allows unescaped inside strings
    # (json.dumps(..., ensure_ascii=False) writes them).
    for number, raw_bytes in enumerate(data[offset:].split(b"\n"), start=1):
        start, offset = offset, offset + len(raw_bytes) + 1
        try:
            raw = raw_bytes.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as err:
            reason = (
                f"not UTF-8 text: byte {err.start + 1} of the line (offset {start + err.start} "
                f"in the file) is 0x{raw_bytes[err.start]:02x}; save the file as UTF-8"
            )
            problems.append(line_problem(number, None, [(None, reason)]))
            continue
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(line_problem(number, None, [(None, f"bad JSON: {err}")]))
            continue
        if not isinstance(data, dict):
            problems.append(line_problem(number, None, [(None, "a line must be a JSON object")]))
            continue
        sample_id = data["id"] if isinstance(data.get("id"), str) else None
        reserved = sorted({"root", "line"} & data.keys())
        if reserved:
            reason = f"unknown field(s) {', '.join(reserved)} (allowed: {', '.join(allowed)})"
            problems.append(line_problem(number, sample_id, [(None, reason)]))
            continue
        try:
            entry = model.model_validate({**data, "root": root, "line": number})
        except ValidationError as err:
            reason = _pydantic_reason(err, allowed)
            problems.append(line_problem(number, sample_id, [(None, reason)]))
            continue
        if entry.id in seen:
            reason = f"duplicate id {entry.id!r} (first on line {seen[entry.id]})"
            problems.append(line_problem(number, entry.id, [(None, reason)]))
            continue
        seen[entry.id] = number
        entries.append(entry)
    return entries, problems


def format_problems(what: str, file: Path, problems: list[Problem], total: int, tail: str) -> str:
    """One error text: a header counting bad lines, one line each, then ``tail`` (the fix)."""
    lines = [f"{what} {file}: {len(problems)} of {total} samples are bad:"]
    for bad, sample_id in sorted(problems, key=lambda p: p[0].line):
        who = f"line {bad.line}" + (f" (id {sample_id!r})" if sample_id else "")
        lines.append(f"  {who}: {bad.path}: {bad.reason}" if bad.path else f"  {who}: {bad.reason}")
    lines.append(tail)
    return "\n".join(lines)


def _parse(file: Path) -> tuple[list[ManifestEntry], list[Problem]]:
    return parse_lines(file, ManifestEntry, MANIFEST_FIELDS, "Calibration manifest")


def _pydantic_reason(err: ValidationError, allowed: tuple[str, ...]) -> str:
    parts = []
    for problem in field_problems(err):
        where = problem.where
        if problem.kind == "missing":
            parts.append(f"missing field {where!r}")
        elif problem.kind == "unknown":
            parts.append(f"unknown field {where!r} (allowed: {', '.join(allowed)})")
        elif where:
            parts.append(f"field {where!r}: {problem.message} (got {problem.input!r})")
        else:
            parts.append(problem.message)
    return "; ".join(parts)


def _format_problems(file: Path, problems: list[Problem], total: int, tail: str = "") -> str:
    return format_problems(
        "Calibration manifest",
        file,
        problems,
        total,
        tail or f"Fix or remove these lines, or skip them with {arg_ref('skip_bad')}.",
    )

"""Task sets: a directory with ``tasks.jsonl``, one evaluation sample per line.

Policy: a task set is validated whole before any model work, in the style of
``omniquant.data.manifest.validate_manifest``: every problem of every line (bad JSON,
missing or unknown fields, a modality whose media are missing, a metric that does not
fit, media that are missing or do not decode) is collected, then one ``DataError``
lists them all with the file, line number, sample id and the fix. There is no
``skip_bad``: a report over a silently shrunken task set would not be comparable.

Line format (JSON object; unknown keys are an error)::

    {"id": "img-shape-1",                 # required, unique in the set
     "task": "image-shape",               # required: results are grouped by task name
     "modality": "image",                 # required: text | image | video | audio
     "prompt": "<image>\\nWhich shape is this?",
     "image": "media/circle.png",         # media as in calibration manifests (relative
                                          # paths; image/images, video + video_frames or
                                          # video_fps, audio as a path or a list)
     "answer": "circle",                  # required reference answer
     "metric": "multiple_choice",         # exact_match | multiple_choice | wer
     "choices": ["circle", "square"]}     # multiple_choice only; must contain the answer

Rules: the named ``modality`` must have its media on the line (``text`` lines carry
no media); other media may accompany it (an image question asked by voice is
``modality: image`` with an ``audio`` file). All lines of one task share one metric.

Lookup (``resolve_task_set``): a shipped name resolves to ``<tasks root>/<name>``, the
tasks root being ``$OMNIQUANT_TASKS`` when set, else the repository's top-level
``tasks/`` directory next to the ``omniquant`` package (editable installs); anything
else must be a directory holding a ``tasks.jsonl``. Write a local directory of the
same name as a shipped set as a path (``./omni-smoke``) to use it instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omniquant.data.manifest import ManifestEntry
from omniquant.errors import DataError

if TYPE_CHECKING:
    import torch

    from omniquant.data.batch import Sample
    from omniquant.data.processing import OmniProcessor

TASKS_NAME = "tasks.jsonl"
TASKS_ROOT_ENV = "OMNIQUANT_TASKS"
MODALITIES = ("text", "image", "video", "audio")
METRICS = ("exact_match", "multiple_choice", "wer")
_MEDIA_FIELDS = ("image", "images", "video", "video_fps", "video_frames", "audio")
_ALLOWED = ("id", "task", "modality", "prompt", *_MEDIA_FIELDS, "answer", "metric", "choices")


class TaskEntry(BaseModel):
    """One ``tasks.jsonl`` line.

    Attributes:
        id: Sample id, unique within the set.
        task: Task name (results are aggregated per task).
        modality: The modality the task tests: text, image, video or audio.
        prompt: Prompt text, with optional ``<image>``/``<video>``/``<audio>`` markers.
        answer: Reference answer.
        metric: ``exact_match``, ``multiple_choice`` or ``wer``.
        choices: Answer options (``multiple_choice`` only).
        images: Image paths (``image`` or ``images`` on the line).
        video: Video path.
        video_fps: Sample the video at this many frames per second.
        video_frames: Sample this many frames uniformly.
        audio: Audio paths.
        root: Directory media paths are relative to (the set's directory).
        line: 1-based line number in ``tasks.jsonl`` (0 for entries built in code).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    modality: Literal["text", "image", "video", "audio"]
    prompt: str
    answer: str = Field(min_length=1)
    metric: Literal["exact_match", "multiple_choice", "wer"]
    choices: tuple[str, ...] | None = None
    images: tuple[str, ...] = ()
    video: str | None = None
    video_fps: float | None = Field(default=None, gt=0)
    video_frames: int | None = Field(default=None, gt=0)
    audio: tuple[str, ...] = ()
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
        for key in ("images", "audio"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
        return data

    @model_validator(mode="after")
    def _check(self) -> TaskEntry:
        from omniquant.evaluate.metrics import normalize_answer

        present = {
            "image": bool(self.images),
            "video": self.video is not None,
            "audio": bool(self.audio),
        }
        if self.modality == "text" and any(present.values()):
            names = ", ".join(k for k, v in present.items() if v)
            raise ValueError(
                f"modality 'text' but the line has {names} media; set modality to the "
                "medium the task tests, or drop the media"
            )
        if self.modality != "text" and not present[self.modality]:
            field_name = "image" if self.modality == "image" else self.modality
            raise ValueError(
                f"modality {self.modality!r} but the line has no {field_name!r} file; add it "
                "or fix the modality"
            )
        if self.metric == "multiple_choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("metric 'multiple_choice' needs 'choices' with at least 2 options")
            normalized = [normalize_answer(c) for c in self.choices]
            if len(set(normalized)) != len(normalized):
                raise ValueError(
                    f"choices {list(self.choices)} are not distinct after normalisation"
                )
            if normalize_answer(self.answer) not in normalized:
                raise ValueError(
                    f"answer {self.answer!r} is not one of the choices {list(self.choices)}"
                )
        elif self.choices is not None:
            raise ValueError(f"'choices' is only for metric 'multiple_choice', not {self.metric!r}")
        # Media rules (markers, images xor video, relative paths) are the calibration
        # manifest's; checking through it keeps one definition.
        try:
            self.manifest_entry()
        except ValidationError as err:
            raise ValueError(
                "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            )
        return self

    def manifest_entry(self) -> ManifestEntry:
        """The line as a calibration ``ManifestEntry`` (what ``OmniProcessor`` takes)."""
        return ManifestEntry(
            id=self.id,
            prompt=self.prompt,
            images=self.images,
            video=self.video,
            audio=self.audio,
            answer=self.answer,
            video_fps=self.video_fps,
            video_frames=self.video_frames,
            root=self.root,
            line=self.line,
        )

    def media_relpaths(self) -> list[str]:
        """Media paths as written: images, then video, then audio."""
        return [*self.images, *([self.video] if self.video else []), *self.audio]


@dataclass
class TaskItem:
    """A task line processed for a model: the ``Sample`` plus tokenized choices.

    Attributes:
        entry: The validated line.
        sample: The processed prompt; ``answer_ids`` holds the reference answer tokens.
        choice_ids: ``(1, C_i)`` token ids of each choice (``multiple_choice`` only).
    """

    entry: TaskEntry
    sample: Sample
    choice_ids: list[torch.Tensor] = field(default_factory=list)


def tasks_root() -> Path:
    """The directory shipped task sets live in (see the module's lookup rule)."""
    override = os.environ.get(TASKS_ROOT_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "tasks"


def shipped_task_sets() -> list[str]:
    """Names of the shipped task sets, sorted."""
    root = tasks_root()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / TASKS_NAME).is_file())


def resolve_task_set(name_or_dir: str | Path) -> Path:
    """Resolve ``--tasks NAME|DIR`` to a task-set directory.

    Args:
        name_or_dir: A shipped set name (``omni-smoke``) or a directory with ``tasks.jsonl``.

    Returns:
        The set's directory (absolute).

    Raises:
        DataError: Neither a shipped name nor a directory with ``tasks.jsonl``; the
            message lists the shipped names.
    """
    shipped = shipped_task_sets()
    text = str(name_or_dir)
    if isinstance(name_or_dir, str) and text in shipped:
        return (tasks_root() / text).resolve()
    path = Path(name_or_dir)
    if path.is_dir():
        if not (path / TASKS_NAME).is_file():
            raise DataError(
                f"Task set directory {path} has no {TASKS_NAME}; a task set is a directory "
                f"with one JSON task sample per line in {TASKS_NAME} (see tasks/README.md)."
            )
        return path.resolve()
    names = ", ".join(shipped) if shipped else f"none found under {tasks_root()}"
    raise DataError(
        f"Unknown task set {text!r}: it is neither a shipped set nor a directory. "
        f"Shipped sets: {names}. Or pass a directory with a {TASKS_NAME}."
    )


def validate_task_set(name_or_dir: str | Path) -> list[TaskEntry]:
    """Resolve and validate a whole task set, decoding every media file it names.

    Args:
        name_or_dir: Shipped set name or directory.

    Returns:
        The entries in file order.

    Raises:
        DataError: Unknown set, no samples, or one error listing every bad line (file,
            line number, id, media path and what to fix).
    """
    from omniquant.data import media

    root = resolve_task_set(name_or_dir)
    file = root / TASKS_NAME
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"Task set {file}: cannot read it: {err}") from err
    checkers = {"image": media.check_image, "video": media.check_video, "audio": media.check_audio}
    entries: list[TaskEntry] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    metric_of_task: dict[str, tuple[str, int]] = {}
    total = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        total += 1
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: bad JSON: {err}")
            continue
        if not isinstance(data, dict):
            problems.append(f"line {number}: a line must be a JSON object")
            continue
        who = f"line {number}" + (
            f" (id {data['id']!r})" if isinstance(data.get("id"), str) else ""
        )
        reserved = sorted({"root", "line"} & data.keys())
        if reserved:
            problems.append(
                f"{who}: unknown field(s) {', '.join(reserved)} (allowed: {', '.join(_ALLOWED)})"
            )
            continue
        try:
            entry = TaskEntry.model_validate({**data, "root": root, "line": number})
        except ValidationError as err:
            problems.append(f"{who}: {_pydantic_reason(err)}")
            continue
        if entry.id in seen:
            problems.append(f"{who}: duplicate id {entry.id!r} (first on line {seen[entry.id]})")
            continue
        seen[entry.id] = number
        first = metric_of_task.setdefault(entry.task, (entry.metric, number))
        if first[0] != entry.metric:
            problems.append(
                f"{who}: task {entry.task!r} uses metric {first[0]!r} on line {first[1]} but "
                f"{entry.metric!r} here; one task has one metric (rename one of the tasks)"
            )
            continue
        bad_media = []
        for kind, rels in (
            ("image", entry.images),
            ("video", (entry.video,) if entry.video else ()),
            ("audio", entry.audio),
        ):
            for rel in rels:
                try:
                    checkers[kind](entry.manifest_entry().resolve(rel))
                except media.MediaError as err:
                    bad_media.append(f"{rel}: {err.reason}")
        if bad_media:
            problems.append(f"{who}: " + "; ".join(bad_media))
            continue
        entries.append(entry)
    if problems:
        listing = "\n  ".join(problems)
        raise DataError(
            f"Task set {file}: {len(problems)} of {total} samples are bad:\n  {listing}\n"
            "Fix or remove these lines (format: tasks/README.md)."
        )
    if not entries:
        raise DataError(f"Task set {file} has no samples.")
    return entries


def prepare_task_items(processor: OmniProcessor, entries: list[TaskEntry]) -> list[TaskItem]:
    """Process validated entries into model inputs (media decoded, prompts tokenized).

    Raises:
        DataError: A sample the processor rejects (named by line and id).
    """
    import torch

    items = []
    for entry in entries:
        try:
            sample = processor(entry.manifest_entry())
        except DataError as err:
            raise DataError(
                f"Task set {entry.root / TASKS_NAME}: line {entry.line} (id {entry.id!r}) cannot "
                f"be processed: {err}"
            ) from err
        sample.meta.update(task=entry.task, modality=entry.modality, metric=entry.metric)
        choice_ids = []
        for choice in entry.choices or ():
            ids = processor.tokenizer(choice, add_special_tokens=False).input_ids
            choice_ids.append(torch.tensor([ids], dtype=torch.long))
        items.append(TaskItem(entry=entry, sample=sample, choice_ids=choice_ids))
    return items


def _pydantic_reason(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(x) for x in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            parts.append(f"missing field {where!r}")
        elif item["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r} (allowed: {', '.join(_ALLOWED)})")
        elif where:
            parts.append(f"field {where!r}: {message} (got {item.get('input')!r})")
        else:
            parts.append(message)
    return "; ".join(parts)

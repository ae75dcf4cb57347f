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
tasks root being ``$OMNIQUANT_TASKS`` when set, else the shipped ``tasks/`` directory
(``omniquant.data.shipped``: the checkout's for editable installs, the wheel's copy for
wheels); anything else must be a directory holding a ``tasks.jsonl``. Write a local
directory of the same name as a shipped set as a path (``./omni-smoke``) to use it
instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from omniquant.data.locate import SetLocator
from omniquant.data.manifest import (
    ManifestEntry,
    format_problems,
    line_problem,
    media_problems,
    parse_lines,
)
from omniquant.errors import DataError

if TYPE_CHECKING:
    import torch

    from omniquant.data.batch import Sample
    from omniquant.data.processing import OmniProcessor

TASKS_NAME = "tasks.jsonl"
TASKS_ROOT_ENV = "OMNIQUANT_TASKS"
MODALITIES = ("text", "image", "video", "audio")
_MEDIA_FIELDS = ("image", "images", "video", "video_fps", "video_frames", "audio")
_ALLOWED = ("id", "task", "modality", "prompt", *_MEDIA_FIELDS, "answer", "metric", "choices")


class TaskEntry(ManifestEntry):
    """One ``tasks.jsonl`` line: a calibration ``ManifestEntry`` (prompt, media and
    their rules) plus what evaluation needs.

    Attributes:
        task: Task name (results are aggregated per task).
        modality: The modality the task tests: text, image, video or audio.
        answer: Reference answer (required here).
        metric: ``exact_match``, ``multiple_choice`` or ``wer``.
        choices: Answer options (``multiple_choice`` only).
    """

    INDEX_NAME: ClassVar[str] = TASKS_NAME

    task: str = Field(min_length=1)
    modality: Literal["text", "image", "video", "audio"]
    answer: str = Field(min_length=1)
    metric: Literal["exact_match", "multiple_choice", "wer"]
    choices: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _check_task(self) -> TaskEntry:
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
            raise ValueError(
                f"modality {self.modality!r} but the line has no {self.modality!r} file; add it "
                "or fix the modality"
            )
        if not normalize_answer(self.answer):
            raise ValueError(
                f"answer {self.answer!r} is empty after normalisation (punctuation and "
                "spaces only), so every prediction would score alike; write the answer in words"
            )
        if self.metric == "multiple_choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("metric 'multiple_choice' needs 'choices' with at least 2 options")
            normalized = [normalize_answer(c) for c in self.choices]
            if not all(normalized):
                raise ValueError(
                    f"choices {list(self.choices)}: a choice is empty after normalisation "
                    "(punctuation and spaces only)"
                )
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
        return self


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


TASK_SETS = SetLocator(
    kind="task set",
    env=TASKS_ROOT_ENV,
    dirname="tasks",
    index=TASKS_NAME,
    hint="one JSON task sample per line (see tasks/README.md)",
)


def shipped_task_sets() -> list[str]:
    """Names of the shipped task sets, sorted."""
    return TASK_SETS.shipped()


def resolve_task_set(name_or_dir: str | Path) -> Path:
    """Resolve ``--tasks NAME|DIR`` to a task-set directory (absolute).

    Raises:
        DataError: Neither a shipped name nor a directory with ``tasks.jsonl``; the
            message lists the shipped names.
    """
    return TASK_SETS.resolve(name_or_dir)


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
    root = resolve_task_set(name_or_dir)
    file = root / TASKS_NAME
    what = "Task set"
    entries, problems = parse_lines(file, TaskEntry, _ALLOWED, what)
    total = len(entries) + len(problems)
    good: list[TaskEntry] = []
    metric_of_task: dict[str, tuple[str, int]] = {}
    for entry in entries:
        first = metric_of_task.setdefault(entry.task, (entry.metric, entry.line))
        if first[0] != entry.metric:
            reason = (
                f"task {entry.task!r} uses metric {first[0]!r} on line {first[1]} but "
                f"{entry.metric!r} here; one task has one metric (rename one of the tasks)"
            )
            problems.append(line_problem(entry.line, entry.id, [(None, reason)]))
            continue
        found = media_problems(entry)
        if found:
            problems.append(line_problem(entry.line, entry.id, found))
            continue
        good.append(entry)
    if problems:
        raise DataError(
            format_problems(
                what, file, problems, total, "Fix or remove these lines (format: tasks/README.md)."
            )
        )
    if not good:
        raise DataError(f"Task set {file} has no samples.")
    return good


def prepare_task_items(processor: OmniProcessor, entries: list[TaskEntry]) -> list[TaskItem]:
    """Process validated entries into model inputs (media decoded, prompts tokenized).

    Raises:
        DataError: A sample the processor rejects (named by line and id).
    """
    import torch

    items = []
    for entry in entries:
        try:
            sample = processor(entry)
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

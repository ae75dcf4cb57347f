"""Typed results of an evaluation harness run (lm-eval, lmms-eval): what it scored, per sample.

Policy: plain records, no model, no client, no harness import (as ``results.py``), so the
report (``omniquant.report.harness``) reads them without the harness installed. The
harness entries that fill them live in ``omniquant.endpoint.harness``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HarnessSample:
    """One document of one task, as the harness scored it.

    Attributes:
        doc_id: The harness's document index (the pairing key).
        value: The task's metric on this document.
        prediction: The filtered response (text, or the chosen option's index).
        cached: Whether every request of this document came from the harness's cache
            (``None`` where the harness does not say).
    """

    doc_id: int
    value: float
    prediction: str | None
    cached: bool | None = None


@dataclass
class HarnessTask:
    """One task of one harness run.

    Attributes:
        name: Task name.
        metric: The metric read per sample.
        higher_is_better: ``False`` for error rates (WER).
        version: The task's version.
        num_fewshot: Few-shot examples.
        config: The task configuration the harness recorded (compared across models).
        samples: Per-document results, by ``doc_id``.
        log: The per-sample log file read.
    """

    name: str
    metric: str
    higher_is_better: bool
    version: str
    num_fewshot: int | None
    config: dict
    samples: list[HarnessSample]
    log: str


@dataclass
class HarnessRun:
    """One harness run against one model."""

    harness: str
    model: str
    tasks: dict[str, HarnessTask]
    output_dir: str
    log: str
    command: list[str] = field(default_factory=list)

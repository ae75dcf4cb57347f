"""Evaluation on omni task sets: task-set files, metrics, fidelity against a baseline, EVS sweeps.

Stages build on each other: ``tasks`` validates and processes a task set,
``runner.evaluate_model`` runs one loaded model over it (greedy answers, metric
scores, per-sample KL and top-1 agreement against stored baseline distributions),
``evs.evs_sweep`` repeats the video samples at several EVS rates, ``describe`` says
what a checkpoint's files are, and ``results`` holds the typed results (no model, no
tensor) that the report renders. ``omniquant.experiments.compare`` loads one model at a
time and calls these.
"""

from __future__ import annotations

from omniquant.evaluate.evs import evs_sweep
from omniquant.evaluate.fidelity import SpanDistribution
from omniquant.evaluate.metrics import exact_match, normalize_answer, word_error_rate
from omniquant.evaluate.runner import ModelEvaluation, SampleResult, evaluate_model
from omniquant.evaluate.tasks import (
    TaskEntry,
    TaskItem,
    prepare_task_items,
    resolve_task_set,
    shipped_task_sets,
    validate_task_set,
)

__all__ = [
    "ModelEvaluation",
    "SampleResult",
    "SpanDistribution",
    "TaskEntry",
    "TaskItem",
    "evaluate_model",
    "evs_sweep",
    "exact_match",
    "normalize_answer",
    "prepare_task_items",
    "resolve_task_set",
    "shipped_task_sets",
    "validate_task_set",
    "word_error_rate",
]

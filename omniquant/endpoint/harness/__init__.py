"""Evaluation harnesses (lm-eval, lmms-eval) driven against a model's OpenAI-compatible endpoint.

Policy:
- One interface (``Harness``), one registry entry per harness (``HARNESSES``); a stage
  asks the registry by name and never branches on which harness it drives. A new
  harness is one file here plus its entry.
- A harness is run through its own command line in a child process, with per-sample
  logging on; omniquant never re-scores: it reads the harness's per-sample log back
  into ``HarnessRun`` (typed, no model, no client), which the report pairs by document
  id (``omniquant.report.harness``).
- Harnesses are optional extras; a missing one is an ``EndpointError`` that names the
  install command. Nothing here imports a harness at module load.
- Comparability of two runs (task version, sample count, few-shot, configuration) is
  decided here (``check_comparable``), where the harness's metadata is understood.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from omniquant.errors import EndpointError
from omniquant.evaluate.harness_results import HarnessRun, HarnessSample, HarnessTask

__all__ = ["HARNESSES", "Harness", "HarnessRun", "HarnessSample", "HarnessTask",
           "check_comparable", "get_harness", "require"]  # fmt: skip


class Harness(Protocol):
    """What a harness entry provides."""

    name: str
    module: str
    install: str

    def check_tasks(self, tasks: list[str], include: Path | None) -> None:
        """Refuse unknown task names (by name, with the harness's list where it has one)."""

    def run(self, *, url: str, model_id: str, tokenizer: str | None, tasks: list[str],
            include: Path | None, out: Path, extra_args: list[str]) -> HarnessRun:  # fmt: skip
        """Run the tasks against the endpoint and read the per-sample logs back."""


def require(harness: Harness) -> None:
    """Raise a clear error when the harness's package is not installed."""
    if importlib.util.find_spec(harness.module) is None:
        raise EndpointError(
            f"harness {harness.name!r} is not installed; install it with: {harness.install}",
            arg="harness",
        )


def get_harness(name: str) -> Harness:
    """The registry entry named ``name``."""
    if name not in HARNESSES:
        raise EndpointError(
            f"unknown harness {name!r}; known: {', '.join(HARNESSES)}.", arg="harness", value=name
        )
    return HARNESSES[name]


def check_comparable(runs: list[HarnessRun]) -> None:
    """Refuse runs whose tasks differ in version, sample set, few-shot or configuration."""
    ref = runs[0]
    for other in runs[1:]:
        for name, task in ref.tasks.items():
            theirs = other.tasks.get(name)
            problem = None
            if theirs is None:
                problem = "has no results"
            elif theirs.version != task.version:
                problem = f"task version {theirs.version} vs {task.version}"
            elif theirs.num_fewshot != task.num_fewshot:
                problem = f"num_fewshot {theirs.num_fewshot} vs {task.num_fewshot}"
            elif sorted(s.doc_id for s in theirs.samples) != sorted(s.doc_id for s in task.samples):
                problem = (f"{len(theirs.samples)} samples vs {len(task.samples)} "
                           "(or different documents)")  # fmt: skip
            elif theirs.config != task.config:
                keys = sorted(k for k in set(task.config) | set(theirs.config)
                              if task.config.get(k) != theirs.config.get(k))  # fmt: skip
                problem = f"task configuration differs in {', '.join(keys)}"
            if problem:
                raise EndpointError(
                    f"{ref.harness} task {name!r}: {other.model} is not comparable with "
                    f"{ref.model}: {problem} (logs {other.output_dir}, {ref.output_dir})."
                )


def _registry() -> dict[str, Harness]:
    from omniquant.endpoint.harness.lm_eval import LmEval
    from omniquant.endpoint.harness.lmms_eval import LmmsEval

    return {h.name: h for h in (LmEval(), LmmsEval())}


HARNESSES: dict[str, Harness] = _registry()

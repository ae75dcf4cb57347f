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
- A harness may live in another Python environment (lmms-eval needs a torch/torchvision
  pair that the CPU torch of omniquant's own environment cannot be): it is a client of
  the endpoint, so its interpreter is a setting (``--harness-python`` or the entry's
  environment variable, e.g. ``OMNIQUANT_LMMS_EVAL_PYTHON``). With one given, the task
  list is asked from that interpreter in a child process too; without, the harness is
  imported here (``sys.executable``).
- Comparability of two runs (task version, sample count, few-shot, configuration) is
  decided here (``check_comparable``), where the harness's metadata is understood.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from omniquant.errors import EndpointError
from omniquant.evaluate.harness_results import HarnessRun, HarnessSample, HarnessTask

__all__ = ["HARNESSES", "Harness", "HarnessRun", "HarnessSample", "HarnessTask",
           "check_comparable", "get_harness", "interpreter", "known_tasks", "refuse_unknown",
           "require"]  # fmt: skip


class Harness(Protocol):
    """What a harness entry provides."""

    name: str
    module: str
    install: str
    python_env: str
    """Environment variable naming the harness's interpreter (``--harness-python`` wins)."""

    def check_tasks(self, tasks: list[str], include: Path | None,
                    python: str | None = None) -> None:  # fmt: skip
        """Refuse unknown task names (by name, with the harness's list where it has one)."""

    def run(self, *, url: str, model_id: str, tokenizer: str | None, tasks: list[str],
            include: Path | None, out: Path, extra_args: list[str],
            python: str | None = None) -> HarnessRun:  # fmt: skip
        """Run the tasks against the endpoint and read the per-sample logs back."""


def interpreter(harness: Harness, python: str | None = None) -> str | None:
    """The harness's own interpreter (``python``, else its environment variable), or ``None``
    for this one (the harness imported in this environment)."""
    python = python or os.environ.get(harness.python_env) or None
    # absolute (the child runs in the task folder), but not resolved: a venv's python is a
    # symlink whose target is outside the venv
    return os.path.abspath(python) if python and os.sep in python else python


def _where(harness: Harness, python: str) -> str:
    env = os.environ.get(harness.python_env)
    src = harness.python_env if env and interpreter(harness, env) == python else "--harness-python"
    return f"{python} (from {src})"


def require(harness: Harness, python: str | None = None) -> None:
    """Raise a clear error when the harness's package is not installed (in ``python``, the
    harness's own interpreter, when one is given or set in its environment variable)."""
    python = interpreter(harness, python)
    if python is None:
        if importlib.util.find_spec(harness.module) is None:
            raise EndpointError(
                f"harness {harness.name!r} is not installed; install it with: {harness.install} "
                f"(or name an interpreter that has it: --harness-python PATH or "
                f"{harness.python_env}=PATH).",
                arg="harness",
            )
        return
    try:
        proc = subprocess.run([python, "-c", f"import {harness.module}"], capture_output=True,
                              text=True, timeout=600, check=False)  # fmt: skip
        problem = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
    except OSError as err:
        problem = str(err)
    if problem:
        raise EndpointError(
            f"the {harness.name} interpreter {_where(harness, python)} cannot import "
            f"{harness.module}: {problem}. Install it there with: {harness.install}",
            arg="harness_python", value=python,
        )  # fmt: skip


_LIST_TASKS = (
    "import json, sys\n"
    "from {module}.tasks import TaskManager\n"
    "tm = TaskManager(include_path=sys.argv[1] or None)\n"
    "print(json.dumps(sorted(tm.all_tasks)))\n"
)


def known_tasks(harness: Harness, include: Path | None, python: str | None = None) -> list[str]:
    """Every task name the harness knows (its ``TaskManager``, with ``include``), asked in
    the harness's own interpreter when it has one."""
    python = interpreter(harness, python)
    if python is None:
        tasks = importlib.import_module(f"{harness.module}.tasks")
        return list(tasks.TaskManager(include_path=str(include) if include else None).all_tasks)
    proc = subprocess.run([python, "-c", _LIST_TASKS.format(module=harness.module),
                           str(include or "")], capture_output=True, text=True,
                          timeout=1200, check=False)  # fmt: skip
    try:
        return list(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError) as err:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise EndpointError(
            f"{_where(harness, python)} did not list {harness.name}'s tasks "
            f"(exit code {proc.returncode}): {tail}",
            arg="harness_python", value=python,
        ) from err


def refuse_unknown(harness: Harness, tasks: list[str], known: list[str], listing: str,
                   close: bool = False) -> None:  # fmt: skip
    """Refuse task names the harness does not know, by name, with ``listing`` (the command
    that lists the harness's tasks) and, with ``close``, the close matches of each."""
    import difflib

    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return

    def near(name: str) -> str:
        hits = difflib.get_close_matches(name, known, n=5, cutoff=0.6) if close else []
        return f" (close: {', '.join(hits)})" if hits else ""

    raise EndpointError(
        f"{harness.name} does not know task(s) {', '.join(f'{t!r}{near(t)}' for t in unknown)}; "
        f"{harness.name} lists {len(known)} tasks (`{listing}`).",
        arg="harness_tasks",
    )


def run_logged(harness: Harness, cmd: list[str], log: Path, model_id: str, tasks: list[str],
               include: Path | None, env: dict | None = None) -> None:  # fmt: skip
    """Run the harness's command line in ``include`` (its task folder), its output into
    ``log``; a non-zero exit is an ``EndpointError`` naming the model, the tasks, the log
    and the log's last lines."""
    with open(log, "w") as sink:
        rc = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                             cwd=str(include) if include else None)  # fmt: skip
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise EndpointError(
            f"{harness.name} failed on model {model_id!r}, tasks {', '.join(tasks)} "
            f"(exit code {rc}); its log: {log}\n{tail}"
        )


def python_for(harness: Harness, python: str | None) -> str:
    """The executable that runs the harness's command line."""
    return interpreter(harness, python) or sys.executable


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

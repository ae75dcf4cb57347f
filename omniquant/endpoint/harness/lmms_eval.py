"""lmms-eval (EvolvingLMMs-Lab, 0.7.x) as a harness entry: opt-in.

Policy:
- Run as ``python -m lmms_eval --model openai_compatible`` (chat completions; the
  server's URL in ``OPENAI_API_BASE``, model id as ``model_version``) with
  ``--log_samples --output_path``; the per-sample log has lm-eval's shape (``doc_id``
  and the metric per line) and is read by the same reader.
- Not part of the dev extra: lmms-eval 0.7.3 depends on a torchvision whose PyPI wheel
  pulls a CUDA torch (the CPU torch 2.13 cannot load its operators) and needs
  ``filelock<4``; install it on a GPU host (README, "Standard benchmarks"). Its
  task names are checked by its own task manager.
- lmms-eval cannot score log-likelihood against an OpenAI endpoint (generation tasks
  only). This entry has not been run in this repository's CI (see tests/test_harness.py,
  opt-in with ``OMNIQUANT_TEST_LMMS_EVAL=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omniquant.endpoint.harness import HarnessRun, require
from omniquant.endpoint.harness.lm_eval import read_output
from omniquant.errors import EndpointError

PIN = "lmms-eval==0.7.3"


class LmmsEval:
    """The lmms-eval entry."""

    name = "lmms-eval"
    module = "lmms_eval"
    install = f'pip install "{PIN}" "filelock<4" (on a host whose torch matches its torchvision)'

    def check_tasks(self, tasks: list[str], include: Path | None) -> None:
        require(self)
        from lmms_eval.tasks import TaskManager

        known = TaskManager(include_path=str(include) if include else None).all_tasks
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise EndpointError(
                f"lmms-eval does not know task(s) {', '.join(map(repr, unknown))}; it lists "
                f"{len(known)} tasks (`python -m lmms_eval --tasks list`).",
                arg="harness_tasks",
            )

    def run(self, *, url: str, model_id: str, tokenizer: str | None, tasks: list[str],
            include: Path | None, out: Path, extra_args: list[str]) -> HarnessRun:  # fmt: skip
        require(self)
        # the child runs in the include folder: every path it gets is absolute
        out = out.resolve()
        include = include.resolve() if include else None
        out.mkdir(parents=True, exist_ok=True)
        samples_dir = out / "samples"
        cmd = [sys.executable, "-m", "lmms_eval", "--model", "openai_compatible",
               "--model_args", f"model_version={model_id}", "--tasks", ",".join(tasks),
               "--log_samples", "--output_path", str(samples_dir), *extra_args]  # fmt: skip
        if include:
            cmd += ["--include_path", str(include)]
        env = {**os.environ, "OPENAI_API_BASE": url, "OPENAI_API_KEY": "EMPTY"}
        log = out / "lmms-eval.log"
        with open(log, "w") as sink:
            rc = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                 cwd=str(include) if include else None)  # fmt: skip
        if rc != 0:
            raise EndpointError(
                f"lmms-eval failed on model {model_id!r}, tasks {', '.join(tasks)} "
                f"(exit code {rc}); its log: {log}"
            )
        found = read_output(samples_dir, model_id, tasks, None, log, harness=self.name)
        return HarnessRun(harness=self.name, model=model_id, tasks=found,
                          output_dir=str(samples_dir), log=str(log), command=cmd)  # fmt: skip

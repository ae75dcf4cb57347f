"""lmms-eval (EvolvingLMMs-Lab, 0.7.x) as a harness entry, usually in its own environment.

Policy:
- Run as ``PYTHON -m lmms_eval --model openai_compatible`` (the server's URL in
  ``OPENAI_API_BASE``, the model id as ``model_version``, ``pass_video_url=True`` so a
  video goes as one ``video_url`` part the server samples, as vLLM does, instead of
  frames sent as separate images; ``--model_args`` in the extra arguments are appended
  to these) with ``--log_samples
  --output_path``; it writes ``<stamp>_results.json`` and ``<stamp>_samples_<task>.jsonl``
  per task, read by lm-eval's reader (``lm_eval.read_output``, which knows both names).
  A request that failed after lmms-eval's retries is logged by lmms-eval as the text
  ``[LMMS_EVAL_REQUEST_FAILED ...]`` and scored as a wrong answer; the reader refuses
  such a run instead.
- Its own interpreter: lmms-eval 0.7.3 needs a torchvision whose operators the CPU torch
  2.13 of omniquant's environment cannot load, so it is installed in a separate
  environment (README, "Standard benchmarks") and named with ``--harness-python PATH`` or
  ``OMNIQUANT_LMMS_EVAL_PYTHON``. It is a client of the endpoint: it needs nothing of
  omniquant's. Its task names are asked from its own ``TaskManager`` in that interpreter.
- lmms-eval cannot score log-likelihood against an OpenAI endpoint (generation tasks
  only). The opt-in end-to-end test is tests/test_harness.py (``OMNIQUANT_LMMS_EVAL_PYTHON``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from omniquant.endpoint.harness import (
    HarnessRun,
    known_tasks,
    python_for,
    refuse_unknown,
    require,
)
from omniquant.endpoint.harness.lm_eval import read_output
from omniquant.errors import EndpointError

PIN = "lmms-eval==0.7.3"
INSTALL = (
    "python3 -m venv .venv-lmms && .venv-lmms/bin/pip install torch==2.14.1 torchvision==0.29.1 "
    f'&& .venv-lmms/bin/pip install "{PIN}" "filelock<4" torch==2.14.1 torchvision==0.29.1 '
    "decord soundfile, then --harness-python .venv-lmms/bin/python (or "
    "OMNIQUANT_LMMS_EVAL_PYTHON); see README, Standard benchmarks"
)


def _model_args(extra_args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--model_args A=1,B=2`` out of the extra arguments: they are appended to the
    entry's own (a later key wins in lmms-eval's parser)."""
    rest, theirs = [], []
    it = iter(extra_args)
    for arg in it:
        if arg == "--model_args":
            theirs += [a for a in next(it, "").split(",") if a]
        elif arg.startswith("--model_args="):
            theirs += [a for a in arg.split("=", 1)[1].split(",") if a]
        else:
            rest.append(arg)
    return rest, theirs


class LmmsEval:
    """The lmms-eval entry."""

    name = "lmms-eval"
    module = "lmms_eval"
    install = INSTALL
    python_env = "OMNIQUANT_LMMS_EVAL_PYTHON"

    def check_tasks(self, tasks: list[str], include: Path | None,
                    python: str | None = None) -> None:  # fmt: skip
        require(self, python)
        listing = "python -m lmms_eval --tasks list" + (
            f" --include_path {include}" if include else "")  # fmt: skip
        refuse_unknown(self, tasks, known_tasks(self, include, python), listing, close=True)

    def run(self, *, url: str, model_id: str, tokenizer: str | None, tasks: list[str],
            include: Path | None, out: Path, extra_args: list[str],
            python: str | None = None) -> HarnessRun:  # fmt: skip
        require(self, python)
        # the child runs in the include folder: every path it gets is absolute
        out = out.resolve()
        include = include.resolve() if include else None
        out.mkdir(parents=True, exist_ok=True)
        samples_dir = out / "samples"
        extra_args, theirs = _model_args(extra_args)
        model_args = ",".join([f"model_version={model_id}", "pass_video_url=True", *theirs])
        cmd = [python_for(self, python), "-m", "lmms_eval", "--model", "openai_compatible",
               "--model_args", model_args, "--tasks", ",".join(tasks),
               "--log_samples", "--output_path", str(samples_dir), *extra_args]  # fmt: skip
        if include:
            cmd += ["--include_path", str(include)]
        env = {**os.environ, "OPENAI_API_BASE": url, "OPENAI_API_KEY": "EMPTY",
               "OPENAI_BASE_URL": url}  # fmt: skip
        log = out / "lmms-eval.log"
        with open(log, "w") as sink:
            rc = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                 cwd=str(include) if include else None)  # fmt: skip
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            raise EndpointError(
                f"lmms-eval failed on model {model_id!r}, tasks {', '.join(tasks)} "
                f"(exit code {rc}); its log: {log}\n{tail}"
            )
        try:
            found = read_output(samples_dir, model_id, tasks, None, log, harness=self.name)
        except EndpointError as err:
            # lmms-eval exits 0 after an error it caught (e.g. filelock 4: "No module named
            # 'filelock._api'"): name its error lines
            errors = [x for x in log.read_text(errors="replace").splitlines() if "ERROR" in x]
            raise EndpointError(f"{err}\n" + "\n".join(errors[-3:])) from err
        return HarnessRun(harness=self.name, model=model_id, tasks=found,
                          output_dir=str(samples_dir), log=str(log), command=cmd)  # fmt: skip

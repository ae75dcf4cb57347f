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
- Resumable: every run uses lmms-eval's response cache (``--use_cache OUT/cache/lmms-eval``,
  its SQLite store with a JSONL write-ahead log) under a fixed run id per model
  (``LMMS_CACHE_RUN_ID``), so a run that stopped part-way reopens the same per-run store
  and replays its log: the documents already answered are not sent again. Which samples
  came from the cache: the (task, document) pairs whose cache rows existed before the run
  and got no new row in it (a new row is a request sent to the model). A document with a
  non-deterministic request is never cached by lmms-eval, so never counted as cached.
- lmms-eval cannot score log-likelihood against an OpenAI endpoint (generation tasks
  only). The opt-in end-to-end test is tests/test_harness.py (``OMNIQUANT_LMMS_EVAL_PYTHON``).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from omniquant.endpoint.harness import (
    HarnessRun,
    known_tasks,
    python_for,
    refuse_unknown,
    require,
    run_logged,
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


#: lmms-eval's per-run store is named by this id (``runs/<id>/``): a fixed id lets a run
#: that stopped part-way resume from its own rows.
RUN_ID = "omniquant"


def cache_rows(root: Path) -> dict[str, tuple[str, int]]:
    """``{cache key: (task, document)}`` of every deterministic response in lmms-eval's
    response cache under ``root`` (its root and per-run SQLite stores and their
    write-ahead JSONL logs; empty when there is none yet)."""
    rows: dict[str, tuple[str, int]] = {}
    for db in sorted(root.rglob("*.db")) if root.is_dir() else []:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for key, task, doc in con.execute("SELECT cache_key, task_name, doc_id FROM responses"):
                rows[key] = (task, int(doc))
        except sqlite3.Error:
            pass  # a store without its table yet
        finally:
            con.close()
    for audit in sorted(root.rglob("*.audit.jsonl")) if root.is_dir() else []:
        for line in audit.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("deterministic", True) and rec.get("cache_key"):
                rows[rec["cache_key"]] = (rec["task_name"], int(rec["doc_id"]))
    return rows


def mark_cached(found: dict, before: dict[str, tuple[str, int]],
                after: dict[str, tuple[str, int]]) -> None:  # fmt: skip
    """Set each sample's ``cached``: its document had cache rows before the run and the
    run added none for it (every request answered from the cache)."""
    had = set(before.values())
    sent = {after[k] for k in after.keys() - before.keys()}
    for name, task in found.items():
        for sample in task.samples:
            doc = (name, sample.doc_id)
            sample.cached = doc in had and doc not in sent


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
        cache = out / "cache" / "lmms-eval"
        before = cache_rows(cache)
        cmd = [python_for(self, python), "-m", "lmms_eval", "--model", "openai_compatible",
               "--model_args", model_args, "--tasks", ",".join(tasks),
               "--log_samples", "--output_path", str(samples_dir),
               "--use_cache", str(cache), *extra_args]  # fmt: skip
        if include:
            cmd += ["--include_path", str(include)]
        env = {**os.environ, "OPENAI_API_BASE": url, "OPENAI_API_KEY": "EMPTY",
               "OPENAI_BASE_URL": url, "LMMS_CACHE_RUN_ID": RUN_ID}  # fmt: skip
        log = out / "lmms-eval.log"
        run_logged(self, cmd, log, model_id, tasks, include, env)
        try:
            found = read_output(samples_dir, model_id, tasks, None, log, harness=self.name)
        except EndpointError as err:
            # lmms-eval exits 0 after an error it caught (e.g. filelock 4: "No module named
            # 'filelock._api'"): name its error lines
            errors = [x for x in log.read_text(errors="replace").splitlines() if "ERROR" in x]
            raise EndpointError(f"{err}\n" + "\n".join(errors[-3:])) from err
        mark_cached(found, before, cache_rows(cache))
        return HarnessRun(harness=self.name, model=model_id, tasks=found,
                          output_dir=str(samples_dir), log=str(log), command=cmd)  # fmt: skip

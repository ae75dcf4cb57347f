"""lm-eval (EleutherAI lm-evaluation-harness 0.4.x) as a harness entry.

Policy:
- Run as ``python -m lm_eval run --model local-completions`` (the completions endpoint:
  log-likelihood needs ``echo`` + ``logprobs``, which lm-eval's chat model cannot ask
  for) with ``--log_samples --output_path`` and ``--use_cache`` (a sqlite file per model:
  a run that stopped resumes from it). With a tokenizer (a local checkpoint's
  directory, or ``tokenizer=`` in the extra arguments) lm-eval sends token ids;
  without one, text (``tokenized_requests=False``).
- The child runs in the include folder, so a task YAML's relative ``data_files``
  (``tasks/lm-eval-demo``) resolve there; its stdout and stderr go to a log file, named
  in every error.
- Which samples came from the cache: every request's cache key
  (``lm_eval.api.model.hash_args``) is looked up in the keys the sqlite file held before
  the run; a sample is cached when all its requests were.
"""

from __future__ import annotations

import glob
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from omniquant.endpoint.harness import HarnessRun, HarnessSample, HarnessTask, require
from omniquant.errors import EndpointError

PIN = "lm-eval[api]==0.4.13"


def _close(name: str, known: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f" (close: {', '.join(near)})" if near else ""


def cache_keys(db: Path) -> set[str]:
    """Keys of lm-eval's sqlite cache file (empty when it does not exist yet)."""
    if not db.is_file():
        return set()
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM unnamed")}


def _request_args(sample: dict) -> list[tuple[str, list]]:
    """``(request type, args)`` of each request of a logged sample, as lm-eval hashes them."""
    out = []
    for gen in sample.get("arguments", {}).values():
        args = [gen[k] for k in sorted(gen)]
        kind = "generate_until" if isinstance(args[-1], dict) else "loglikelihood"
        out.append((kind, args))
    return out


def read_output(out: Path, model: str, tasks: list[str], before: set[str] | None,
                log: Path, harness: str = "lm-eval") -> dict[str, HarnessTask]:  # fmt: skip
    """Read the newest ``results_*.json`` under ``out`` and each task's ``samples_*.jsonl``."""
    results = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True),
                     key=lambda p: Path(p).stat().st_mtime)  # fmt: skip
    if not results:
        raise EndpointError(f"{harness} wrote no results under {out} for {model}; its log: {log}")
    res_path = Path(results[-1])
    res = json.loads(res_path.read_text())
    stamp = res_path.stem.removeprefix("results_")
    hash_args = None
    if before is not None:
        from lm_eval.api.model import hash_args
    found: dict[str, HarnessTask] = {}
    for name in tasks:
        cfg = dict(res.get("configs", {}).get(name, {}))
        files = glob.glob(str(res_path.parent / f"samples_{name}_{stamp}.jsonl"))
        if not cfg or not files:
            raise EndpointError(
                f"{harness} task {name!r} of {model}: no per-sample log in {res_path.parent}; "
                f"its log: {log}"
            )
        metrics = cfg.get("metric_list") or []
        metric = metrics[0]["metric"] if metrics else None
        hib = res.get("higher_is_better", {}).get(name, {})
        samples = []
        for line in Path(files[0]).read_text().splitlines():
            rec = json.loads(line)
            metric = metric or next(k for k in rec.get("metrics", []))
            value = rec.get(metric)
            if not isinstance(value, (int, float)):
                raise EndpointError(
                    f"{harness} task {name!r} of {model}: sample {rec.get('doc_id')} has no "
                    f"numeric {metric!r} in {files[0]} (a corpus-level metric cannot be paired)."
                )
            cached = None
            if hash_args is not None:
                cached = all(hash_args(kind, args) in before for kind, args in _request_args(rec))
            pred = rec.get("filtered_resps")
            samples.append(HarnessSample(doc_id=int(rec["doc_id"]), value=float(value),
                                         prediction=json.dumps(pred), cached=cached))  # fmt: skip
        metadata = cfg.pop("metadata", {}) or {}
        found[name] = HarnessTask(
            name=name, metric=metric, higher_is_better=bool(hib.get(metric, True)),
            version=str(res.get("versions", {}).get(name, metadata.get("version"))),
            num_fewshot=res.get("n-shot", {}).get(name, cfg.get("num_fewshot")),
            config=cfg, samples=samples, log=files[0],
        )  # fmt: skip
    return found


class LmEval:
    """The lm-eval entry."""

    name = "lm-eval"
    module = "lm_eval"
    install = f'pip install "omniquant[lm-eval]" (pins {PIN})'

    def check_tasks(self, tasks: list[str], include: Path | None) -> None:
        require(self)
        from lm_eval.tasks import TaskManager

        known = TaskManager(include_path=str(include) if include else None).all_tasks
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise EndpointError(
                "lm-eval does not know task(s) "
                + ", ".join(f"{t!r}{_close(t, known)}" for t in unknown)
                + f"; lm-eval lists {len(known)} tasks (`lm_eval ls tasks`"
                + (f" --include_path {include}" if include else "") + ").",
                arg="harness_tasks",
            )  # fmt: skip

    def run(self, *, url: str, model_id: str, tokenizer: str | None, tasks: list[str],
            include: Path | None, out: Path, extra_args: list[str]) -> HarnessRun:  # fmt: skip
        require(self)
        # the child runs in the include folder: every path it gets is absolute
        out = out.resolve()
        include = include.resolve() if include else None
        out.mkdir(parents=True, exist_ok=True)
        model_args = [f"base_url={url.rstrip('/')}/completions", f"model={model_id}",
                      "num_concurrent=1", "max_retries=3"]  # fmt: skip
        if tokenizer:
            model_args += [f"tokenizer={tokenizer}", "tokenizer_backend=huggingface"]
        else:
            model_args += ["tokenizer_backend=None", "tokenized_requests=False"]
        cache_prefix = out / "cache" / "lm-eval"
        cache_prefix.parent.mkdir(parents=True, exist_ok=True)
        before = cache_keys(Path(f"{cache_prefix}_rank0.db"))
        samples_dir = out / "samples"
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
               "--model_args", ",".join(model_args), "--tasks", ",".join(tasks),
               "--log_samples", "--output_path", str(samples_dir),
               "--use_cache", str(cache_prefix), *extra_args]  # fmt: skip
        if include:
            cmd += ["--include_path", str(include)]
        log = out / "lm-eval.log"
        with open(log, "w") as sink:
            rc = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                 cwd=str(include) if include else None)  # fmt: skip
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            raise EndpointError(
                f"lm-eval failed on model {model_id!r}, tasks {', '.join(tasks)} (exit code {rc}); "
                f"its log: {log}\n{tail}"
            )
        found = read_output(samples_dir, model_id, tasks, before, log)
        return HarnessRun(harness=self.name, model=model_id, tasks=found,
                          output_dir=str(samples_dir), log=str(log), command=cmd)  # fmt: skip

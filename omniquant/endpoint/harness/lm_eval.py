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
import importlib.util
import json
import re
import sqlite3
from pathlib import Path

from omniquant.endpoint.harness import (
    HarnessRun,
    HarnessSample,
    HarnessTask,
    known_tasks,
    python_for,
    refuse_unknown,
    require,
    run_logged,
)
from omniquant.errors import EndpointError
from omniquant.evaluate.harness_results import corpus_counts

PIN = "lm-eval[api]==0.4.13"


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


def _results_file(out: Path, harness: str, model: str, log: Path) -> tuple[Path, str]:
    """The newest results file under ``out`` and its stamp. lm-eval writes
    ``results_<stamp>.json`` beside ``samples_<task>_<stamp>.jsonl``; lmms-eval writes
    ``<stamp>_results.json`` beside ``<stamp>_samples_<task>.jsonl``."""
    found = [Path(p) for pat in ("results_*.json", "*_results.json")
             for p in glob.glob(str(out / "**" / pat), recursive=True)]  # fmt: skip
    if not found:
        raise EndpointError(f"{harness} wrote no results under {out} for {model}; its log: {log}")
    path = max(found, key=lambda p: p.stat().st_mtime)
    if path.stem.startswith("results_"):
        return path, path.stem.removeprefix("results_")
    return path, path.stem.removesuffix("_results")


def _samples_file(res_path: Path, stamp: str, task: str) -> list[str]:
    if res_path.stem.startswith("results_"):
        return glob.glob(glob.escape(str(res_path.parent / f"samples_{task}_{stamp}")) + ".jsonl")
    return glob.glob(glob.escape(str(res_path.parent / f"{stamp}_samples_{task}")) + ".jsonl")


_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+>")


def _stable(value):
    """A recorded configuration without memory addresses (lmms-eval writes a task's
    functions as ``<function f at 0x7f...>``, different in every run)."""
    if isinstance(value, str):
        return _ADDRESS_RE.sub(">", value)
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _reported(results: dict, metric: str) -> float | None:
    """The harness's own aggregate of ``metric`` (key ``metric,filter``)."""
    value = next((v for k, v in results.items() if k.split(",")[0] == metric), None)
    return float(value) if isinstance(value, (int, float)) else None


def _failed_request(pred) -> bool:
    """lmms-eval scores a request that failed after its retries as this text, not an error."""
    text = pred[0] if isinstance(pred, list) and pred else pred
    return isinstance(text, str) and text.startswith(FAILED_MARK)


FAILED_MARK = "[LMMS_EVAL_REQUEST_FAILED"


def _sample(rec: dict, metric: str, where: str, hash_args, before) -> HarnessSample:
    """One per-sample record: a number, or a corpus metric's per-document counts."""
    value = rec.get(metric)
    pred = rec.get("filtered_resps")
    counts = None
    if isinstance(value, dict) and isinstance(value.get("overall"), (int, float)):
        value = value["overall"]  # lmms-eval's MMAU: {"overall": 0/1, "task": ...}, mean x 100
    elif isinstance(value, dict):
        counts = corpus_counts(value)
        if counts is None:
            raise EndpointError(
                f"{where}: sample {rec.get('doc_id')} has {metric!r} as a record of fields "
                f"{sorted(value)}, which omniquant cannot pair (numbers, a record's numeric "
                "'overall', or a transcript's 'gt' and 'pred' for WER, are paired)."
            )
        value = counts[0] / counts[1] if counts[1] else 0.0
    if not isinstance(value, (int, float)):
        raise EndpointError(
            f"{where}: sample {rec.get('doc_id')} has no numeric {metric!r} "
            "(a corpus-level metric without per-document counts cannot be paired)."
        )
    cached = None
    if hash_args is not None:
        cached = all(hash_args(kind, args) in before for kind, args in _request_args(rec))
    return HarnessSample(doc_id=int(rec["doc_id"]), value=float(value), prediction=json.dumps(pred),
                         cached=cached, counts=counts)  # fmt: skip


def read_output(out: Path, model: str, tasks: list[str], before: set[str] | None,
                log: Path, harness: str = "lm-eval") -> dict[str, HarnessTask]:  # fmt: skip
    """Read the newest results file under ``out`` and each task's per-sample log."""
    res_path, stamp = _results_file(out, harness, model, log)
    res = json.loads(res_path.read_text())
    hash_args = None
    if before is not None and importlib.util.find_spec("lm_eval") is not None:
        # lm-eval's own request hash; with lm-eval only in another interpreter: not known
        from lm_eval.api.model import hash_args
    found: dict[str, HarnessTask] = {}
    for name in tasks:
        cfg = _stable(dict(res.get("configs", {}).get(name, {})))
        files = _samples_file(res_path, stamp, name)
        if not cfg or not files:
            raise EndpointError(
                f"{harness} task {name!r} of {model}: no per-sample log in {res_path.parent}; "
                f"its log: {log}"
            )
        metrics = cfg.get("metric_list") or []
        metric = metrics[0]["metric"] if metrics else None
        hib = res.get("higher_is_better", {}).get(name, {})
        where = f"{harness} task {name!r} of {model} ({files[0]})"
        samples = []
        for line in Path(files[0]).read_text().splitlines():
            rec = json.loads(line)
            metric = metric or next(k for k in rec.get("metrics", []))
            if _failed_request(rec.get("filtered_resps")):
                raise EndpointError(
                    f"{where}: the request of sample {rec.get('doc_id')} failed "
                    f"({json.dumps(rec.get('filtered_resps'))[:300]}); the server's log says why."
                )
            samples.append(_sample(rec, metric, where, hash_args, before))
        metadata = cfg.pop("metadata", {}) or {}
        if isinstance(metadata, list):  # lmms-eval task templates write [{"version": ...}]
            metadata = {k: v for item in metadata if isinstance(item, dict) for k, v in item.items()}
        found[name] = HarnessTask(
            name=name, metric=metric, higher_is_better=bool(hib.get(metric, True)),
            version=str(res.get("versions", {}).get(name, metadata.get("version"))),
            num_fewshot=res.get("n-shot", {}).get(name, cfg.get("num_fewshot")),
            config=cfg, samples=samples, log=files[0],
            corpus=any(s.counts is not None for s in samples),
            reported=_reported(res.get("results", {}).get(name, {}), metric),
        )  # fmt: skip
    return found


class LmEval:
    """The lm-eval entry."""

    name = "lm-eval"
    module = "lm_eval"
    install = f'pip install "omniquant[lm-eval]" (pins {PIN})'
    python_env = "OMNIQUANT_LM_EVAL_PYTHON"

    def check_tasks(self, tasks: list[str], include: Path | None,
                    python: str | None = None) -> None:  # fmt: skip
        require(self, python)
        listing = "lm_eval ls tasks" + (f" --include_path {include}" if include else "")
        refuse_unknown(self, tasks, known_tasks(self, include, python), listing, close=True)

    def run(self, *, url: str, model_id: str, tokenizer: str | None, tasks: list[str],
            include: Path | None, out: Path, extra_args: list[str],
            python: str | None = None) -> HarnessRun:  # fmt: skip
        require(self, python)
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
        cmd = [python_for(self, python), "-m", "lm_eval", "run", "--model", "local-completions",
               "--model_args", ",".join(model_args), "--tasks", ",".join(tasks),
               "--log_samples", "--output_path", str(samples_dir),
               "--use_cache", str(cache_prefix), *extra_args]  # fmt: skip
        if include:
            cmd += ["--include_path", str(include)]
        log = out / "lm-eval.log"
        run_logged(self, cmd, log, model_id, tasks, include)
        found = read_output(samples_dir, model_id, tasks, before, log)
        return HarnessRun(harness=self.name, model=model_id, tasks=found,
                          output_dir=str(samples_dir), log=str(log), command=cmd)  # fmt: skip

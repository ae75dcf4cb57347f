"""Harness results (lm-eval, lmms-eval) in the report: pairing, recovery, intervals, verdicts.

Policy:
- The harness scored every sample (``omniquant.endpoint.harness``); this module only
  pairs the baseline's and each candidate's per-sample values by ``doc_id`` and applies
  the report's statistics (``omniquant.report.stats``): per-task mean, recovery,
  paired bootstrap interval of the delta, verdict against the same threshold.
- Lower-is-better metrics (WER, the harness's ``higher_is_better: false``): recovery is
  ``baseline / candidate`` (a candidate with twice the error recovers 50 %); a
  candidate with zero error recovers 1.0. The delta stays ``candidate - baseline`` in
  the metric's own units, so a positive WER delta is a loss.
- Corpus-level metrics (WER over a test set, ``HarnessTask.corpus``): the value is
  ``sum(errors) / sum(reference words)`` over the documents' counts, and the interval is
  a paired bootstrap over documents recomputing that ratio for both models
  (``stats.paired_bootstrap_ratio_ci``); such metrics are lower-is-better as the harness
  says. The harness's own aggregate is kept beside (``reported``).
- Samples a run answered from the harness's cache are counted per model and task.
"""

from __future__ import annotations

import zlib

from omniquant.evaluate.harness_results import HarnessRun, HarnessTask
from omniquant.report.stats import paired_bootstrap_ci, paired_bootstrap_ratio_ci, recovery


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _cached(task: HarnessTask) -> int | None:
    flags = [s.cached for s in task.samples]
    return None if any(f is None for f in flags) else sum(flags)


def _ratio(counts: list[tuple[float, float]]) -> float:
    den = sum(d for _n, d in counts)
    return float(sum(n for n, _d in counts) / den) if den else 0.0


def _task_stats(base: HarnessTask, cand: HarnessTask, resamples: int, seed: int) -> dict:
    base_by, cand_by = {s.doc_id: s for s in base.samples}, {s.doc_id: s for s in cand.samples}
    docs = sorted(base_by)
    seed_t = (seed, zlib.crc32(base.name.encode()))
    if base.corpus:
        base_counts = [base_by[d].counts or (0.0, 0.0) for d in docs]
        cand_counts = [cand_by[d].counts or (0.0, 0.0) for d in docs]
        b, c = _ratio(base_counts), _ratio(cand_counts)
        ci = paired_bootstrap_ratio_ci(base_counts, cand_counts, resamples, seed_t)
    else:
        base_vals = [base_by[d].value for d in docs]
        cand_vals = [cand_by[d].value for d in docs]
        b, c = _mean(base_vals), _mean(cand_vals)
        ci = paired_bootstrap_ci(base_vals, cand_vals, resamples, seed_t)
    if base.higher_is_better:
        rec, defined = recovery(c, b)
    else:
        rec, defined = (b / c, True) if c > 0 else (1.0, b > 0)
    return {
        "n": len(docs),
        "value": c,
        "baseline_value": b,
        "recovery": rec,
        "recovery_defined": defined,
        "delta": c - b,
        "delta_ci95": list(ci) if ci else None,
        "corpus": base.corpus,
        "harness_reported": cand.reported,
        "cached_samples": _cached(cand),
        "samples_log": cand.log,
    }


def harness_block(
    runs: list[HarnessRun], names: list[str], *, threshold: float, resamples: int, seed: int
) -> dict:
    """The report's ``harness`` block: baseline first in ``runs`` and ``names``.

    Returns:
        ``{"harness", "tasks": {task: {metric, higher_is_better, version, num_fewshot,
        n}}, "models": [{name, run log, tasks: {task: stats}, verdict, tasks_below}]}``.
    """
    base = runs[0]
    tasks_meta = {
        name: {
            "metric": t.metric,
            "higher_is_better": t.higher_is_better,
            "version": t.version,
            "num_fewshot": t.num_fewshot,
            "n": len(t.samples),
            "corpus": t.corpus,
        }
        for name, t in base.tasks.items()
    }
    models = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        stats = {
            t: _task_stats(base.tasks[t], run.tasks[t], resamples if i else 0, seed)
            for t in base.tasks
        }
        below = [t for t, s in stats.items() if s["recovery_defined"] and s["recovery"] < threshold]
        if i == 0:
            text = f"{name}: baseline of the {base.harness} tasks."
        elif below:
            text = (
                f"{name} ({base.harness}): recovery under {100 * threshold:.0f}% on "
                + ", ".join(
                    f"{t} ({stats[t]['value']:.3f} vs {stats[t]['baseline_value']:.3f} "
                    f"{tasks_meta[t]['metric']}, recovery {100 * stats[t]['recovery']:.0f}%)"
                    for t in below
                )
                + "."
            )
        else:
            text = (
                f"{name} ({base.harness}): every task recovers at least "
                f"{100 * threshold:.0f}% of the baseline."
            )
        models.append(
            {
                "name": name,
                "log": run.log,
                "output_dir": run.output_dir,
                "tasks": stats,
                "verdict": text,
                "tasks_below_threshold": below,
            }
        )
    return {"harness": base.harness, "tasks": tasks_meta, "models": models}


def markdown_lines(block: dict) -> list[str]:
    """The harness section of ``report.md``."""
    out = ["", f"## {block['harness']} tasks (scored by the harness, paired by document)", ""]
    head = ["task", "metric", *[m["name"] for m in block["models"]]]
    rows = []
    for task, meta in block["tasks"].items():
        cells = []
        for m in block["models"]:
            s = m["tasks"][task]
            cell = f"{s['value']:.3f}"
            if m is not block["models"][0]:
                ci = s["delta_ci95"]
                cell += f" ({100 * s['recovery']:.0f}%"
                cell += f", Δ CI [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else ")"
            cells.append(cell)
        arrow = "↑" if meta["higher_is_better"] else "↓"
        label = f"{meta['metric']} {arrow}" + (" (corpus)" if meta.get("corpus") else "")
        rows.append([task, label, *cells])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    for task, meta in block["tasks"].items():
        if meta.get("corpus"):
            own = ", ".join(f"{m['name']} {m['tasks'][task]['harness_reported']}" for m in block["models"])
            out.append(f"- {task}: corpus ratio over per-document counts (sum of errors / sum of "
                       f"reference words); the harness's own aggregate: {own}.")  # fmt: skip
    for m in block["models"]:
        cached = {t: s["cached_samples"] for t, s in m["tasks"].items()}
        out.append(
            f"- {m['verdict']} Samples from the harness cache: "
            + ", ".join(f"{t} {c if c is not None else 'n/a'}" for t, c in cached.items())
            + f". Log: `{m['log']}`."
        )
    return out

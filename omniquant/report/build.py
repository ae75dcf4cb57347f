"""The quality-cliff report: typed results in, ``report.json``, ``report.md`` and ``report.html`` out.

Policy:
- The report renders results; it never loads a model. It takes a
  ``omniquant.evaluate.results.Comparison`` (made by
  ``omniquant.experiments.compare``), computes per-task, per-modality and overall
  numbers and verdicts from the per-sample results (``omniquant.report.stats``) and
  renders them (``omniquant.report.render``). Nothing in ``omniquant.report`` imports
  a stage that loads, quantizes or serves a model.
- Output directory: report files already in ``--out`` are refused unless ``force``
  (checked by the composition before any model work, ``omniquant.outdir.check_out``).
- The three files are written to temporary names and renamed into place, so a
  failed run never leaves a report that mixes two runs; a non-finite number is a bug
  and is refused before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omniquant.evaluate.results import Comparison, ModelResult

REPORT_FILES = ("report.json", "report.md", "report.html")
FORMAT_VERSION = 1


def _evaluation_block(model: ModelResult) -> dict:
    return {
        "samples": len(model.samples),
        "seconds": round(model.seconds, 3),
        "samples_per_s": round(model.samples_per_s, 3),
        "load_seconds": round(model.load_seconds, 3),
    }


def report_dict(results: Comparison) -> dict:
    """The report (what ``report.json`` holds) from the results of a comparison.

    Args:
        results: Baseline and candidates evaluated on one task set.

    Returns:
        The report: task set, settings, one block per model (its description,
        evaluation, EVS sweep, per-task / per-modality / overall numbers, samples and
        verdict), the verdicts, the EVS sweep's setup and the sensitivity ranking.
    """
    from omniquant.report.stats import summarize, verdict

    rates = list(results.evs_rates)
    base = results.baseline
    base_summary = summarize(base.samples, None, resamples=results.bootstrap, seed=results.seed)
    base_info = {
        **base.description,
        "evaluation": _evaluation_block(base),
        "evs": base.evs,
        **base_summary,
        "samples": [s.to_json() for s in base.samples],
        "verdict": "baseline (reference for recovery and fidelity)",
    }
    cand_infos, verdicts = [], []
    for cand in results.candidates:
        summary = summarize(
            cand.samples, base.samples, resamples=results.bootstrap, seed=results.seed
        )
        text, below = verdict(cand.name, summary, results.recovery_threshold)
        cand_infos.append(
            {
                **cand.description,
                "evaluation": _evaluation_block(cand),
                "evs": cand.evs,
                **summary,
                "samples": [s.to_json() for s in cand.samples],
                "verdict": text,
                "tasks_below_threshold": below,
            }
        )
        verdicts.append(text)

    task_meta = {
        task: {"metric": t["metric"], "modalities": t["modalities"], "n": t["n"]}
        for task, t in base_summary["tasks"].items()
    }
    endpoints = results.endpoint_topk is not None
    report = {
        "format_version": FORMAT_VERSION,
        "created_unix": results.created_unix,
        "task_set": {
            "path": str(results.task_set),
            "name": results.task_set.name,
            "samples": results.samples,
            "tasks": task_meta,
            "modalities": {m: v["n"] for m, v in base_summary["modalities"].items()},
        },
        "settings": {
            "recovery_threshold": results.recovery_threshold,
            "bootstrap": results.bootstrap,
            "seed": results.seed,
            "max_new_tokens": results.max_new_tokens,
            "decoding": "greedy with the model cache (K/V, Mamba states), stop at EOS",
            "multiple_choice": "highest mean log-probability per choice token",
            "fidelity": {
                "span": "reference answer tokens + EOS, teacher-forced",
                "kl": "KL(baseline || candidate), nats, mean over span then over samples",
                "distribution": _distribution_note(results.span_topk),
            },
            "evs_rates": rates,
            "sensitivity": results.sensitivity_format is not None,
            "sensitivity_format": results.sensitivity_format,
            **(
                {"endpoints": _endpoint_note(results.endpoint_topk, results.concurrency)}
                if endpoints
                else {}
            ),
        },
        "baseline": base_info,
        "candidates": cand_infos,
        "verdicts": verdicts,
        "evs": {
            "rates": rates,
            "video_samples": results.video_samples,
            "reference": (
                f"baseline at EVS rate {rates[0]}" if rates and results.evs_reference else None
            ),
        },
        "sensitivity": results.sensitivity,
        "peak_rss_mb": results.peak_rss_mb,
        "versions": results.versions,
    }
    if results.throughput is not None:  # each model's figures are in its block
        report["throughput"] = results.throughput
    _check_finite(report)
    return report


def write_report(report: dict, out: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out`` (each atomically)."""
    from omniquant.report.render import write_html, write_markdown

    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "report.md", write_markdown(report))
    _write_atomic(out / "report.html", write_html(report))


def _endpoint_note(topk: int, concurrency: int) -> dict:
    return {
        "requests": "chat completions, temperature 0; media as image_url / video_url / "
        "audio_url data URIs",
        "fidelity": f"prompt_logprobs and top_logprobs, top-{topk}: KL over the tokens both "
        "sides know plus the rest (lower bound)",
        "multiple_choice": "prompt_logprobs of each choice as a continued assistant message",
        "concurrency": concurrency,
        "not_available": "video token counts and EVS sweeps (server settings)",
    }


def _distribution_note(span_topk: int | None) -> str:
    if span_topk is None:
        return "full vocabulary (exact KL)"
    return f"baseline top-{span_topk} + tail mass (KL lower bound)"


def _check_finite(obj, where: str = "report") -> None:
    """JSON has no NaN/inf; a non-finite number here is a bug, caught before writing."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

"""Aggregate per-sample results into per-task, per-modality and overall numbers.

Policy:
- Accuracy of a group is the mean per-sample score in [0, 1] (see
  ``omniquant.evaluate.metrics``); ``kl_mean`` and ``top1_agreement`` are means of
  per-sample span means (each sample weighs the same, whatever its answer length).
- Recovery is candidate accuracy / baseline accuracy. When the baseline accuracy is
  0 there is nothing to lose: recovery is reported as 1.0 with
  ``recovery_defined: false``, the verdict calls such tasks uninformative, and
  fidelity (KL, top-1 agreement) is what says whether the candidate drifted.
- A group with a sample that could not be scored (a served model without the
  log-probabilities that likelihood choices need) has ``accuracy`` ``None``
  (``accuracy_available: false``) and no recovery or delta, on either side of the pair;
  the verdict lists such tasks as not available.
- Confidence intervals on the accuracy delta (candidate - baseline) come from a
  paired bootstrap over the task's samples: resample sample indices with
  replacement, recompute the mean paired difference, take the 2.5th and 97.5th
  percentiles. Seeded per task from ``(seed, crc32(task name))``, so a task's
  interval does not depend on which other tasks the set has. Identical scores give
  the interval [0, 0].
"""

from __future__ import annotations

import zlib

import numpy as np

from omniquant.evaluate.metrics import mean_present
from omniquant.evaluate.results import SampleResult


def recovery(candidate: float, baseline: float) -> tuple[float, bool]:
    """``(candidate / baseline, defined)``; ``(1.0, False)`` when the baseline is 0."""
    if baseline > 0:
        return candidate / baseline, True
    return 1.0, False


def paired_bootstrap_ci(
    baseline: list[float], candidate: list[float], resamples: int, seed: tuple[int, ...] | int
) -> tuple[float, float] | None:
    """95% percentile interval of ``mean(candidate - baseline)`` (paired bootstrap).

    Returns:
        ``(low, high)``, or ``None`` with no samples or ``resamples == 0``.
    """
    n = len(baseline)
    if n == 0 or resamples <= 0:
        return None
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    means = diff[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap_ratio_ci(
    baseline: list[tuple[float, float]],
    candidate: list[tuple[float, float]],
    resamples: int,
    seed: tuple[int, ...] | int,
) -> tuple[float, float] | None:
    """95% percentile interval of the corpus-ratio delta (paired bootstrap over documents).

    Each document carries ``(numerator, denominator)`` (a WER's word errors and reference
    words); a resample draws documents with replacement, the same for both models, and
    recomputes ``sum(num) / sum(den)`` for each: the interval is of candidate minus
    baseline. Resamples whose denominator is zero are dropped.

    Returns:
        ``(low, high)``, or ``None`` with no documents or ``resamples == 0``.
    """
    n = len(baseline)
    if n == 0 or resamples <= 0:
        return None
    b = np.asarray(baseline, dtype=np.float64).reshape(n, 2)
    c = np.asarray(candidate, dtype=np.float64).reshape(n, 2)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    b_den, c_den = b[idx, 1].sum(axis=1), c[idx, 1].sum(axis=1)
    ok = (b_den > 0) & (c_den > 0)
    if not ok.any():
        return None
    deltas = c[idx, 0].sum(axis=1)[ok] / c_den[ok] - b[idx, 0].sum(axis=1)[ok] / b_den[ok]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def _group_stats(
    samples: list[SampleResult],
    base: dict[str, SampleResult] | None,
    resamples: int,
    seed: tuple[int, ...],
) -> dict:
    scores = [s.score or 0.0 for s in samples]
    acc = mean_present(scores) or 0.0
    cand_missing = any(_unscored(s) for s in samples)
    if cand_missing or (base is not None and any(_unscored(base[s.id]) for s in samples)):
        # A served model that could not be scored (e.g. no prompt_logprobs for
        # likelihood choices): not available, never counted as wrong.
        return _unavailable_stats(samples, base, None if cand_missing else acc)
    out: dict = {"n": len(samples), "accuracy": acc}
    if base is None:
        # The baseline against itself: by definition.
        out.update(
            recovery=1.0,
            recovery_defined=True,
            accuracy_delta=0.0,
            accuracy_delta_ci95=[0.0, 0.0],
            kl_mean=0.0,
            top1_agreement=1.0,
        )
    else:
        base_scores = [base[s.id].score or 0.0 for s in samples]
        base_acc = mean_present(base_scores) or 0.0
        rec, defined = recovery(acc, base_acc)
        ci = paired_bootstrap_ci(base_scores, scores, resamples, seed)
        out.update(
            baseline_accuracy=base_acc,
            recovery=rec,
            recovery_defined=defined,
            accuracy_delta=acc - base_acc,
            accuracy_delta_ci95=list(ci) if ci else None,
            kl_mean=mean_present(s.kl for s in samples),
            top1_agreement=mean_present(s.top1 for s in samples),
        )
    wers = [s.wer for s in samples if s.wer is not None]
    if wers:
        out["wer"] = float(sum(wers) / len(wers))
    return out


def _unscored(s: SampleResult) -> bool:
    return s.score is None and s.prediction is None


def _unavailable_stats(
    samples: list[SampleResult], base: dict[str, SampleResult] | None, accuracy: float | None
) -> dict:
    out: dict = {
        "n": len(samples),
        "accuracy": accuracy,
        "accuracy_available": accuracy is not None,
        "recovery": None,
        "recovery_defined": False,
        "accuracy_delta": None,
        "accuracy_delta_ci95": None,
        "kl_mean": mean_present(s.kl for s in samples) if base is not None else 0.0,
        "top1_agreement": mean_present(s.top1 for s in samples) if base is not None else 1.0,
    }
    return out


def summarize(
    samples: list[SampleResult],
    baseline: list[SampleResult] | None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Per-task, per-modality and overall statistics of one model.

    Args:
        samples: The model's per-sample results.
        baseline: The baseline's results on the same samples (``None`` when
            ``samples`` are the baseline's own).
        resamples: Bootstrap resamples (0 disables the intervals).
        seed: Bootstrap seed.

    Returns:
        ``{"tasks": {task: {...}}, "modalities": {modality: {...}}, "overall": {...},
        "kl_by_modality": {modality: kl}}``; each block has ``n``, ``accuracy``,
        ``recovery``, ``recovery_defined``, ``accuracy_delta``,
        ``accuracy_delta_ci95``, ``kl_mean``, ``top1_agreement`` (and ``wer`` where
        the block has ``wer`` samples). Task blocks also carry ``metric`` and
        ``modalities``.
    """
    base = {s.id: s for s in baseline} if baseline is not None else None
    tasks: dict[str, dict] = {}
    for task in sorted({s.task for s in samples}):
        group = [s for s in samples if s.task == task]
        stats = _group_stats(group, base, resamples, (seed, zlib.crc32(task.encode())))
        tasks[task] = {
            "metric": group[0].metric,
            "modalities": sorted({s.modality for s in group}),
            **stats,
        }
    modalities: dict[str, dict] = {}
    for modality in ("text", "image", "video", "audio"):
        group = [s for s in samples if s.modality == modality]
        if group:
            modalities[modality] = _group_stats(
                group, base, resamples, (seed, zlib.crc32(f"modality:{modality}".encode()))
            )
    overall = _group_stats(samples, base, resamples, (seed, zlib.crc32(b"overall")))
    return {
        "tasks": tasks,
        "modalities": modalities,
        "overall": overall,
        "kl_by_modality": {m: v["kl_mean"] for m, v in modalities.items()},
    }


def verdict(name: str, summary: dict, threshold: float) -> tuple[str, list[str]]:
    """Plain-text verdict naming every task whose recovery is under ``threshold``.

    Returns:
        ``(text, tasks_below)``.
    """
    below, uninformative, unavailable = [], [], []
    for task, t in summary["tasks"].items():
        if t["recovery"] is None:
            unavailable.append(task)
        elif not t.get("recovery_defined", True):
            uninformative.append(task)
        elif t["recovery"] < threshold:
            below.append(task)
    overall = summary["overall"]
    fidelity = ""
    if overall.get("kl_mean") is not None:
        fidelity = (
            f" Mean KL to the baseline {overall['kl_mean']:.4g} nats, top-1 agreement "
            f"{100 * overall['top1_agreement']:.1f}%."
        )
    if below:
        parts = [
            f"{task} ({summary['tasks'][task]['accuracy']:.3f} vs "
            f"{summary['tasks'][task].get('baseline_accuracy', 0.0):.3f}, recovery "
            f"{100 * summary['tasks'][task]['recovery']:.0f}%)"
            for task in below
        ]
        text = f"{name}: recovery under {100 * threshold:.0f}% on {len(below)} task(s): {', '.join(parts)}."
    else:
        text = (
            f"{name}: every task recovers at least {100 * threshold:.0f}% of the baseline accuracy."
        )
    if unavailable:
        text += (
            f" Accuracy not available on {', '.join(unavailable)} (the server does not "
            "provide what these metrics need)."
        )
    if uninformative:
        text += (
            f" Baseline accuracy is 0 on {', '.join(uninformative)} (recovery undefined, "
            "counted as 1; judge these by KL)."
        )
    return text + fidelity, below

"""EVS sweep: video tokens reaching the backbone and answer quality per pruning rate.

Policy: only the task set's video samples are swept. Tokens are counted where the
backbone receives them (after EVS), per rate, summed over the video samples. Quality
is the metric score (accuracy) and the fidelity against one fixed reference: the
*baseline at the lowest swept rate* (normally 0, no pruning), so the KL at a rate
measures what pruning and quantization together lose, and the baseline's own curve
shows what pruning alone loses.
"""

from __future__ import annotations

from omniquant.evaluate.fidelity import SpanDistribution
from omniquant.evaluate.runner import evaluate_model
from omniquant.evaluate.tasks import TaskItem


def video_items(items: list[TaskItem]) -> list[TaskItem]:
    """The items whose sample carries a video."""
    return [it for it in items if it.sample.pixel_values_videos is not None]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def evs_sweep(
    loaded,
    items: list[TaskItem],
    rates: tuple[float, ...] | list[float],
    *,
    reference: dict[str, SpanDistribution] | None = None,
    max_new_tokens: int = 16,
    topk: int | None = None,
) -> tuple[list[dict], dict[str, SpanDistribution]]:
    """Evaluate the video items of ``items`` at each EVS rate.

    Args:
        loaded: The model (baseline or candidate).
        items: All task items (non-video items are ignored).
        rates: Pruning rates in [0, 1), evaluated in ascending order.
        reference: The baseline's spans at the lowest rate; ``None`` for the baseline
            itself, whose lowest-rate spans become the reference (returned).
        max_new_tokens: Greedy decoding budget.
        topk: Stored distribution size for the reference spans.

    Returns:
        ``(rows, reference)``: one row per rate with ``rate``, ``n``, ``video_tokens``,
        ``video_placeholders``, ``kept_fraction``, ``accuracy``, ``kl_mean`` and
        ``top1_agreement``; and the reference spans used.
    """
    videos = video_items(items)
    rows: list[dict] = []
    if not videos:
        return rows, reference or {}
    for rate in sorted(float(r) for r in rates):
        keep = reference is None
        result = evaluate_model(
            loaded,
            videos,
            reference=reference,
            keep_spans=keep,
            evs_rate=rate,
            max_new_tokens=max_new_tokens,
            topk=topk,
        )
        if keep:
            reference = result.spans
            # The reference scored against itself: exactly 0 KL and full agreement.
            for s in result.samples:
                s.kl, s.top1 = 0.0, 1.0
        tokens = sum(s.video_tokens or 0 for s in result.samples)
        placeholders = sum(s.video_placeholders or 0 for s in result.samples)
        rows.append(
            {
                "rate": rate,
                "n": len(result.samples),
                "video_tokens": tokens,
                "video_placeholders": placeholders,
                "kept_fraction": tokens / placeholders if placeholders else None,
                "accuracy": _mean([s.score for s in result.samples]),
                "kl_mean": _mean([s.kl for s in result.samples]),
                "top1_agreement": _mean([s.top1 for s in result.samples]),
            }
        )
    return rows, reference

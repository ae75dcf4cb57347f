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
from omniquant.evaluate.metrics import mean_present
from omniquant.evaluate.results import EvsRow
from omniquant.evaluate.runner import ModelEvaluation, evaluate_model
from omniquant.evaluate.tasks import TaskItem


def video_items(items: list[TaskItem]) -> list[TaskItem]:
    """The items whose sample carries a video."""
    return [it for it in items if it.sample.pixel_values_videos is not None]


def evs_sweep(
    loaded,
    items: list[TaskItem],
    rates: tuple[float, ...] | list[float],
    *,
    reference: dict[str, SpanDistribution] | None = None,
    max_new_tokens: int = 16,
    topk: int | None = None,
    main: ModelEvaluation | None = None,
) -> tuple[list[EvsRow], dict[str, SpanDistribution]]:
    """Evaluate the video items of ``items`` at each EVS rate.

    Args:
        loaded: The model (baseline or candidate).
        items: All task items (non-video items are ignored).
        rates: Pruning rates in [0, 1), evaluated in ascending order.
        reference: The baseline's spans at the lowest rate; ``None`` for the baseline
            itself, whose lowest-rate spans become the reference (returned).
        max_new_tokens: Greedy decoding budget.
        topk: Stored distribution size for the reference spans.
        main: This model's evaluation of all items (the baseline's with spans kept).
            Where it ran at the lowest swept rate, its video samples are that rate's
            row instead of being evaluated again (its KL was taken against the
            baseline at that same rate, which is the sweep's reference).

    Returns:
        ``(rows, reference)``: one ``EvsRow`` per rate (``rate``, ``n``,
        ``video_tokens``, ``video_placeholders``, ``kept_fraction``, ``accuracy``,
        ``kl_mean``, ``top1_agreement``); and the reference spans used.
    """
    videos = video_items(items)
    rows: list[EvsRow] = []
    if not videos:
        return rows, reference or {}
    ordered = sorted(float(r) for r in rates)
    video_ids = {it.sample.id for it in videos}
    for rate in ordered:
        keep = reference is None
        reused = _reusable(main, video_ids, rate, ordered[0], keep)
        if reused is not None:
            samples, spans = reused
        else:
            result = evaluate_model(
                loaded,
                videos,
                reference=reference,
                keep_spans=keep,
                evs_rate=rate,
                max_new_tokens=max_new_tokens,
                topk=topk,
            )
            samples, spans = result.samples, result.spans
        if keep:
            reference = spans
            # The reference scored against itself: exactly 0 KL and full agreement.
            for s in samples:
                s.kl, s.top1 = 0.0, 1.0
        tokens = sum(s.video_tokens or 0 for s in samples)
        placeholders = sum(s.video_placeholders or 0 for s in samples)
        rows.append(
            EvsRow(
                rate=rate,
                n=len(samples),
                video_tokens=tokens,
                video_placeholders=placeholders,
                kept_fraction=tokens / placeholders if placeholders else None,
                accuracy=mean_present([s.score for s in samples]),
                kl_mean=mean_present([s.kl for s in samples]),
                top1_agreement=mean_present([s.top1 for s in samples]),
            )
        )
    return rows, reference


def _reusable(main, video_ids: set[str], rate: float, lowest: float, keep: bool):
    """``(samples, spans)`` of ``main``'s video samples if they ran at ``rate`` and
    ``rate`` is the sweep's reference rate; else ``None``."""
    if main is None or rate != lowest:
        return None
    samples = [s for s in main.samples if s.id in video_ids]
    if len(samples) != len(video_ids) or any(s.evs_rate != rate for s in samples):
        return None
    if keep and not video_ids <= set(main.spans):
        return None
    spans = {i: main.spans[i] for i in video_ids} if keep else {}
    return samples, spans

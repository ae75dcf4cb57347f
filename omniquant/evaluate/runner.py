"""Evaluate one loaded model on task items: greedy answers, metric scores, fidelity spans.

Policy:
- One forward through the whole omni model per sample runs the encoders (and EVS);
  the adapter's backbone-input hook (``ModelAdapter.backbone_inputs``, the one
  ``omniquant.quantize.calibrate`` counts tokens with) captures the embeddings that
  reach the backbone and stops the pass there. Every further step (teacher forcing, greedy decoding,
  choice scoring) calls the backbone on those embeddings plus embedded text tokens,
  exactly what the omni forward would feed it, without re-running the encoders.
  Video tokens are counted at that same point, after EVS.
- Greedy decoding reuses the teacher-forced logits while it follows the reference,
  then decodes with the model's cache (attention K/V, Mamba states), one token a
  step. The emulated FP8 KV quantization is a hook on the k/v projections, so cached
  K/V are the quantized ones, as in a serving engine's FP8 KV cache. It stops at the
  tokenizer's EOS or after ``max_new_tokens`` tokens.
- Fidelity is measured on the teacher-forced reference answer followed by EOS (see
  ``omniquant.evaluate.fidelity``); its first position also gives the first greedy
  token, so no pass is wasted.
- ``multiple_choice`` is scored by choice likelihood (``omniquant.evaluate.metrics``);
  ``exact_match`` and ``wer`` by greedy generation.
- Batch size 1, ``torch.no_grad``; nothing of the model is kept in the results, so
  the caller can free the model before loading the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omniquant.errors import ReportError
from omniquant.evaluate.fidelity import SpanDistribution
from omniquant.evaluate.metrics import choose, score_sample
from omniquant.evaluate.results import SampleResult
from omniquant.evaluate.tasks import TaskItem


@dataclass
class ModelEvaluation:
    """Results of one model over a list of task items.

    Attributes:
        samples: One result per item, in item order.
        spans: Baseline distributions per sample id (filled with ``keep_spans``).
        seconds: Wall time of the evaluation.
    """

    samples: list[SampleResult]
    spans: dict[str, SpanDistribution] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        """Throughput."""
        return len(self.samples) / self.seconds if self.seconds > 0 else 0.0


class _ReachedBackbone(Exception):
    """Raised by the pre-hook to stop the omni forward once the backbone input is known."""


def backbone_input(loaded, sample) -> torch.Tensor:
    """Embeddings the backbone receives for ``sample`` (encoders run, EVS applied).

    Returns:
        ``(1, L', H)`` with ``L'`` the sequence length after EVS.
    """
    captured: list[torch.Tensor | None] = []

    def stop(embeds) -> None:
        captured.append(None if embeds is None else embeds.detach())
        raise _ReachedBackbone

    try:
        with loaded.adapter.backbone_inputs(loaded.model, stop):
            loaded.adapter.forward(loaded.model, sample)
    except _ReachedBackbone:
        pass
    if not captured or captured[0] is None:  # pragma: no cover - the adapter always reaches it
        raise RuntimeError("the model's forward never reached its language model")
    return captured[0]


def _append_tokens(embed, prefix: torch.Tensor, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """``prefix`` embeddings followed by the embeddings of token ``ids``."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor([ids], dtype=torch.long)
    if ids.numel() == 0:
        return prefix
    return torch.cat([prefix, embed(ids.to(prefix.device))], dim=1)


def _continue(backbone, embed, prefix: torch.Tensor, ids: list[int] | torch.Tensor, keep: int):
    """Backbone logits of the last ``keep`` positions of ``prefix`` + ``ids``, float32 ``(keep, V)``."""
    out = backbone(
        inputs_embeds=_append_tokens(embed, prefix, ids), use_cache=False, logits_to_keep=keep
    )
    return out.logits[0].float()


def _eos_id(loaded) -> int | None:
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(loaded.model.config.get_text_config(), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


def evaluate_model(
    loaded,
    items: list[TaskItem],
    *,
    reference: dict[str, SpanDistribution] | None = None,
    keep_spans: bool = False,
    decode: bool = True,
    evs_rate: float | None = None,
    max_new_tokens: int = 16,
    topk: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModelEvaluation:
    """Evaluate ``loaded`` on ``items``.

    Args:
        loaded: A ``LoadedModel`` (normally from ``omniquant.evaluate.emulated.load_emulated``).
        items: Processed task items (``omniquant.evaluate.tasks.prepare_task_items``).
        reference: The baseline's stored spans by sample id; with it, each sample gets
            ``kl`` and ``top1`` against the baseline.
        keep_spans: Store this model's answer-span distributions (for the baseline).
        decode: Generate / choose answers and score them; ``False`` measures fidelity
            only (cheaper; used by the sensitivity sweep).
        evs_rate: EVS pruning rate for video samples (``None``: the checkpoint's).
        max_new_tokens: Greedy decoding budget per sample.
        topk: Stored distribution size (see ``SpanDistribution.from_logits``).
        progress: Called with ``(done, total)`` after each sample.

    Returns:
        The per-sample results (and spans with ``keep_spans``).
    """
    model, adapter, tokenizer = loaded.model, loaded.adapter, loaded.tokenizer
    backbone = adapter.quant_root(model)
    embed = model.get_input_embeddings()
    eos = _eos_id(loaded)
    image_token = adapter.placeholder_ids(model)["image"]
    rate_in_effect = float(adapter.evs_rate(model) if evs_rate is None else evs_rate)
    results: list[SampleResult] = []
    spans: dict[str, SpanDistribution] = {}
    start = time.perf_counter()
    with torch.no_grad(), adapter.video_pruning(model, evs_rate):
        for done, item in enumerate(items, start=1):
            sample, entry = item.sample, item.entry
            prefix = backbone_input(loaded, sample)
            video_tokens = video_placeholders = None
            if sample.pixel_values_videos is not None:
                video_placeholders = int((sample.input_ids == image_token).sum())
                text_tokens = int(sample.input_ids.shape[1]) - video_placeholders
                video_tokens = int(prefix.shape[1]) - text_tokens

            span_ids = sample.answer_ids
            if eos is not None:
                span_ids = torch.cat([span_ids, torch.tensor([[eos]], dtype=torch.long)], dim=1)
            n_span = int(span_ids.shape[1])
            # Positions L'-1 .. L'+A-1 predict the span tokens (the last one is unused).
            logits = _continue(backbone, embed, prefix, span_ids, n_span + 1)
            span_logits = logits[:n_span]
            if not bool(torch.isfinite(span_logits).all()):
                raise ReportError(
                    f"{loaded.path}: non-finite logits on task sample {sample.id!r}; the checkpoint "
                    "is broken (check it with `omniquant inspect --audit`)."
                )
            if keep_spans:
                spans[sample.id] = SpanDistribution.from_logits(span_logits, topk)
            kl = top1 = None
            if reference is not None:
                kl_t, agree_t = reference[sample.id].compare(span_logits)
                kl, top1 = float(kl_t.mean()), float(agree_t.mean())

            prediction = score = wer = None
            if decode:
                if entry.metric == "multiple_choice":
                    choice_scores = []
                    for ids in item.choice_ids:
                        clog = _continue(backbone, embed, prefix, ids, ids.shape[1] + 1)[:-1]
                        logp = torch.log_softmax(clog, dim=-1).gather(-1, ids[0].view(-1, 1))
                        choice_scores.append(float(logp.mean()))
                    prediction = entry.choices[choose(choice_scores)]
                else:
                    prediction = _greedy(
                        backbone,
                        embed,
                        prefix,
                        logits,
                        span_ids[0].tolist(),
                        eos,
                        max_new_tokens,
                        tokenizer,
                    )
                score, wer = score_sample(entry.metric, prediction, entry.answer)

            results.append(
                SampleResult(
                    id=sample.id,
                    task=entry.task,
                    modality=entry.modality,
                    metric=entry.metric,
                    prediction=prediction,
                    score=score,
                    wer=wer,
                    kl=kl,
                    top1=top1,
                    answer_tokens=n_span,
                    video_tokens=video_tokens,
                    video_placeholders=video_placeholders,
                    evs_rate=rate_in_effect,
                )
            )
            if progress:
                progress(done, len(items))
    return ModelEvaluation(samples=results, spans=spans, seconds=time.perf_counter() - start)


def _greedy(
    backbone,
    embed,
    prefix,
    forced_logits,
    forced_ids: list[int],
    eos,
    max_new_tokens: int,
    tokenizer,
) -> str:
    """Greedy continuation of ``prefix``, decoded.

    ``forced_logits[i]`` are the teacher-forced logits after ``prefix`` +
    ``forced_ids[:i]``. While the greedy tokens equal the reference tokens, the
    greedy step's logits *are* those rows (same causal computation), so a forward
    is only run once decoding leaves the reference; a correct answer costs none.
    Once it leaves, one pass over ``prefix`` + the tokens so far fills the model's
    cache (attention K/V, Mamba conv and SSM states) and every further step feeds one
    token, as a serving engine decodes.
    """
    generated: list[int] = []
    on_reference = True
    cache = None
    while len(generated) < max_new_tokens:
        step = len(generated)
        if on_reference and step < forced_logits.shape[0]:
            step_logits = forced_logits[step]
        else:
            if cache is None:  # first step off the reference: prompt + tokens so far
                embeds = _append_tokens(embed, prefix, generated)
            else:  # the cache holds everything but the last token
                embeds = embed(
                    torch.tensor([[generated[-1]]], dtype=torch.long, device=prefix.device)
                )
            out = backbone(
                inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            cache = out.past_key_values
            step_logits = out.logits[0, -1].float()
        token = int(step_logits.argmax())
        if token == eos:
            break
        on_reference = on_reference and step < len(forced_ids) and token == forced_ids[step]
        generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()

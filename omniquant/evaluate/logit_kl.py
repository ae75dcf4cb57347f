"""KL of the final logits over whole samples: how far a quantized model's next-token
distributions move from the baseline's, at every position of a prompt and its answer.

Policy:
- Each sample runs once through the whole omni model up to the backbone input
  (``omniquant.evaluate.runner.backbone_input``: encoders, projectors, EVS), then the
  backbone scores the prompt followed by the sample's answer tokens, when it has one
  (teacher forcing), in one pass. Every position counts: media placeholder positions
  too, since their logits are what the backbone computes from the encoders' output.
- The baseline's log-probabilities are kept in full (float32, positions x vocabulary):
  this is meant for calibration-sized sample counts (``omniquant fit`` scores a few
  samples per unit); the report's answer-span fidelity (``omniquant.evaluate.fidelity``)
  keeps top-k spans instead for whole task sets.
- KL(baseline || candidate) per position, averaged over positions, then over samples
  (each sample weighs the same whatever its length).
"""

from __future__ import annotations

import torch

from omniquant.errors import ReportError


def sample_logprobs(loaded, samples: list) -> list[torch.Tensor]:
    """Log-probabilities ``(L, V)`` (float32) of ``loaded`` at every position of each sample.

    Args:
        loaded: A ``LoadedModel`` (``omniquant.evaluate.emulated.load_emulated``).
        samples: Processed ``Sample`` objects (calibration or task samples).
    """
    from omniquant.evaluate.runner import backbone_input

    model, adapter = loaded.model, loaded.adapter
    backbone = adapter.quant_root(model)
    embed = model.get_input_embeddings()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for sample in samples:
            embeds = backbone_input(loaded, sample)
            if sample.answer_ids is not None and sample.answer_ids.numel():
                ids = sample.answer_ids.to(embeds.device)
                embeds = torch.cat([embeds, embed(ids)], dim=1)
            logits = backbone(inputs_embeds=embeds, use_cache=False).logits[0].float()
            if not bool(torch.isfinite(logits).all()):
                raise ReportError(
                    f"{loaded.path}: non-finite logits on sample {sample.id!r}; the layout "
                    "breaks the model (check it with `omniquant inspect --audit`)."
                )
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def mean_kl(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Mean over samples of the mean over positions of KL(reference || candidate), in nats."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("reference and candidate must hold the same, non-zero number of samples")
    per_sample = []
    for ref, cand in zip(reference, candidate):
        if ref.shape != cand.shape:
            raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(cand.shape)}")
        kl = (ref.exp() * (ref - cand)).sum(dim=-1)
        per_sample.append(float(kl.mean()))
    return sum(per_sample) / len(per_sample)


def mean_answer_kl(reference: list[torch.Tensor], candidate: list[torch.Tensor],
                   samples: list) -> float:  # fmt: skip
    """Mean over samples with an answer of KL(reference || candidate) at the positions that
    predict the answer tokens (the last ``len(answer)`` next-token predictions of
    ``sample_logprobs``), full vocabulary; the report's fidelity measures the same span
    (with top-k spans for whole task sets).

    Raises:
        ValueError: no sample has an answer.
    """
    per = []
    for ref, cand, sample in zip(reference, candidate, samples, strict=True):
        n = 0 if sample.answer_ids is None else int(sample.answer_ids.numel())
        if n:
            r, c = ref[-(n + 1) : -1], cand[-(n + 1) : -1]
            per.append(float((r.exp() * (r - c)).sum(dim=-1).mean()))
    if not per:
        raise ValueError("no sample has an answer span")
    return sum(per) / len(per)

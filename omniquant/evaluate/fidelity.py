"""Fidelity of a candidate's next-token distributions to the baseline's over an answer span.

Policy:
- The reference answer (plus the end-of-sequence token) is teacher-forced after the
  prompt; at each answer position we compare the baseline's next-token
  distribution P with the candidate's Q: ``KL(P || Q)`` in nats and whether both
  put their top-1 on the same token. A sample's value is the mean over its span.
- The baseline's distributions are stored once (its model is freed before any
  candidate loads). For vocabularies up to ``FULL_VOCAB_LIMIT`` tokens the whole
  log-softmax is kept (exact KL). Above it only the baseline's top ``k`` tokens are
  kept plus their complement mass; KL is then computed over the ``k + 1``-way
  partition (top-k tokens, "everything else"), which is a lower bound of the full KL
  (coarse-graining never increases KL) and exact when the tail carries no mass.
  Top-1 agreement is exact either way (the baseline's top-1 is always kept).
- Log-softmax in float32 whatever the model dtype. Tiny negative KL from rounding
  is clamped to 0; identical logits give exactly 0.
- A served model (``omniquant.endpoint``) returns only its top-k log-probabilities per
  position. ``compare_topk`` then takes KL over the partition the two sides both know:
  each token whose log-probability both have, plus one "everything else" cell whose
  masses are ``1 - sum`` of the known cells. Like the top-k form above this is a lower
  bound of the full KL (coarse-graining), exact when the cells carry all the mass; a
  known-cell mass the candidate puts at 0 in the rest cell is floored at
  ``REST_FLOOR``. Top-1 agreement stays exact (both top-1 tokens are always known).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FULL_VOCAB_LIMIT = 32768
DEFAULT_TOPK = 256
REST_FLOOR = 1e-12


@dataclass
class SpanDistribution:
    """The baseline's next-token distributions over one answer span.

    Attributes:
        logprobs: ``(A, V)`` full log-probabilities, or ``(A, k)`` for the top-k form.
        indices: ``None`` (full form) or ``(A, k)`` token ids of the kept log-probs,
            sorted by decreasing probability.
        tail_logprob: Top-k form only: ``(A,)`` log of the probability mass outside the
            kept tokens, as a log-sum-exp (``1 - sum(kept)`` in float32 cancels to 0 or
            below once the tail is under ~1e-7).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, topk: int | None = None) -> SpanDistribution:
        """Store the distributions of ``(A, V)`` logits.

        Args:
            logits: Logits at the positions that predict the answer tokens.
            topk: Keep only the top ``k`` (``None``: full vocabulary up to
                ``FULL_VOCAB_LIMIT`` tokens, else ``DEFAULT_TOPK``).
        """
        logp = torch.log_softmax(logits.float(), dim=-1)
        if topk is None:
            topk = None if logp.shape[-1] <= FULL_VOCAB_LIMIT else DEFAULT_TOPK
        if topk is None or topk >= logp.shape[-1]:
            return cls(logprobs=logp.clone())
        values, indices = logp.topk(topk, dim=-1)
        return cls(
            logprobs=values.clone(),
            indices=indices.clone(),
            tail_logprob=_tail_logprob(logp, indices),
        )

    @property
    def positions(self) -> int:
        """Number of answer positions."""
        return int(self.logprobs.shape[0])

    def nbytes(self) -> int:
        """Memory held by this span."""
        n = self.logprobs.numel() * self.logprobs.element_size()
        for extra in (self.indices, self.tail_logprob):
            if extra is not None:
                n += extra.numel() * extra.element_size()
        return n

    def compare(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position ``KL(baseline || candidate)`` and top-1 agreement.

        Args:
            logits: The candidate's ``(A, V)`` logits at the same positions.

        Returns:
            ``(kl, agree)``: float tensors of shape ``(A,)``; ``agree`` is 1.0 where
            both top-1 tokens are equal.
        """
        if logits.shape[0] != self.positions:
            raise ValueError(
                f"answer span has {self.positions} positions in the baseline but "
                f"{logits.shape[0]} in the candidate"
            )
        logq = torch.log_softmax(logits.float(), dim=-1)
        if self.indices is None:
            logp = self.logprobs
            kl = (logp.exp() * (logp - logq)).sum(-1)
            agree = (logp.argmax(-1) == logq.argmax(-1)).float()
        else:
            logp = self.logprobs
            logq_kept = logq.gather(-1, self.indices)
            kl = (logp.exp() * (logp - logq_kept)).sum(-1)
            # The "everything else" cell, both masses as log-sum-exps (see tail_logprob).
            logp_tail = self.tail_logprob
            logq_tail = _tail_logprob(logq, self.indices)
            finite = torch.isfinite(logp_tail)
            kl = kl + torch.where(
                finite,
                logp_tail.exp() * (logp_tail - logq_tail),
                torch.zeros_like(kl),
            )
            agree = (self.indices[:, 0] == logq.argmax(-1)).float()
        return kl.clamp_min(0.0), agree


def topk_span(indices: torch.Tensor, logprobs: torch.Tensor) -> SpanDistribution:
    """A top-k ``SpanDistribution`` from served log-probabilities.

    Args:
        indices: ``(A, k)`` token ids, sorted by decreasing probability per row.
        logprobs: ``(A, k)`` their log-probabilities.
    """
    logprobs = logprobs.float()
    kept = logprobs.exp().sum(-1).clamp(max=1.0)
    tail = torch.log1p(-kept).where(kept < 1.0, torch.full_like(kept, float("-inf")))
    return SpanDistribution(logprobs=logprobs, indices=indices.long(), tail_logprob=tail)


def compare_topk(
    reference: SpanDistribution, indices: torch.Tensor, logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL and top-1 agreement of a candidate known only by its top-k.

    Args:
        reference: The baseline's span (full or top-k form).
        indices: ``(A, k)`` the candidate's top-k token ids per position, best first.
        logprobs: ``(A, k)`` their log-probabilities.

    Returns:
        ``(kl, agree)`` as ``SpanDistribution.compare`` (see the module policy).
    """
    if indices.shape[0] != reference.positions:
        raise ValueError(
            f"answer span has {reference.positions} positions in the baseline but "
            f"{indices.shape[0]} in the candidate"
        )
    kls, agree = [], []
    for pos in range(reference.positions):
        q_ids, q_lp = indices[pos].long(), logprobs[pos].double()
        if reference.indices is None:
            p_full = reference.logprobs[pos].double()
            cells_p, cells_q = p_full[q_ids], q_lp
            p_top = int(p_full.argmax())
        else:
            p_ids = reference.indices[pos].tolist()
            p_lp = reference.logprobs[pos].double()
            where = {t: i for i, t in enumerate(p_ids)}
            common = [(where[t], j) for j, t in enumerate(q_ids.tolist()) if t in where]
            cells_p = torch.stack([p_lp[i] for i, _ in common]) if common else p_lp[:0]
            cells_q = torch.stack([q_lp[j] for _, j in common]) if common else q_lp[:0]
            p_top = p_ids[0]
        kl = (cells_p.exp() * (cells_p - cells_q)).sum()
        p_rest = float((1.0 - cells_p.exp().sum()).clamp(min=0.0))
        q_rest = float((1.0 - cells_q.exp().sum()).clamp(min=REST_FLOOR))
        if p_rest > 0.0:
            kl = kl + p_rest * (math.log(p_rest) - math.log(q_rest))
        kls.append(float(kl))
        agree.append(float(p_top == int(q_ids[0])))
    return torch.tensor(kls).clamp_min(0.0), torch.tensor(agree)


def _tail_logprob(logp: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(logp)))`` over the tokens not in ``kept``, per row (``-inf`` if none)."""
    return logp.scatter(-1, kept, float("-inf")).logsumexp(-1)

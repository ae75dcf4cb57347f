"""Per-expert hooks for transformers' fused 3-D expert containers (``NemotronHExperts``).

Policy: the fused container runs ``F.linear`` once per projection per routed
expert on views of its 3-D parameters. Which projection and which expert a call
belongs to is read from the weight view's storage and offset, the same invariant
modelopt's ``_QuantFusedExperts`` relies on (it needs the eager experts kernel).
This module is the one place that knows it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ExpertFn = Callable[[str, int, torch.Tensor], torch.Tensor]


def patch_expert_linears(
    mod,
    fn: ExpertFn,
    projections=("up_proj", "down_proj"),
    shared: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> Callable[[], None]:
    """Route every per-expert ``F.linear`` input of ``mod`` through ``fn(proj, expert, x)``.

    Args:
        shared: Optional ``{projection: g}`` where the caller guarantees
            ``fn(projection, i, x) == g(x)`` for every expert ``i`` and ``g`` acts on each
            row alone. The first projection's inputs are rows gathered from the container's
            input (``hidden_states[token_idx]``), so its ``g`` runs once on that input
            instead of once per routed expert (same values: gathering commutes with a
            row-wise function); ``fn`` is then not called for it. When the second
            projection is shared too, the container runs ``_grouped_forward`` (one call of
            each ``g`` per container call).

    Returns:
        A function that restores the module's original forward.
    """
    orig_forward = mod.forward
    first = projections[0]
    on_input = (shared or {}).get(first)
    on_mid = (shared or {}).get(projections[1]) if len(projections) == 2 else None
    if on_input is not None and on_mid is not None and _has_known_loop(mod, projections):

        def grouped(hidden_states, top_k_index, top_k_weights):
            return _grouped_forward(mod, hidden_states, top_k_index, top_k_weights, on_input, on_mid)

        mod.forward = grouped

        def undo_grouped() -> None:
            mod.forward = orig_forward

        return undo_grouped

    def forward(*args, **kwargs):
        import torch.nn.functional as F

        if on_input is not None and args:
            args = (on_input(args[0]), *args[1:])
        elif on_input is not None:
            kwargs["hidden_states"] = on_input(kwargs["hidden_states"])

        f_linear = F.linear

        def linear(x, weight, bias=None):
            # Read the parameters at call time: an accelerate-offloaded container gets
            # its weights materialised by its hook after this wrapper was entered.
            ptr = weight.untyped_storage().data_ptr()
            for proj in projections:
                param = getattr(mod, proj)
                if ptr == param.untyped_storage().data_ptr():
                    if proj == first and on_input is not None:
                        break
                    idx = (weight.storage_offset() - param.storage_offset()) // param.stride(0)
                    x = fn(proj, int(idx), x)
                    break
            return f_linear(x, weight, bias)

        F.linear = linear
        try:
            return orig_forward(*args, **kwargs)
        finally:
            F.linear = f_linear

    mod.forward = forward

    def undo() -> None:
        mod.forward = orig_forward

    return undo


def _has_known_loop(mod, projections) -> bool:
    """Whether ``mod`` runs transformers' eager ``NemotronHExperts`` loop, which
    ``_grouped_forward`` reproduces (``up`` then ``act_fn`` then ``down`` per expert)."""
    forward = getattr(type(mod), "forward", None)
    return (
        tuple(projections) == ("up_proj", "down_proj")
        and getattr(forward, "__qualname__", "") == "NemotronHExperts.forward"
        and hasattr(mod, "act_fn")
        and hasattr(mod, "num_experts")
    )


def _grouped_forward(mod, hidden_states, top_k_index, top_k_weights, on_input, on_mid):
    """transformers' eager ``NemotronHExperts.forward`` with its GEMM inputs quantized by
    row-wise functions, each called once per container call: ``on_input`` on the input,
    ``on_mid`` on the concatenated ``act_fn(up(x))`` rows of every routed expert.

    The same GEMMs on the same shapes, in the same expert order, and each expert's down
    input a fresh contiguous tensor as before, so the same values bit for bit as quantizing
    per expert (the eval pins check it).
    """
    import torch.nn.functional as F

    final = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=mod.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
    hidden = on_input(hidden_states)
    routed = []
    for expert_idx in expert_hit:
        expert_idx = expert_idx.item()
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        if token_idx.numel() == 0:
            continue
        h = mod.act_fn(F.linear(hidden[token_idx], mod.up_proj[expert_idx]))
        routed.append((expert_idx, top_k_pos, token_idx, h.shape[0], h))
    if routed:
        mids = on_mid(torch.cat([r[4] for r in routed]))
        start = 0
        for expert_idx, top_k_pos, token_idx, n, _ in routed:
            x = mids[start : start + n].clone()
            start += n
            out = F.linear(x, mod.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
    return final.to(hidden_states.dtype)

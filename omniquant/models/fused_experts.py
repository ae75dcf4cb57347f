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
            row-wise function); ``fn`` is then not called for it. Other entries are unused.

    Returns:
        A function that restores the module's original forward.
    """
    orig_forward = mod.forward
    first = projections[0]
    on_input = (shared or {}).get(first)

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

"""The shared expert-input quantizer (issue 26): quantizing a fused-experts container's input
once gives the same bits as quantizing every routed expert's gathered rows."""

from types import SimpleNamespace

import torch

from omniquant.models.fused_experts import patch_expert_linears
from omniquant.numerics import nvfp4_activation_quantizer


def _container():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    cfg = SimpleNamespace(n_routed_experts=4, hidden_size=32, moe_intermediate_size=48,
                          moe_latent_size=None, mlp_hidden_act="relu2",
                          _experts_implementation="eager")  # fmt: skip
    mod = NemotronHExperts(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (mod.up_proj, mod.down_proj):
            p.copy_(torch.randn(p.shape, generator=g).to(torch.bfloat16) * 0.1)
    return mod


def _run(mod, shared, calls: list):
    q_up, q_down = nvfp4_activation_quantizer(0.002), nvfp4_activation_quantizer(0.003)

    def fn(proj, idx, x):
        calls.append(proj)
        return (q_up if proj == "up_proj" else q_down)(x)

    table = {"up_proj": q_up, "down_proj": q_down}
    undo = patch_expert_linears(mod, fn, ("up_proj", "down_proj"), {k: table[k] for k in shared})
    try:
        g = torch.Generator().manual_seed(1)
        hidden = (torch.randn(9, 32, generator=g) * 3).to(torch.bfloat16)
        idx = torch.randint(0, 4, (9, 2), generator=g)
        weights = torch.rand(9, 2, generator=g)
        return mod(hidden, idx, weights)
    finally:
        undo()


def test_shared_input_quantizer_is_bit_exact_and_skips_per_expert_calls():
    mod = _container()
    per_expert, shared = [], []
    want = _run(mod, (), per_expert)
    got = _run(mod, ("up_proj",), shared)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert "up_proj" in per_expert and "up_proj" not in shared
    assert shared.count("down_proj") == per_expert.count("down_proj") > 1


def test_both_projections_shared_run_the_grouped_loop_bit_exact():
    mod = _container()
    per_expert, grouped = [], []
    want = _run(mod, (), per_expert)
    got = _run(mod, ("up_proj", "down_proj"), grouped)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert grouped == [] and len(per_expert) > 2  # fn never called: one quantize per call

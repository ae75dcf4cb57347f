"""Running a plan's calibration algorithm: pre-flight checks, the CPU seam, the record.

Policy:
- Before calibration: an algorithm with a token minimum (GPTQ's Hessian) is refused on a
  calibration set below it, naming the count; the algorithm's cost on this model is
  estimated from the weights it will search and a fake-quant rate measured here, and said
  before it starts (a warning when it exceeds ``SLOW_ESTIMATE_S``).
- During ``mtq.quantize``: any algorithm other than ``max`` runs inside
  ``omniquant.quantize.modelopt_cpu.cpu_nvfp4_fake_quant`` (CPU tensors only; CUDA tensors
  keep modelopt's kernels). ``max`` runs exactly as before.
- After: ``omniquant.json["algorithm"]`` records the algorithm, modelopt's parameters, the
  algorithm per rule with the reason wherever a rule stays ``max``, and per layer every
  fallback: GPTQ's fused expert containers (modelopt updates ``Linear`` modules only) and
  ``local_hessian``'s routed experts that received no calibration token (no Hessian;
  modelopt searches them with plain MSE).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from omniquant.errors import CalibrationError, arg_ref
from omniquant.quantize.algorithms import get_algorithm
from omniquant.quantize.plan import weight_elements

#: An estimate above this many seconds is printed as a warning before calibration.
SLOW_ESTIMATE_S = 3600.0
#: Weight fake-quant evaluations per weight element, by algorithm (modelopt 0.47):
#: mse/local_hessian sweep the 126 positive finite E4M3 scales; Four-Over-Six tries two
#: multipliers; GPTQ re-quantizes the whole matrix once per input column (its unfused
#: CPU path), counted per module below.
_EVALS_PER_ELEMENT = {"mse": 126, "local_hessian": 126 * 16, "four_over_six": 2}


def _fake_quant_rate() -> float:
    """Weight elements per second omniquant's NVFP4 fake quant runs at on this CPU."""
    import torch

    from omniquant.numerics import fake_quant_nvfp4_blocks

    x = torch.randn(1 << 16, 16)
    scale = torch.full((1 << 16,), 0.1)
    t = time.perf_counter()
    fake_quant_nvfp4_blocks(x, scale)
    return x.numel() / max(time.perf_counter() - t, 1e-6)


def estimate_cost(plan, loaded) -> tuple[float, str]:
    """``(element evaluations, how they were counted)`` of the plan's active algorithm."""
    algos = plan.algorithms
    if algos is None or algos.active == "max":
        return 0.0, "max: no search"
    active, elems = algos.active, weight_elements(plan, loaded)
    mine = {n: e for n, e in elems.items() if plan.module_algorithm(n) == active}
    if active == "gptq":
        modules = dict(loaded.model.named_modules())
        total = sum(e * getattr(modules[n], "in_features", 0) for n, e in mine.items())
        return float(total), "one whole-matrix fake quant per input column of each Linear"
    per = _EVALS_PER_ELEMENT.get(active, 1)
    return float(per * sum(mine.values())), f"{per} fake-quant evaluations per weight element"


def preflight_algorithm(plan, loaded, samples, say: Callable[[str], None]) -> None:
    """Refuse too little data for the algorithm; say its estimated cost before it starts.

    Raises:
        CalibrationError: the algorithm needs more calibration tokens than the set has.
    """
    algos = plan.algorithms
    if algos is None or algos.active == "max":
        return
    algo = get_algorithm(algos.active)
    tokens = sum(int(s.input_ids.numel()) for s in samples)
    if tokens < algo.min_tokens:
        raise CalibrationError(
            f"algorithm {algo.name} needs at least {algo.min_tokens} calibration tokens for its "
            f"Hessians; the calibration set gives {tokens} ({len(samples)} sample(s)). Use more "
            f"samples (calibration.size, {arg_ref('calib')}) or another algorithm."
        )
    evals, how = estimate_cost(plan, loaded)
    rate = _fake_quant_rate()
    seconds = evals / rate
    line = (
        f"algorithm {algo.name}: about {evals:.3g} weight-element evaluations ({how}); "
        f"at {rate / 1e6:.0f} M elements/s measured here, about {seconds:.0f} s of weight "
        "search on top of the calibration forward passes"
    )
    say(("warning: " if seconds > SLOW_ESTIMATE_S else "") + line)


@contextlib.contextmanager
def algorithm_context(plan):
    """The CPU NVFP4 fake-quant seam for any algorithm but ``max`` (``max`` runs unchanged)."""
    if plan.algorithms is None or plan.algorithms.active == "max":
        yield
        return
    from omniquant.quantize.modelopt_cpu import cpu_nvfp4_fake_quant

    with cpu_nvfp4_fake_quant():
        yield


def algorithm_record(plan, stats) -> dict:
    """``omniquant.json["algorithm"]``: what ran where, and every per-layer fallback."""
    algos = plan.algorithms
    if algos is None:
        return {"name": "max", "modelopt": "max", "rules": {}, "notes": {}, "fallbacks": {}}
    fallbacks = dict(plan.algorithm_fallbacks())
    if algos.active == "local_hessian":
        for layer, counts in stats.expert_tokens.items():
            starved = [i for i, c in enumerate(counts) if c == 0]
            if not starved or stats.force_all_experts:
                continue
            for name in plan.expert_projections:
                if name.startswith(layer + ".") and plan.module_algorithm(name) == "local_hessian":
                    fallbacks[name] = (
                        f"experts {', '.join(map(str, starved))}: mse (no routed calibration "
                        "token, so no Hessian; modelopt searches their scales with plain MSE)"
                    )
    return {**algos.to_json(), "fallbacks": dict(sorted(fallbacks.items()))}

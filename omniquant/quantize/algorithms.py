"""Calibration algorithms: one registry entry per algorithm, all run by modelopt.

Policy:
- An algorithm decides *which scales and weights* a format's bytes are computed from,
  never the layout: every algorithm exports the same tensors (dtype, shape, count) as
  ``max``, so the bytes per recipe are identical across algorithms and vLLM/TensorRT-LLM
  read them unchanged.
- modelopt is the engine. Each entry names the modelopt 0.47 calibration config it runs
  (``algorithm`` of ``mtq.quantize``) and how the weight quantizer of each format it
  refines must be configured for it (``static`` NVFP4 block scales, Four-Over-Six). The
  NVFP4 fake quant those algorithms need runs on the CPU through
  ``omniquant.quantize.modelopt_cpu`` (omniquant's bit-exact numerics).
- ``max`` is today's default and writes today's bytes (``tests/test_export_pins.py``).
- modelopt runs one algorithm per ``mtq.quantize`` call. A recipe may set an algorithm
  globally and per rule; at most one algorithm other than ``max`` can be active, and a
  rule may return to ``max`` under it only where modelopt leaves that rule's quantizers
  alone (``keeps_max_rules``). A global algorithm applies to the rules whose format it
  refines; the other rules stay ``max`` and ``omniquant.json`` says so per rule. A rule
  that *names* an algorithm its format cannot take is refused.
- What modelopt 0.47 does not cover is recorded, never hidden: GPTQ updates quantized
  ``Linear`` modules only (``is_quantized_linear``), so fused routed-expert containers keep
  ``max`` scales and appear per layer under ``fallbacks`` in ``omniquant.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The calibration algorithm a recipe gets when it names none.
DEFAULT_ALGORITHM = "max"


@dataclass(frozen=True)
class Algorithm:
    """One calibration algorithm."""

    name: str
    #: Formats whose weights this algorithm refines (others stay ``max``).
    formats: frozenset[str]
    #: One line for ``omniquant recipes``/errors.
    summary: str
    #: modelopt ``algorithm`` config (``method`` plus its parameters) for a run whose
    #: refined formats are ``formats_used``; see :meth:`modelopt_algorithm`.
    modelopt: dict = field(default_factory=dict)
    #: NVFP4 weight quantizers of rules this algorithm refines use static block scales
    #: (modelopt's ``NVFP4StaticQuantizer``), which the search or update writes.
    static_nvfp4_weights: bool = False
    #: ``block_sizes.four_over_six`` on the NVFP4 weight quantizers it refines.
    four_over_six: bool = False
    #: Whether rules that stay ``max`` keep max's scales under it (modelopt skips
    #: dynamic-scale weight quantizers in an FP8-scale sweep; GPTQ and a multiplier
    #: search touch every enabled weight quantizer).
    keeps_max_rules: bool = True
    #: Refused with this reason (the algorithm exists in modelopt, but its output cannot
    #: be exported as plain FP8/NVFP4 for this model family).
    refused: str | None = None
    #: Least number of calibration tokens reaching the backbone it accepts (0: any).
    min_tokens: int = 0

    def modelopt_algorithm(self, formats_used: set[str]) -> dict | str:
        """The ``algorithm`` argument of ``mtq.quantize``."""
        if self.name == "mse" and "nvfp4" not in formats_used:
            # FP8 alone: the FP8-scale sweep covers NVFP4 only; modelopt's multiplier search.
            return {"method": "mse"}
        return dict(self.modelopt) if self.modelopt else self.name

    def effective_formats(self, formats_used: set[str]) -> set[str]:
        """Of ``formats_used``, the formats whose weights this run actually refines."""
        if self.name == "mse" and "nvfp4" in formats_used:
            return {"nvfp4"}  # fp8_scale_sweep: FP8 weights keep their max amax
        return set(formats_used) & set(self.formats)


_AWQ_REFUSED = (
    "modelopt's AWQ stores a per-channel pre_quant_scale that must fold into the operation "
    "before the GEMM to export plain FP8/NVFP4; in nemotron_h every quantizable GEMM's input "
    "either comes from a norm that also feeds a BF16 consumer (MoE: router + shared and "
    "routed experts share one RMSNorm output), or from Mamba's gated RMSNorm and the expert "
    "activation, which modelopt 0.47's exporter does not fold into; it would export an extra "
    "pre_quant_scale tensor that vLLM and TensorRT-LLM do not read"
)

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            name="max",
            formats=frozenset({"fp8", "nvfp4"}),
            summary="scales from the max |x| seen (modelopt max; NVIDIA's release)",
        ),
        Algorithm(
            name="mse",
            formats=frozenset({"fp8", "nvfp4"}),
            summary="weight scales minimising weight MSE: NVFP4 per-block FP8-scale sweep "
            "(modelopt mse, fp8_scale_sweep); FP8 alone: amax multiplier search",
            modelopt={"method": "mse", "fp8_scale_sweep": True},
            static_nvfp4_weights=True,
        ),
        Algorithm(
            name="four_over_six",
            formats=frozenset({"nvfp4"}),
            summary="NVFP4 Four-Over-Six: per block, scale the max to 6 or to 4, whichever "
            "has the lower MSE (modelopt's nvfp4_four_over_six preset)",
            modelopt={
                "method": "mse",
                "fp8_scale_sweep": False,
                "start_multiplier": 1.0,
                "stop_multiplier": 1.5,
                "step_size": 0.5,
            },
            static_nvfp4_weights=True,
            four_over_six=True,
            keeps_max_rules=False,
        ),
        Algorithm(
            name="local_hessian",
            formats=frozenset({"nvfp4"}),
            summary="NVFP4 per-block FP8-scale sweep weighted by each block's input Hessian "
            "(modelopt local_hessian)",
            modelopt={"method": "local_hessian", "fp8_scale_sweep": True},
            static_nvfp4_weights=True,
        ),
        Algorithm(
            name="gptq",
            formats=frozenset({"fp8", "nvfp4"}),
            summary="GPTQ: weights updated column by column against the input Hessian "
            "(modelopt gptq; quantized Linear modules, not fused expert containers)",
            modelopt={"method": "gptq", "perc_damp": 0.01, "block_size": 128},
            static_nvfp4_weights=True,
            keeps_max_rules=False,
            min_tokens=128,
        ),
        Algorithm(
            name="awq",
            formats=frozenset({"fp8", "nvfp4"}),
            summary="activation-aware scaling (modelopt awq_lite): refused for this model family",
            modelopt={"method": "awq_lite"},
            refused=_AWQ_REFUSED,
        ),
    )
}


def get_algorithm(name: str) -> Algorithm:
    """The registry entry of ``name``.

    Raises:
        KeyError: naming the known algorithms.
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(
            f"unknown algorithm {name!r}; known algorithms: {', '.join(ALGORITHMS)}"
        ) from None


@dataclass
class AlgorithmPlan:
    """The algorithm each rule runs with, resolved from a recipe (before any model work)."""

    #: The one algorithm other than max this run calibrates with (``max`` if none).
    active: str
    #: Rule index -> effective algorithm name.
    by_rule: dict[int, str]
    #: Rule index -> why it runs ``max`` though the recipe's algorithm is another.
    notes: dict[int, str]
    #: modelopt ``algorithm`` argument.
    modelopt: dict | str
    #: Formats whose weight quantizers run the active algorithm.
    refined_formats: set[str]

    def to_json(self) -> dict:
        return {
            "name": self.active,
            "modelopt": self.modelopt,
            "rules": {str(i): a for i, a in sorted(self.by_rule.items())},
            "notes": {str(i): n for i, n in sorted(self.notes.items())},
        }


def resolve_algorithms(recipe) -> AlgorithmPlan:
    """Each rule's algorithm from ``recipe`` (global ``quantization.algorithm``, rule ``algorithm``).

    Raises:
        ValueError: an algorithm is refused for this model family, a rule names an
            algorithm its format cannot take, two algorithms other than max are mixed, or
            a rule returns to max under an algorithm that would touch it anyway. Messages
            name the rule (``quantization.rules.N {...}``).
    """
    q = getattr(recipe, "quantization", recipe)
    glob = get_algorithm(q.algorithm)
    errors: list[str] = []
    by_rule: dict[int, str] = {}
    notes: dict[int, str] = {}
    refused: dict[str, list[str]] = {}
    quantized = [(i, r) for i, r in enumerate(q.rules) if r.format != "bf16"]
    for i, rule in quantized:
        where = f"quantization.rules.{i} {rule.describe()}"
        name = rule.algorithm or glob.name
        algo = get_algorithm(name)
        if algo.refused:
            refused.setdefault(name, []).append(where)
            continue
        if rule.format not in algo.formats:
            if rule.algorithm is not None:
                errors.append(
                    f"{where}: algorithm {name} does not apply to format {rule.format} "
                    f"(it refines {', '.join(sorted(algo.formats))}); remove the rule's "
                    "algorithm or pick one of: "
                    + ", ".join(a.name for a in ALGORITHMS.values()
                                if rule.format in a.formats and not a.refused)
                )  # fmt: skip
                continue
            notes[i] = f"{name} does not apply to {rule.format}: max"
            name = "max"
        by_rule[i] = name
    for name, wheres in refused.items():
        errors.append(
            f"algorithm {name} is refused for {'; '.join(wheres)}: {get_algorithm(name).refused}"
        )
    if errors:
        raise ValueError("\n".join(errors))
    if glob.refused and not quantized:
        raise ValueError(f"algorithm {glob.name} is refused: {glob.refused}")
    active = sorted({a for a in by_rule.values() if a != "max"})
    if len(active) > 1:
        raise ValueError(
            f"rules use {', '.join(active)}: modelopt 0.47 runs one calibration algorithm per "
            "model, so a recipe can mix one algorithm with max, not two others"
        )
    name = active[0] if active else "max"
    algo = get_algorithm(name)
    if glob.name != "max" and name == "max":
        raise ValueError(
            f"algorithm {glob.name} applies to none of the recipe's quantized rules (it "
            f"refines {', '.join(sorted(glob.formats))}); use algorithm: max"
        )
    if not algo.keeps_max_rules:
        stay = [i for i, a in by_rule.items() if a == "max" and i not in notes]
        if stay:
            rules = ", ".join(f"quantization.rules.{i} {q.rules[i].describe()}" for i in stay)
            raise ValueError(
                f"{rules}: cannot stay max under {name}: modelopt's {name} touches every "
                "enabled weight quantizer; use one algorithm for all rules"
            )
    formats_used = {q.rules[i].format for i, a in by_rule.items() if a == name}
    refined = algo.effective_formats(formats_used) if name != "max" else set()
    for i, a in list(by_rule.items()):
        if a == name != "max" and q.rules[i].format not in refined:
            notes[i] = (
                f"{name} with nvfp4 rules sweeps NVFP4 scales only: {q.rules[i].format} stays max"
            )
            by_rule[i] = "max"
    if not algo.keeps_max_rules:
        for i in notes:
            notes[i] += f" (note: modelopt's {name} still runs over its weight quantizer)"
    return AlgorithmPlan(
        active=name, by_rule=by_rule, notes=notes,
        modelopt=algo.modelopt_algorithm(formats_used) if name != "max" else "max",
        refined_formats=refined,
    )  # fmt: skip

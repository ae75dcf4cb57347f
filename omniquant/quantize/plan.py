"""The quantization plan: recipe rules resolved against the real model, before calibration.

Policy:
- Every rule is resolved against the loaded model's module groups; a rule that
  matches nothing is an error (modelopt silently ignores such patterns, which is
  how encoders end up quantized by accident).
- Later rules win; a rule whose every module a later rule sets again has no effect, and
  the plan warns naming both (``Plan.warnings``).
- A glob rule that would quantize a guarded group (vision/audio towers,
  projectors) is an error: encoders are only touched by naming their group.
- NVFP4 modules whose input width does not divide the block size are listed,
  all of them, before any calibration.
- ``to_modelopt_config`` is the one place a plan becomes a modelopt config. It
  names every quantizer exactly (no wildcards beyond the per-expert list), so
  what modelopt quantizes is exactly what the plan says.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

from omniquant.errors import PlanError, RecipeError
from omniquant.formats import FORMATS, NARROWEST_FIRST
from omniquant.quantize.algorithms import AlgorithmPlan, get_algorithm, resolve_algorithms
from omniquant.quantize.recipe import Recipe

#: Groups that a recipe may set to fp8/nvfp4 (serving engines have no quantized
#: path for the others).
QUANTIZABLE_GROUPS = frozenset(
    {
        "mamba_in_out",
        "routed_experts",
        "shared_experts",
        "moe_latent",
        "dense_mlp",
        "attention_qkv",
        "attention_o",
    }
)

# The modelopt configs live in the format registry; these names stay importable.
FP8_CFG = FORMATS["fp8"].modelopt_cfg
NVFP4_CFG = FORMATS["nvfp4"].modelopt_cfg
_FORMAT_CFG = {name: f.modelopt_cfg for name, f in FORMATS.items() if f.modelopt_cfg is not None}


@dataclass
class Plan:
    """Per-module formats for every grouped module of the model."""

    module_format: dict[str, str]
    module_group: dict[str, str]
    kv_cache: str
    quant_root: str
    kv_modules: list[str] = field(default_factory=list)
    #: Fused expert container -> its per-expert projections (``ModelAdapter.expert_linears``),
    #: whose quantizers modelopt names after them.
    expert_projections: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Rules without effect (``_overridden_rules``), one line each.
    warnings: list[str] = field(default_factory=list)
    #: Module -> index of the recipe rule that set its format (the last one matching).
    module_rule: dict[str, int] = field(default_factory=dict)
    #: The calibration algorithm per rule (``omniquant.quantize.algorithms``).
    algorithms: AlgorithmPlan | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """Group -> {format: number of modules} (groups with no modules omitted)."""
        out: dict[str, Counter] = {}
        for name, fmt in self.module_format.items():
            out.setdefault(self.module_group[name], Counter())[fmt] += 1
        return {g: dict(sorted(c.items())) for g, c in out.items()}

    def quantized(self) -> dict[str, str]:
        """Module name -> format for modules not in BF16."""
        return {n: f for n, f in self.module_format.items() if f != "bf16"}

    def group_precision(self) -> dict[str, str]:
        """Group -> precision summary ('fp8', 'nvfp4', 'bf16' or 'mixed:...')."""
        out = {}
        for group, counts in self.counts().items():
            fmts = sorted(counts)
            out[group] = fmts[0] if len(fmts) == 1 else "mixed:" + "+".join(fmts)
        return out

    def module_algorithm(self, name: str) -> str:
        """The calibration algorithm that sets ``name``'s scales (``max`` where none other)."""
        if self.algorithms is None or name not in self.module_rule:
            return "max"
        algo = self.algorithms.by_rule.get(self.module_rule[name], "max")
        return "max" if name in self.algorithm_fallbacks() else algo

    def algorithm_fallbacks(self) -> dict[str, str]:
        """Module -> why it keeps max scales though its rule names another algorithm."""
        if self.algorithms is None or self.algorithms.active != "gptq":
            return {}
        return {
            name: "max: modelopt 0.47 GPTQ updates quantized Linear modules only "
            "(is_quantized_linear); a fused expert container is not one"
            for name in self.expert_projections
            if self.module_format.get(name, "bf16") != "bf16"
            and self.algorithms.by_rule.get(self.module_rule.get(name, -1)) == "gptq"
        }

    def to_json(self) -> dict:
        return {
            "counts": self.counts(),
            "kv_cache": self.kv_cache,
            "quantized_modules": dict(sorted(self.quantized().items())),
        }


def weight_elements(plan: Plan, loaded) -> dict[str, int]:
    """Module -> elements of its quantized weights (fused containers: all experts)."""
    modules = dict(loaded.model.named_modules())
    out = {}
    for name in plan.quantized():
        mod = modules.get(name)
        if mod is not None:
            out[name] = sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() >= 2)
    return out


def resolve_plan(recipe: Recipe, loaded) -> Plan:
    """Resolve ``recipe``'s rules against the loaded model.

    Raises:
        RecipeError: a rule names an unknown group or selector.
        PlanError: a rule matches nothing, touches a guarded group implicitly,
            quantizes a non-quantizable group, or NVFP4 shapes do not divide.
    """
    adapter, model = loaded.adapter, loaded.model
    groups = adapter.module_groups(model)
    selectors = adapter.selectors(model)
    module_group = {name: g for g, names in groups.items() for name in names}
    module_format = {name: "bf16" for name in module_group}
    module_rule: dict[str, int] = {}
    errors: list[str] = []
    applied: list[tuple[str, set[str]]] = []  # (rule, the modules it set), in order

    for idx, rule in enumerate(recipe.quantization.rules):
        where = f"quantization.rules.{idx} {rule.describe()}"
        if rule.group is not None:
            if rule.group in groups:
                matched = list(groups[rule.group])
            elif rule.group in selectors:
                matched = list(selectors[rule.group])
            else:
                known = sorted([g for g in groups if groups[g]] + list(selectors))
                raise RecipeError(
                    f"{where}: unknown group {rule.group!r}; groups of this model: {', '.join(known)}."
                )
            explicit = True
        else:
            matched = [n for n in module_group if fnmatch.fnmatchcase(n, rule.modules)]
            explicit = False
        if not matched and rule.group is not None:
            errors.append(
                f"{where}: this model has no {rule.group} module (its config builds none: "
                f"e.g. no MoE layer in the layer pattern, or no audio tower); remove the rule "
                "or use a recipe written for this model."
            )
            continue
        if not matched:
            errors.append(
                f"{where}: matches no module of this model; fix the pattern or remove the rule "
                "(run `omniquant inspect MODEL` to list module names and groups)."
            )
            continue
        if rule.format != "bf16":
            guarded = sorted({module_group[n] for n in matched} & adapter.guarded_groups)
            if guarded and not explicit:
                hits = [n for n in matched if module_group[n] in adapter.guarded_groups]
                errors.append(
                    f"{where}: would quantize {len(hits)} module(s) of the encoder/projector "
                    f"group(s) {', '.join(guarded)} (e.g. {hits[0]}) without naming them; "
                    f"narrow the pattern to the language model ({adapter.quant_root_name()}.*)."
                )
                continue
            bad = sorted({module_group[n] for n in matched} - QUANTIZABLE_GROUPS)
            if bad:
                errors.append(
                    f"{where}: group(s) {', '.join(bad)} cannot be quantized to {rule.format} by "
                    f"omniquant (quantizable groups: {', '.join(sorted(QUANTIZABLE_GROUPS))}); "
                    "set format: bf16 for them."
                )
                continue
        for n in matched:
            module_format[n] = rule.format
            module_rule[n] = idx
        applied.append((where, set(matched)))

    if errors:
        raise PlanError("recipe cannot be applied to this model:\n  " + "\n  ".join(errors))

    modules = dict(model.named_modules())
    expert_projections = {
        name: tuple(dict.fromkeys(e.projection for e in adapter.expert_linears(name, modules[name])))
        for name, group in module_group.items()
        if group in adapter.fused_expert_groups
    }
    _check_nvfp4_divisibility(
        module_format, modules, adapter, expert_projections, recipe.quantization.nvfp4_block_size
    )
    kv_modules = []
    if recipe.quantization.kv_cache == "fp8":
        kv_modules = adapter.kv_cache_modules(model)
    return Plan(
        module_format=module_format,
        module_group=module_group,
        kv_cache=recipe.quantization.kv_cache,
        quant_root=adapter.quant_root_name(),
        kv_modules=kv_modules,
        expert_projections=expert_projections,
        warnings=_overridden_rules(applied),
        module_rule=module_rule,
        algorithms=resolve_algorithms(recipe),
    )


def _overridden_rules(applied: list[tuple[str, set[str]]]) -> list[str]:
    """A line for each rule whose every module later rules set again (later rules win)."""
    found = []
    for i, (where, modules) in enumerate(applied):
        later = applied[i + 1 :]
        if not later or not modules <= set().union(*(m for _, m in later)):
            continue
        by = [w for w, m in later if m & modules]
        found.append(
            f"{where} has no effect: {' and '.join(by)} set{'s' if len(by) == 1 else ''} "
            f"every module it selects again (later rules win); remove it, or narrow the "
            f"later rule{'' if len(by) == 1 else 's'}."
        )
    return found


def _check_nvfp4_divisibility(
    module_format: dict[str, str], modules: dict, adapter, fused: dict, block: int
) -> None:
    offenders = []
    for name, fmt in module_format.items():
        if fmt != "nvfp4":
            continue
        for label, width in _input_widths(name, modules[name], adapter, name in fused):
            if width % block:
                offenders.append(f"{label} (input width {width})")
    if offenders:
        raise PlanError(
            f"NVFP4 needs every quantized module's input width divisible by the block size "
            f"{block}; these are not:\n  " + "\n  ".join(offenders) + "\n"
            "Keep them in fp8 or bf16 with a later rule."
        )


def _input_widths(name: str, module, adapter, fused: bool) -> list[tuple[str, int]]:
    """``(label, input width)`` of a module's GEMMs: one per projection of a fused expert
    container (its experts share the width), else the module's own."""
    if fused:
        widths: dict[str, int] = {}
        for e in adapter.expert_linears(name, module):
            widths.setdefault(e.projection, e.in_features)
        return [(f"{name}.{proj}", width) for proj, width in widths.items()]
    if hasattr(module, "in_features"):
        return [(name, module.in_features)]
    return []


def to_modelopt_config(plan: Plan, recipe: Recipe) -> dict:
    """Translate a plan into a modelopt ``mtq.quantize`` config (names relative to the quant root).

    The weight quantizer of a module whose algorithm refines its format is configured as
    that algorithm needs (static NVFP4 block scales, Four-Over-Six); every other module
    gets its format's config unchanged, so ``max`` gives today's config exactly.
    """
    prefix = plan.quant_root + "."
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, fmt in sorted(plan.quantized().items()):
        rel = name[len(prefix):]
        cfg = _FORMAT_CFG[fmt]
        wcfg = _weight_cfg(plan, name, fmt, cfg)
        if name in plan.expert_projections:
            for proj in plan.expert_projections[name]:
                entries.append({"quantizer_name": f"{rel}.{proj}_weight_quantizers.*", "cfg": wcfg})
                entries.append({"quantizer_name": f"{rel}.{proj}_input_quantizer", "cfg": cfg})
        else:
            entries.append({"quantizer_name": f"{rel}.weight_quantizer", "cfg": wcfg})
            entries.append({"quantizer_name": f"{rel}.input_quantizer", "cfg": cfg})
    for attn in plan.kv_modules:
        rel = attn[len(prefix):]
        for q in ("k_bmm_quantizer", "v_bmm_quantizer"):
            entries.append({"quantizer_name": f"{rel}.{q}", "cfg": FP8_CFG})
    algorithm = plan.algorithms.modelopt if plan.algorithms is not None else "max"
    return {"quant_cfg": entries, "algorithm": algorithm}


def _weight_cfg(plan: Plan, name: str, fmt: str, cfg: dict) -> dict:
    """The weight quantizer config of ``name``: its format's, adapted to its algorithm."""
    algo = get_algorithm(plan.module_algorithm(name))
    refined = plan.algorithms.refined_formats if plan.algorithms is not None else set()
    if fmt != "nvfp4" or fmt not in refined or not algo.static_nvfp4_weights:
        return cfg
    block_sizes = {**cfg["block_sizes"], "type": "static"}
    if algo.four_over_six:
        block_sizes["four_over_six"] = True
    return {**cfg, "block_sizes": block_sizes}


def render_plan(plan: Plan) -> str:
    """A plain-text table: group, modules per format."""
    counts = plan.counts()
    fmts = NARROWEST_FIRST
    lines = [f"{'group':<18}" + "".join(f"{f:>8}" for f in fmts)]
    for group, c in counts.items():
        lines.append(f"{group:<18}" + "".join(f"{c.get(f, 0):>8}" for f in fmts))
    lines.append(f"kv cache: {plan.kv_cache}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)

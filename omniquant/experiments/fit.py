"""``omniquant fit``: the least-damage mixed-precision recipe whose export fits a budget.

Policy:
- Units are the quantizable module groups of the model (``granularity="group"``) or
  each backbone layer's share of them (``"layer"``). Encoders and projectors are never
  units: the plan refuses fp8/nvfp4 for them outright (``QUANTIZABLE_GROUPS``), so the
  towers' scope guard holds for every fitted recipe.
- Cost: for each unit and format, the recipe with that unit alone in that format is
  resolved (``resolve_plan``: its refusals, such as an NVFP4 width that does not divide
  the block, make the option illegal, with the reason kept) and its export size
  predicted by ``omniquant.quantize.predict`` (the arithmetic ``plan`` prints). The
  size of an export is a sum over weights, so a layout's bytes are the all-BF16 bytes
  plus the units' deltas; the chosen recipe is predicted again as a whole and must
  agree to the byte.
- Damage: each unit quantized alone, KL of the final logits against BF16 on the first
  ``samples`` calibration samples, with the serving numerics
  (``omniquant.evaluate.emulated``, ``omniquant.evaluate.logit_kl``). Rather than one
  calibration per unit, the model is calibrated once per format with every legal unit
  in it (modelopt's ``max`` calibration collects each quantizer's statistics with
  quantization disabled, so a module's scales do not depend on which other modules are
  quantized; ``tests/test_fit.py`` checks a fitted export against the composition byte
  for byte), and each probe swaps that unit's exported weights into one resident BF16
  model (``omniquant.experiments.fit_compose``). The FP8 KV cache, when asked for, is one more probe whose
  KL is added to every prediction.
- Interaction check: the additive model (predicted KL = sum of the units' KL) is an
  assumption, and on the demo model it misranked layouts (a layout with more bytes
  measured worse than a cheaper one). So the ``candidates`` best layouts by summed KL
  (an exact integer program solved by CBC through pulp, ``omniquant.experiments.fit_solve``,
  with no-good cuts for the runners-up) are each composed whole and scored on the same
  samples, and the least measured one is written; the sum, the chosen layout's measured
  KL and every candidate's go into the recipe's header and ``FitResult``.
- Calibration algorithm as a second dimension (``algorithms``, registry names of
  ``omniquant.quantize.algorithms``; default ``max,mse``): algorithms never change the
  layout, so the bytes of a layout are the same under each. Per algorithm A, each
  format A refines is calibrated once with A (every legal unit in it), each unit is
  scored in the formats A refines (others reuse max's score: A leaves them at max), the
  integer program is solved per A, and the ``candidates`` best layouts of every A,
  each composed under every algorithm (a layout one program ranks low can be the best
  under another), go through the same whole-layout check; the least measured (layout,
  algorithm) is written, with ``quantization.algorithm: A``. modelopt runs one algorithm per model, so
  a recipe has one algorithm; which of its formats A really refines in a mixed layout is
  the registry's ``effective_formats`` (mse with NVFP4 rules leaves FP8 at max), and the
  composition takes those formats from A's export and the rest from max's. Where an
  algorithm's result depends on more than one module's weights (gptq and local_hessian
  use each module's input Hessian, which upstream quantization changes; four_over_six's
  search also runs over FP8 weights in a mixed recipe) the composition is an
  approximation of the export; for max and mse (per-weight, per-block searches) it is
  the export. The default ``max,mse`` is the cheap, composable pair: mse was the
  best-measured weight error of #21's algorithms on NVFP4 and costs one weight search
  per GEMM; ``--algorithms all`` tries every non-refused one.
- The composition (``omniquant.experiments.fit_compose``) keeps one emulated BF16 model
  resident and swaps each probe's units in place, reading exported and original weights
  from disk: peak host memory is the BF16 model plus a few copies of the largest weight.
  ``host_memory_needed`` states it, and ``measure`` refuses before any calibration when
  it exceeds the host's available memory (``MemAvailable`` of ``/proc/meminfo``; not
  checked where that is absent). It runs on the CPU emulation; a GPU-resident model is
  the same code with the model on the GPU (not tried here).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.errors import PlanError, RecipeError, arg_ref
from omniquant.experiments.fit_compose import Composer, calibrated_formats, layout_algorithm
from omniquant.experiments.fit_solve import Option, smallest, solve_best
from omniquant.formats import FORMATS

GRANULARITIES = ("group", "layer")
DEFAULT_FORMATS = ("bf16", "fp8", "nvfp4")
#: Calibration algorithms tried by default (see the module docstring for why these two).
DEFAULT_ALGORITHMS = ("max", "mse")
#: Calibration samples each probe is scored on.
DEFAULT_SAMPLES = 8
#: Layouts (the best by summed KL) composed whole and scored; the least measured one wins.
DEFAULT_CANDIDATES = 5
#: Calibration samples of the per-format calibrations and of the fitted recipe (the
#: built-in recipes' size).
DEFAULT_CALIB_SIZE = 16
KV_CACHE_CHOICES = ("fp8", "bf16")


def parse_budget(text: str | int, arg: str = "budget") -> int:
    """``24GiB`` / a byte count -> bytes (``omniquant.quantize.serving_memory.parse_size_arg``).

    Raises:
        PlanError: naming the argument and listing the accepted units.
    """
    from omniquant.quantize.serving_memory import parse_size_arg

    return parse_size_arg(text, arg)


@dataclass(frozen=True)
class Unit:
    """What ``fit`` sets one format for: a module group, or one layer's part of it."""

    name: str
    group: str
    modules: tuple[str, ...]
    whole_group: bool

    def rules(self, fmt: str) -> list[dict]:
        """Recipe rules that put this unit in ``fmt``."""
        if self.whole_group:
            return [{"group": self.group, "format": fmt}]
        return [{"modules": m, "format": fmt} for m in self.modules]


def fit_units(loaded, granularity: str) -> list[Unit]:
    """The units of ``loaded`` (a meta or real model) in module order."""
    from omniquant.quantize.plan import QUANTIZABLE_GROUPS

    if granularity not in GRANULARITIES:
        raise PlanError(
            f"unknown granularity; use one of {', '.join(GRANULARITIES)}.",
            arg="granularity",
            value=repr(granularity),
        )
    groups = loaded.adapter.module_groups(loaded.model)
    units: list[Unit] = []
    for group, names in groups.items():
        if group not in QUANTIZABLE_GROUPS or not names:
            continue
        if granularity == "group":
            units.append(Unit(group, group, tuple(names), True))
            continue
        by_layer: dict[int, list[str]] = {}
        for name in names:
            idx = loaded.adapter.layer_index(name)
            if idx is None:  # pragma: no cover - every quantizable module sits in a layer
                raise PlanError(f"module {name} of group {group} is in no backbone layer")
            by_layer.setdefault(idx, []).append(name)
        for idx, mods in sorted(by_layer.items()):
            units.append(Unit(f"layers.{idx}.{group}", group, tuple(mods), False))
    if not units:
        raise PlanError(
            "the model has no quantizable module group; nothing to fit.", arg="model",
            value=loaded.path,
        )  # fmt: skip
    return units


def recipe_dict(
    assignment: dict[Unit, str],
    *,
    name: str,
    description: str,
    calib: str,
    calib_size: int,
    kv_cache: str,
    coverage: str = "error",
    algorithm: str = "max",
) -> dict:
    """A recipe (as a dict ``Recipe`` validates) setting each unit to its format; units
    left out, and units set to bf16, stay BF16."""
    rules = [r for unit, fmt in assignment.items() if fmt != "bf16" for r in unit.rules(fmt)]
    if not rules:  # a recipe needs one rule; this one changes nothing
        unit = next(iter(assignment))
        rules = unit.rules("bf16")[:1]
    return {
        "metadata": {"name": name, "description": description},
        "calibration": {"set": calib, "size": calib_size, "expert_coverage": {"policy": coverage}},
        "quantization": {
            "kv_cache": "fp8" if kv_cache == "fp8" else "none",
            "algorithm": algorithm,
            "rules": rules,
        },
    }


@dataclass
class UnitCosts:
    """Exact export bytes per unit and format (deltas to the all-BF16 export)."""

    bf16_bytes: int
    delta: dict[tuple[str, str], int]
    illegal: dict[tuple[str, str], str]
    #: (unit, format) -> hub modules whose tensors the export replaces.
    hub_modules: dict[tuple[str, str], list[str]]


def unit_costs(loaded, units: list[Unit], formats: list[str], kv_cache: str) -> UnitCosts:
    """Price every (unit, format) with the plan's own resolution and size arithmetic."""
    from omniquant.quantize.plan import resolve_plan
    from omniquant.quantize.predict import predict_size, quantized_weights
    from omniquant.quantize.recipe import Recipe

    def recipe(assign: dict[Unit, str]) -> Recipe:
        return Recipe.model_validate(recipe_dict(
            assign, name="fit_probe", description="", calib="synthetic", calib_size=1,
            kv_cache=kv_cache,
        ))  # fmt: skip

    base = predict_size(loaded, resolve_plan(recipe({units[0]: "bf16"}), loaded)).predicted_bytes
    delta: dict[tuple[str, str], int] = {}
    illegal: dict[tuple[str, str], str] = {}
    hubs: dict[tuple[str, str], list[str]] = {}
    for unit in units:
        for fmt in formats:
            if fmt == "bf16":
                delta[(unit.name, fmt)] = 0
                continue
            try:
                plan = resolve_plan(recipe({unit: fmt}), loaded)
            except (PlanError, RecipeError) as err:
                illegal[(unit.name, fmt)] = " ".join(str(err).split("\n")[:2])
                continue
            delta[(unit.name, fmt)] = predict_size(loaded, plan).predicted_bytes - base
            hubs[(unit.name, fmt)] = [q.module for q in quantized_weights(loaded, plan)]
    return UnitCosts(base, delta, illegal, hubs)


@dataclass
class FitResult:
    """What ``fit`` found; ``recipe_yaml`` is None when BF16 fits the budget."""

    model: str
    budget_bytes: int
    budget_text: str
    granularity: str
    formats: list[str]
    kv_cache: str
    bf16_bytes: int
    smallest_bytes: int
    bf16_fits: bool
    #: Calibration algorithms tried (max first).
    algorithms: list[str] = field(default_factory=lambda: ["max"])
    predicted_bytes: int | None = None
    #: The written recipe's calibration algorithm (the winner of the interaction check).
    algorithm: str | None = None
    predicted_kl: float | None = None
    composed_kl: float | None = None
    kv_kl: float | None = None
    units: list[dict] = field(default_factory=list)
    illegal: list[dict] = field(default_factory=list)
    recipe: dict | None = None
    recipe_yaml: str | None = None
    calibration: dict = field(default_factory=dict)
    serving: dict | None = None
    #: The best layouts by summed KL, each composed whole and scored (the interaction check).
    alternatives: list[dict] = field(default_factory=list)
    #: Rank by summed KL of the layout chosen (1: the integer program's optimum).
    chosen_rank: int | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "recipe_yaml"}
        out["budget_gib"] = round(self.budget_bytes / 2**30, 3)
        return out


@dataclass
class FitSession:
    """Units, their exact costs and (once ``measure`` ran) their damage, for one model:
    ``fit_budget`` answers any number of budgets from one measurement."""

    model_dir: Path
    meta: object
    units: list[Unit]
    costs: UnitCosts
    #: Algorithm -> unit -> its options (the same bytes under every algorithm; the damage
    #: measured with that algorithm's calibration).
    options_by_algorithm: dict[str, dict[str, list[Option]]]
    formats: list[str]
    granularity: str
    kv_cache: str
    calib: str
    calib_size: int
    samples: int
    composer: Composer | None = None
    #: Scratch directory of the per-(algorithm, format) exports (a TemporaryDirectory).
    scratch: object | None = None
    kv_kl: float | None = None
    calibration: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def algorithms(self) -> list[str]:
        return list(self.options_by_algorithm)

    @property
    def options(self) -> dict[str, list[Option]]:
        """The units' options under ``max``."""
        return self.options_by_algorithm["max"]

    @property
    def smallest_bytes(self) -> int:
        return self.costs.bf16_bytes + smallest(self.options)

    def measure(self, log: Callable[[str], None] | None = None) -> None:
        """Calibrate once per format, then score each unit alone (fills the options' damage)."""
        if self.composer is not None:
            return
        if not any(self.model_dir.glob("*.safetensors")):
            raise PlanError(
                "holds no weights (config.json only): fit measures each unit's KL from the "
                "weights; `omniquant plan` prices layouts from the config alone.",
                arg="model",
                value=self.model_dir,
            )
        need = host_memory_needed(self)
        avail = _available_host_bytes()
        if avail is not None and need["total"] > avail:
            terms = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in need.items() if k != "total")
            raise PlanError(
                f"fit's in-place composition needs about {need['total'] / 2**30:.2f} GiB of "
                f"host memory ({terms}) and {avail / 2**30:.2f} GiB is available; run on a "
                "host with more memory.",
                arg="model",
                value=self.model_dir,
            )
        _measure(self, log or (lambda _m: None))


def host_memory_needed(s: FitSession) -> dict[str, int]:
    """Host bytes fit's in-place composition holds (``omniquant.experiments.fit_compose``):
    the resident BF16 model, and in flight while one weight is swapped or restored, about
    three copies of the largest quantizable weight (the stored one read, its dequantized
    copy, the source weight read back). The exports stay on disk."""
    modules = dict(s.meta.model.named_modules())
    adapter, largest = s.meta.adapter, 0
    for hubs in s.costs.hub_modules.values():
        for hub in hubs:
            native, expert = adapter.native_module(hub)
            mod = modules[native]
            param = mod.weight if expert is None else getattr(mod, expert[0])[expert[1]]
            largest = max(largest, param.numel() * 2)
    terms = {"bf16_model": s.costs.bf16_bytes, "weight_swap": 3 * largest}
    terms["total"] = sum(terms.values())
    return terms


def _available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def prepare_fit(
    model: str | Path,
    *,
    calib: str | None = None,
    granularity: str = "group",
    formats: tuple[str, ...] | list[str] | str = DEFAULT_FORMATS,
    samples: int = DEFAULT_SAMPLES,
    calib_size: int = DEFAULT_CALIB_SIZE,
    kv_cache: str = "fp8",
    algorithms: tuple[str, ...] | list[str] | str = DEFAULT_ALGORITHMS,
) -> FitSession:
    """Units and their exact byte costs (from ``config.json`` and the shards' headers;
    nothing is calibrated yet). Arguments as ``fit``'s."""
    from omniquant.models import load_model

    t0 = time.perf_counter()
    fmts = _check_formats(formats)
    algos = _check_algorithms(algorithms)
    if kv_cache not in KV_CACHE_CHOICES:
        raise PlanError(f"use one of {', '.join(KV_CACHE_CHOICES)}.", arg="kv_cache",
                        value=repr(kv_cache))  # fmt: skip
    if samples < 1:
        raise PlanError("must be at least 1.", arg="samples", value=samples)
    model_dir = Path(model)
    meta = load_model(model_dir, weights=False)
    units = fit_units(meta, granularity)
    costs = unit_costs(meta, units, fmts, kv_cache)
    options = {
        a: {u.name: [Option(f, costs.delta[(u.name, f)], 0.0) for f in fmts
                     if (u.name, f) in costs.delta] for u in units}
        for a in algos
    }  # fmt: skip
    return FitSession(
        model_dir=model_dir, meta=meta, units=units, costs=costs, options_by_algorithm=options,
        formats=fmts,
        granularity=granularity, kv_cache=kv_cache, calib=calib or _default_calib(model_dir),
        calib_size=calib_size, samples=samples,
        seconds={"plan": round(time.perf_counter() - t0, 2)},
    )  # fmt: skip


def fit(
    model: str | Path,
    budget: str | int | None = None,
    *,
    calib: str | None = None,
    granularity: str = "group",
    formats: tuple[str, ...] | list[str] | str = DEFAULT_FORMATS,
    samples: int = DEFAULT_SAMPLES,
    calib_size: int = DEFAULT_CALIB_SIZE,
    kv_cache: str = "fp8",
    serving=None,
    name: str | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    algorithms: tuple[str, ...] | list[str] | str = DEFAULT_ALGORITHMS,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit the least-damage recipe whose export fits ``budget``.

    Args:
        model: BF16 checkpoint directory (hub layout, weights present).
        budget: Exported tensor bytes allowed (``24GiB``, or an int); ignored when
            ``serving`` gives the budget.
        calib: Calibration set (default: the demo's set for the demo model, else omni-mix).
        granularity: ``group`` or ``layer``.
        formats: Formats a unit may take (bf16 always allowed).
        samples: Calibration samples each probe is scored on.
        calib_size: Calibration samples of the per-format calibrations and of the recipe.
        kv_cache: ``fp8`` (the recipe quantizes the KV cache) or ``bf16``.
        serving: A ``ServingMemory`` whose ``weights_budget`` is the budget.
        name: The recipe's name (default ``fit_<budget>``).
        candidates: How many of the best layouts by summed KL (per algorithm) are
            composed whole and scored; the one with the least measured KL is written (1:
            each integer program's optimum alone).
        algorithms: Calibration algorithms to try (registry names, comma-separated, or
            ``all``: every one not refused); max is always tried.
        log: Progress lines.

    Raises:
        PlanError: bad budget/formats, a budget below the smallest legal layout.
    """
    if serving is not None:
        budget_bytes, budget_text = serving.weights_budget, f"serving budget {serving.label()}"
    elif budget is None:
        raise PlanError(f"give {arg_ref('budget')} or a serving memory budget.", arg="budget",
                        value=None)  # fmt: skip
    else:
        budget_bytes, budget_text = parse_budget(budget), str(budget)
    session = prepare_fit(model, calib=calib, granularity=granularity, formats=formats,
                          samples=samples, calib_size=calib_size, kv_cache=kv_cache,
                          algorithms=algorithms)  # fmt: skip
    return fit_budget(session, budget_bytes, budget_text, serving=serving, name=name,
                      candidates=candidates, log=log)  # fmt: skip


def fit_budget(
    session: FitSession,
    budget_bytes: int,
    budget_text: str | None = None,
    *,
    serving=None,
    name: str | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """The least-damage layout of ``session``'s units within ``budget_bytes`` (measuring
    the units first if they are not yet): the ``candidates`` best layouts by summed KL are
    composed whole and scored on the same samples, and the least measured one is chosen.

    Raises:
        PlanError: the budget is below the smallest legal layout (naming its size).
    """
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    s, costs = session, session.costs
    budget_text = budget_text or f"{budget_bytes} bytes"
    low = s.smallest_bytes
    result = FitResult(
        model=str(s.model_dir), budget_bytes=budget_bytes, budget_text=budget_text,
        granularity=s.granularity, formats=s.formats, kv_cache=s.kv_cache,
        algorithms=s.algorithms, bf16_bytes=costs.bf16_bytes, smallest_bytes=low, bf16_fits=costs.bf16_bytes <= budget_bytes,
        illegal=[{"unit": u, "format": f, "reason": r} for (u, f), r in costs.illegal.items()],
        serving=serving.to_json() if serving is not None else None,
    )  # fmt: skip
    if result.bf16_fits:
        say(f"fit: BF16 ({costs.bf16_bytes:,} bytes) fits {budget_text}; nothing to quantize")
        return result
    if low > budget_bytes:
        beside = ""
        if serving is not None:
            beside = (
                " (what serving needs beside the weights: "
                + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in serving.terms.items())
                + ")"
            )
        raise PlanError(
            f"{_bytes(budget_bytes)} is below the smallest legal layout of this model, "
            f"{_bytes(low)} (every unit in its narrowest legal format of {', '.join(s.formats)}; "
            f"BF16 is {_bytes(costs.bf16_bytes)}){beside}; raise the budget or allow narrower "
            "formats.",
            arg="budget" if serving is None else "gpu_memory",
            value=budget_text,
        )
    if candidates < 1:
        raise PlanError("must be at least 1.", arg="candidates", value=candidates)
    s.measure(say)
    t = time.perf_counter()
    kv = s.kv_cache == "fp8"
    # The pool: every algorithm's best layouts by summed KL; each is then composed under
    # every algorithm (a layout one program ranks low may be the best under another).
    pool: dict[tuple, tuple[dict[str, str], dict[str, int]]] = {}
    for algo, opts in s.options_by_algorithm.items():
        room = budget_bytes - costs.bf16_bytes
        for rank, layout in enumerate(solve_best(opts, room, candidates), 1):
            formats = {u: o.format for u, o in layout.items()}
            pool.setdefault(tuple(sorted(formats.items())), (formats, {}))[1].setdefault(algo, rank)
    scored, seen = [], set()
    for key, (formats, ranks) in pool.items():
        for algo in s.options_by_algorithm:
            layout, real = _layout_options(s, formats, algo)
            if (real, key) in seen:  # the same layout, calibrated the same way, is scored once
                continue
            seen.add((real, key))
            composed = s.composer.kl(formats, kv_cache=kv, algorithm=real)
            rank = ranks.get(real)
            scored.append((composed, real, rank, layout))
            result.alternatives.append({
                "algorithm": real, "rank": rank, "layout": formats,
                "predicted_bytes": costs.bf16_bytes + sum(o.delta_bytes for o in layout.values()),
                "predicted_kl": sum(o.damage for o in layout.values()) + (s.kv_kl or 0.0),
                "composed_kl": composed,
            })  # fmt: skip
            say(f"fit: candidate {real} #{rank or '-'}: composed KL {composed:.4g}")
    composed, algo, rank, layout = min(scored, key=lambda c: c[0])
    result.chosen_rank, result.algorithm = rank, algo
    result.seconds["interaction_check"] = round(time.perf_counter() - t, 2)
    _finish(result, s, layout, composed, name, say)
    result.seconds = {**s.seconds, **result.seconds, "fit": round(time.perf_counter() - t0, 2)}
    return result


def _layout_options(s: FitSession, formats: dict[str, str], algorithm: str):
    """``(unit -> Option, algorithm the recipe really runs)`` for a layout calibrated with
    ``algorithm``: each unit's damage from the algorithm that calibrates its format in
    this recipe (the algorithm's own for the formats it refines here, max's for the rest)."""
    have = {f for a, f in s.composer.exported if a == algorithm}
    real, refined = layout_algorithm(algorithm, set(formats.values()) - {"bf16"}, have)
    by_algo = s.options_by_algorithm
    return {
        u: next(o for o in by_algo[real if f in refined else "max"][u] if o.format == f)
        for u, f in formats.items()
    }, real


def _calibrate_all(s: FitSession, tmp: Path, say) -> dict[tuple[str, str], Path]:
    """One export per (algorithm, format it refines) with every legal unit in the format;
    max exports every format. An algorithm whose calibration is refused (for example
    gptq under its token minimum) is dropped with a warning."""
    from omniquant.errors import OmniquantError
    from omniquant.quantize.pipeline import quantize
    from omniquant.quantize.recipe import Recipe

    exports: dict[tuple[str, str], Path] = {}
    for algo in list(s.algorithms):
        for fmt in [f for f in s.formats if f != "bf16"]:
            if fmt not in calibrated_formats(algo, s.formats):
                continue  # algo leaves fmt at max: max's export stands for it
            legal = {u: fmt for u in s.units if (u.name, fmt) in s.costs.delta}
            if not legal:
                continue
            out = tmp / f"{algo}-{fmt}"
            try:
                rec = Recipe.model_validate(recipe_dict(
                    legal, name=f"fit_all_{fmt}_{algo}", description=f"every legal unit in {fmt}",
                    calib=s.calib, calib_size=s.calib_size, kv_cache=s.kv_cache, coverage="warn",
                    algorithm=algo,
                ))  # fmt: skip
                say(f"fit: calibrating every legal unit in {fmt} with {algo} ({len(legal)} units)")
                with contextlib.redirect_stdout(io.StringIO()):
                    res = quantize(s.model_dir, rec, out, force=True, quiet=True)
            except (OmniquantError, ValueError) as err:
                if algo == "max":
                    raise
                s.warnings.append(f"algorithm {algo} dropped: {' '.join(str(err).split())}")
                say(f"fit: {s.warnings[-1]}")
                s.options_by_algorithm.pop(algo, None)
                exports = {k: v for k, v in exports.items() if k[0] != algo}
                break
            s.warnings += [f"{fmt} {algo} calibration: {w}" for w in res.warnings]
            exports[(algo, fmt)] = out
    return exports


def _measure(s: FitSession, say) -> None:
    """Calibrate once per (algorithm, format), then score each unit alone."""
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.logit_kl import sample_logprobs
    from omniquant.quantize.pipeline import load_calibration_samples

    t = time.perf_counter()
    # The exports stay on disk for the session's life (the composer reads a probe's
    # tensors from them); the directory goes with the session.
    s.scratch = tempfile.TemporaryDirectory(prefix=".omniquant-fit-")
    exports = _calibrate_all(s, Path(s.scratch.name), say)
    s.seconds["calibrate"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    base = load_emulated(s.model_dir)
    batch, _skipped = load_calibration_samples(base, s.calib, s.samples, seed=0)
    reference = sample_logprobs(base, batch)
    del base
    gc.collect()
    composer = Composer(s.model_dir, exports, s.costs.hub_modules, batch, reference)
    s.calibration = {"set": s.calib, "size": s.calib_size, "scored_samples": len(batch)}
    for algo, options in s.options_by_algorithm.items():
        for unit in s.units:
            for i, opt in enumerate(options[unit.name]):
                if opt.format == "bf16":
                    continue
                if algo != "max" and (algo, opt.format) not in composer.exported:
                    # algo leaves this format at max: the same bytes, the same score
                    options[unit.name][i] = s.options[unit.name][i]
                    continue
                kl = composer.kl({unit.name: opt.format}, kv_cache=False, algorithm=algo)
                options[unit.name][i] = Option(opt.format, opt.delta_bytes, kl)
                say(f"fit: {unit.name} -> {opt.format} ({algo}): KL {kl:.3g}, "
                    f"{opt.delta_bytes:+,} bytes")  # fmt: skip
    if s.kv_cache == "fp8" and composer.exported:
        s.kv_kl = composer.kl({}, kv_cache=True)
    s.composer = composer
    s.seconds["score"] = round(time.perf_counter() - t, 2)


def _finish(result: FitResult, s: FitSession, chosen: dict, composed: float, name, say) -> None:
    """Predict the chosen layout as a whole, run the interaction check, write the recipe."""
    from omniquant.quantize.plan import resolve_plan
    from omniquant.quantize.predict import predict_size
    from omniquant.quantize.recipe import Recipe

    by_name = {u.name: u for u in s.units}
    result.kv_kl, result.calibration = s.kv_kl, dict(s.calibration)
    result.warnings = list(s.warnings)
    result.algorithms = s.algorithms  # without any dropped while calibrating
    assignment = {by_name[u]: o.format for u, o in chosen.items()}
    additive = sum(o.damage for o in chosen.values()) + (result.kv_kl or 0.0)
    predicted = s.costs.bf16_bytes + sum(o.delta_bytes for o in chosen.values())
    result.composed_kl = composed
    result.predicted_kl, result.predicted_bytes = additive, predicted
    result.units = [
        {"unit": u, "group": by_name[u].group, "format": o.format, "delta_bytes": o.delta_bytes,
         "kl": o.damage}
        for u, o in chosen.items()
    ]  # fmt: skip
    name = name or "fit_" + re.sub(r"[^0-9a-zA-Z]+", "_", result.budget_text).strip("_").lower()
    desc = (
        f"fitted to {result.budget_text} ({predicted:,} bytes predicted): least summed KL "
        f"over {', '.join(result.formats)} per {result.granularity}, calibrated with "
        f"{result.algorithm}"
    )
    rec = recipe_dict(assignment, name=name, description=desc, calib=s.calib,
                      calib_size=s.calib_size, kv_cache=result.kv_cache,
                      algorithm=result.algorithm)  # fmt: skip
    check = predict_size(s.meta, resolve_plan(Recipe.model_validate(rec), s.meta)).predicted_bytes
    if check != predicted:  # pragma: no cover - the size arithmetic is additive by construction
        raise RuntimeError(f"internal: fitted layout predicts {check} bytes, units sum {predicted}")
    result.recipe = rec
    result.recipe_yaml = render_recipe(result, by_name)
    say(f"fit: {predicted:,} bytes, {result.algorithm}, predicted KL {additive:.4g}, composed "
        f"{result.composed_kl:.4g}")  # fmt: skip


def render_recipe(result: FitResult, units: dict[str, Unit]) -> str:
    """The fitted recipe as YAML with a header carrying the prediction."""
    r = result
    ratio = r.composed_kl / r.predicted_kl if r.predicted_kl else float("nan")
    lines = [
        (
            f"# {r.recipe['metadata']['name']}: fitted by `omniquant fit` to {r.budget_text} "
            f"({r.budget_bytes:,} bytes)."
        ),
        (
            f"# model: {r.model}; units: module {r.granularity}s; formats: {', '.join(r.formats)}; "
            f"KV cache: {r.kv_cache}."
        ),
        (
            f"# predicted bytes: {_bytes(r.predicted_bytes)} of tensor data, "
            "the arithmetic of `omniquant plan`;"
        ),
        f"#   BF16 is {r.bf16_bytes:,}, the smallest legal layout {r.smallest_bytes:,}.",
        f"# predicted KL: {r.predicted_kl:.6g} nats (sum of each unit's KL measured alone"
        + (f", FP8 KV cache {r.kv_kl:.3g}" if r.kv_kl is not None else "")
        + "),",
        (
            f"#   on {r.calibration['scored_samples']} samples of {r.calibration['set']}, final "
            "logits, serving numerics."
        ),
        (
            f"# measured KL (interaction check): the whole layout composed and scored on the "
            "same samples: "
            f"{r.composed_kl:.6g} ({ratio:.2f}x the additive prediction)."
        ),
        (
            f"# calibration algorithm: {r.algorithm} (tried: {', '.join(r.algorithms)}; the "
            "bytes are the same under each)."
        ),
        (
            f"#   chosen as the least measured of {len(r.alternatives)} (layout, algorithm) pairs: "
            "each algorithm's best layouts by summed KL, each under every algorithm (it ranks "
            + (
                f"{r.chosen_rank} by the sum under {r.algorithm}"
                if r.chosen_rank
                else f"outside {r.algorithm}'s best by the sum"
            )
            + "): "
            + "; ".join(
                f"{a['algorithm']} #{a['rank'] or '-'} {a['composed_kl']:.3g}"
                for a in r.alternatives
            )
            + "."
        ),
        "# Units kept in BF16: "
        + (", ".join(u["unit"] for u in r.units if u["format"] == "bf16") or "none")
        + ".",
        "# Encoders and projectors stay BF16 (the plan refuses fp8/nvfp4 for them).",
    ]
    rec = r.recipe
    q = rec["quantization"]
    body = [
        "metadata:",
        f"  name: {rec['metadata']['name']}",
        f"  description: {json.dumps(rec['metadata']['description'])}",
        "calibration:",
        f"  set: {json.dumps(rec['calibration']['set'])}",
        f"  size: {rec['calibration']['size']}",
        "quantization:",
        f"  kv_cache: {q['kv_cache']}",
        f"  algorithm: {q['algorithm']}",
        "  rules:",
    ]
    for u in r.units:
        if u["format"] == "bf16":
            continue
        note = f"  # {u['unit']}: KL {u['kl']:.3g} alone, {u['delta_bytes']:+,} bytes"
        for i, rule in enumerate(units[u["unit"]].rules(u["format"])):
            sel = (f"group: {rule['group']}" if "group" in rule
                   else f"modules: {json.dumps(rule['modules'])}")  # fmt: skip
            body.append(f"    - {{{sel}, format: {rule['format']}}}" + (note if i == 0 else ""))
    if not any(u["format"] != "bf16" for u in r.units):
        body.append(f"    - {{group: {r.units[0]['group']}, format: bf16}}")
    return "\n".join(lines + body) + "\n"


def write_recipe(result: FitResult, out: str | Path, force: bool = False) -> Path:
    """Write the fitted recipe to ``out`` (a .yaml file), atomically.

    Raises:
        RecipeError: nothing to write (BF16 fits), or ``out`` exists without ``force``.
    """
    if result.recipe_yaml is None:
        raise RecipeError("BF16 fits the budget; there is no recipe to write.", arg="out",
                          value=out)  # fmt: skip
    out = Path(out)
    if out.exists() and not force:
        raise RecipeError(f"exists; pass {arg_ref('force')} to replace it.", arg="out", value=out)
    if out.is_dir():
        raise RecipeError("is a directory; give a .yaml file path.", arg="out", value=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(result.recipe_yaml, encoding="utf-8")
    tmp.replace(out)
    return out


def _check_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise PlanError(
            f"unknown format(s) {', '.join(bad) or '(none given)'}; the formats are "
            f"{', '.join(FORMATS)}, comma-separated.",
            arg="formats",
            value=",".join(formats),
        )
    out = list(dict.fromkeys(["bf16", *formats]))
    if len(out) == 1:
        raise PlanError("gives no quantized format; add fp8 or nvfp4.", arg="formats",
                        value=",".join(formats))  # fmt: skip
    return out


def _check_algorithms(algorithms) -> list[str]:
    """Registry names (or ``all``) -> the algorithms to try, max first."""
    from omniquant.quantize.algorithms import ALGORITHMS

    if isinstance(algorithms, str):
        algorithms = [a.strip() for a in algorithms.split(",") if a.strip()]
    if list(algorithms) == ["all"]:
        algorithms = [a.name for a in ALGORITHMS.values() if not a.refused]
    usable = [a.name for a in ALGORITHMS.values() if not a.refused]
    bad = [a for a in algorithms if a not in ALGORITHMS]
    refused = [a for a in algorithms if a in ALGORITHMS and ALGORITHMS[a].refused]
    if bad or refused:
        why = "; ".join(f"{a} is refused: {ALGORITHMS[a].refused}" for a in refused)
        raise PlanError(
            (f"unknown algorithm(s) {', '.join(bad)}; " if bad else f"{why}; ")
            + f"use {', '.join(usable)} (comma-separated) or all.",
            arg="algorithms",
            value=",".join(algorithms),
        )
    return list(dict.fromkeys(["max", *algorithms]))


def _default_calib(model_dir: Path) -> str:
    from omniquant.demo import DEMO_CALIB, demo_model_dir

    try:
        is_demo = model_dir.resolve() == Path(demo_model_dir()).resolve()
    except OSError:
        is_demo = False
    return DEMO_CALIB if is_demo else "omni-mix"


def _bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n:,} bytes ({n / 2**30:.2f} GiB)"
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"

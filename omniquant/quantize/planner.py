"""The plan stage: what a recipe will do to a model, answered from its config alone.

Policy:
- The model is built on the meta device from ``config.json`` (``load_model(...,
  weights=False)``): no weight is read, so a directory holding only the released
  model's ``config.json`` is planned in seconds, before a 61.5 GiB download.
- The per-module plan is ``omniquant.quantize.plan.resolve_plan``, the very function the
  quantize stage calls, so what ``plan`` prints is what ``quantize`` does; its
  refusals (rules matching nothing, NVFP4 widths not divisible by the block) are
  raised here the same way.
- Size comes from ``omniquant.quantize.predict`` (exact tensor bytes of the export) and
  calibration memory from ``omniquant.quantize.memory`` (stated arithmetic per device).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

#: Default backbone tokens of the longest calibration sample for the memory estimate.
DEFAULT_TOKENS = 4096


@dataclass
class PlanReport:
    """The answer of ``plan_model``."""

    model: Path
    recipe_name: str
    recipe_path: Path
    config_only: bool
    plan: object
    size: object
    memory: object
    seconds: float
    #: ``ServingMemory`` when a context was given (``omniquant.quantize.serving_memory``).
    serving: object = None

    def to_json(self) -> dict:
        return {
            "model": str(self.model),
            "recipe": {"name": self.recipe_name, "path": str(self.recipe_path)},
            "config_only": self.config_only,
            "groups": self.plan.counts(),
            "group_precision": self.plan.group_precision(),
            "kv_cache": self.plan.kv_cache,
            "layers_by_format": dict(self.size.layers_by_format),
            "predicted_bytes": self.size.predicted_bytes,
            "size": self.size.to_json(),
            "memory": self.memory.to_json(),
            "serving": self.serving.to_json() if self.serving is not None else None,
            "seconds": round(self.seconds, 2),
        }

    def render(self) -> str:
        from omniquant.quantize.memory import gib
        from omniquant.quantize.plan import render_plan

        s, m = self.size, self.memory
        origin = "config.json only (meta device)" if self.config_only else "checkpoint headers"
        lines = [
            f"plan: {self.recipe_name} on {self.model} ({origin}; no weights read)",
            render_plan(self.plan),
            "",
            "linear layers by format (fused experts counted per expert and projection):",
            "  " + ", ".join(f"{f} {n:,}" for f, n in s.layers_by_format.items()),
            _block_line(s),
            "",
            (
                f"predicted checkpoint: {s.predicted_bytes:,} bytes = {gib(s.predicted_bytes)} "
                f"({s.bits_per_weight:.3f} bits per weight over {s.source_params:,} stored "
                f"elements; source {gib(s.source_bytes)})"
            ),
            *[f"  {line}" for line in s.arithmetic],
            "",
            (
                f"calibration memory (T = {m.tokens} tokens, force_all_experts "
                f"{'on' if m.force_all_experts else 'off'}):"
            ),
            *[f"  {line}" for line in m.arithmetic],
        ]
        if m.fits is not None:
            lines.append(f"  fits: {'yes' if m.fits else 'NO'}")
        if self.serving is not None:
            lines += ["", "serving memory (by arithmetic, vLLM's layout):"]
            lines += [f"  {line}" for line in self.serving.arithmetic]
        lines.append(f"planned in {self.seconds:.1f} s")
        return "\n".join(lines)


def _block_line(size) -> str:
    widths = size.nvfp4_input_widths
    if not widths:
        return "nvfp4 block-size check: no NVFP4 weight"
    from omniquant.formats import FORMATS

    block = FORMATS["nvfp4"].block_size
    return (
        f"nvfp4 block-size check: input widths {', '.join(map(str, widths))} all divide "
        f"the block {block}; nothing refused"
    )


def plan_model(
    model: str | Path,
    recipe: str | Path,
    *,
    overrides: list[str] | None = None,
    device: str | None = None,
    max_memory: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    context: int | None = None,
    batch: int = 1,
    gpu_memory: str | int | None = None,
    kv_cache: str | None = None,
) -> PlanReport:
    """Plan ``recipe`` on ``model`` without reading any weight.

    Args:
        model: A checkpoint directory, or a directory holding only ``config.json``.
        recipe: Built-in recipe name or YAML path.
        overrides: ``key.path=value`` recipe overrides.
        device: ``--device`` string for the memory estimate (``cpu``, ``cuda:0``...);
            None: ``cpu``, or the devices ``max_memory`` names.
        max_memory: ``--max-memory`` string (``0=120GiB,1=120GiB,cpu=200GiB``) or None.
        tokens: Backbone tokens of the longest calibration sample.
        context: Tokens per served sequence; with it, the serving memory beside the
            weights is printed term by term (``omniquant.quantize.serving_memory``).
        batch: Sequences served at once.
        gpu_memory: GPU size (``80GiB``); with it, whether the export fits beside them.
        kv_cache: ``fp8`` or ``bf16`` (default: the recipe's KV cache).

    Raises:
        RecipeError, PlanError, ModelLoadError: the recipe cannot be applied to the
            model (naming the rules and modules), before any weight is read.
    """
    from omniquant.models import load_model
    from omniquant.quantize.memory import estimate_calibration_memory
    from omniquant.quantize.plan import resolve_plan
    from omniquant.quantize.predict import predict_size
    from omniquant.quantize.recipe import load_recipe

    t0 = time.perf_counter()
    rec, recipe_path = load_recipe(recipe, overrides)
    loaded = load_model(model, weights=False)
    plan = resolve_plan(rec, loaded)
    size = predict_size(loaded, plan)
    adapter = loaded.adapter
    memory = estimate_calibration_memory(
        adapter.placement_units(loaded.model),
        adapter.calibration_shapes(loaded.model),
        tokens,
        force_all_experts=rec.calibration.expert_coverage.policy == "force_all_experts",
        device=device,
        max_memory=max_memory,
    )
    serving = None
    if context is not None or gpu_memory is not None:
        from omniquant.quantize.serving_memory import (
            DEFAULT_CONTEXT,
            parse_size_arg,
            serving_memory_for,
        )

        gpu = None if gpu_memory is None else parse_size_arg(gpu_memory, "gpu_memory")
        serving = serving_memory_for(
            loaded,
            context=DEFAULT_CONTEXT if context is None else context,
            batch=batch,
            kv_cache=kv_cache or ("fp8" if rec.quantization.kv_cache == "fp8" else "bf16"),
            gpu_memory=gpu,
            weights_bytes=size.predicted_bytes,
        )
    return PlanReport(
        model=Path(model),
        recipe_name=rec.metadata.name,
        recipe_path=recipe_path,
        config_only=size.source == "config",
        plan=plan,
        size=size,
        memory=memory,
        seconds=time.perf_counter() - t0,
        serving=serving,
    )

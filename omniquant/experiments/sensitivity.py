"""Per-group sensitivity: which module group makes the quality cliff.

Policy:
- From the BF16 baseline checkpoint, each quantizable module group present in the
  model (``omniquant.quantize.plan.QUANTIZABLE_GROUPS``) is quantized alone to the target
  format through the ordinary ``quantize`` stage (a generated one-rule ``Recipe``
  object, passed as an object: no recipe file is written; every other group BF16;
  no KV-cache quantization, so the group's own cost is measured),
  exported, reloaded with serving numerics and scored against the baseline's stored
  answer-span distributions. Fidelity only (no decoding): the ranking is by mean KL
  added over the task set; it costs one teacher-forced pass per sample and group.
- Calibration uses the given set (default ``synthetic``) with expert coverage
  ``warn``: a sensitivity probe reports starved experts instead of failing.
- One model in memory at a time; each probe checkpoint is deleted once scored.
- A group that cannot take the format (e.g. NVFP4 block divisibility) is listed as
  skipped with the reason, never silently dropped.
- The suggestion keeps the smallest set of top-ranked groups that carries at least
  half of the summed KL (at least one group, when any KL was measured) one step
  higher (NVFP4 -> FP8, FP8 -> BF16) and puts the rest in the target format. It is
  written as a recipe that ``load_recipe`` validates.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from omniquant.errors import OmniquantError
from omniquant.evaluate.metrics import mean_present
from omniquant.formats import NARROWEST_FIRST

#: Each quantized format -> the next wider one (the format a sensitive group is kept in),
#: from the format registry's order by element width.
HIGHER = dict(itertools.pairwise(NARROWEST_FIRST))
KL_SHARE = 0.5


def _probe_recipe(group: str, fmt: str, calib: str, size: int) -> dict:
    return {
        "metadata": {
            "name": f"sensitivity_{group}_{fmt}",
            "description": f"Sensitivity probe: only {group} in {fmt}; everything else BF16; no KV quantization.",
        },
        "calibration": {"set": calib, "size": size, "expert_coverage": {"policy": "warn"}},
        "quantization": {
            "kv_cache": "none",
            "algorithm": "max",
            "rules": [{"group": group, "format": fmt}],
        },
    }


def group_sensitivity(
    baseline: Path,
    items: list,
    reference: dict,
    groups: list[str],
    fmt: str,
    workdir: Path,
    *,
    calib: str = "synthetic",
    calib_size: int = 16,
    topk: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Quantize each group alone, score it against the baseline and rank the groups.

    Args:
        baseline: The BF16 baseline checkpoint directory.
        items: Processed task items.
        reference: The baseline's answer-span distributions by sample id.
        groups: Quantizable groups present in the model.
        fmt: Target format, ``nvfp4`` or ``fp8``.
        workdir: Scratch directory for the probe checkpoints.
        calib: Calibration set for the probes.
        calib_size: Calibration samples per probe.
        topk: Span distribution size (must match the reference's).
        log: Progress lines.

    Returns:
        ``{"format", "calibration", "groups": [...ranked...], "skipped": [...],
        "suggestion": {...}}``; each ranked group has ``group``, ``rank``, ``kl_mean``,
        ``top1_agreement``, ``kl_by_modality``, ``size_bytes``, ``bits_per_weight``,
        ``warnings``.
    """
    from omniquant.checkpoint.inspect import inspect_checkpoint
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.runner import evaluate_model
    from omniquant.quantize.pipeline import quantize
    from omniquant.quantize.recipe import Recipe

    say = log or (lambda _m: None)
    workdir.mkdir(parents=True, exist_ok=True)
    measured, skipped = [], []
    for group in groups:
        recipe = Recipe.model_validate(_probe_recipe(group, fmt, calib, calib_size))
        ckpt = workdir / f"probe_{group}"
        say(f"sensitivity: {group} -> {fmt}")
        try:
            # modelopt prints per-module notices on stdout; the report keeps stdout clean.
            with contextlib.redirect_stdout(io.StringIO()):
                result = quantize(baseline, recipe, ckpt, force=True, quiet=True)
        except OmniquantError as err:
            skipped.append({"group": group, "reason": str(err).splitlines()[0]})
            say(f"sensitivity: {group} skipped: {err}")
            continue
        summary = inspect_checkpoint(ckpt)
        loaded = load_emulated(ckpt)
        try:
            ev = evaluate_model(loaded, items, reference=reference, decode=False, topk=topk)
        finally:
            del loaded
            gc.collect()
        shutil.rmtree(ckpt, ignore_errors=True)
        by_modality = {}
        for modality in ("text", "image", "video", "audio"):
            kl = mean_present(s.kl for s in ev.samples if s.modality == modality)
            if kl is not None:
                by_modality[modality] = kl
        measured.append(
            {
                "group": group,
                "kl_mean": mean_present(s.kl for s in ev.samples),
                "top1_agreement": mean_present(s.top1 for s in ev.samples),
                "kl_by_modality": by_modality,
                "size_bytes": summary["total"]["bytes"],
                "bits_per_weight": summary["total"]["bits_per_weight"],
                "warnings": list(result.warnings),
            }
        )
    measured.sort(key=lambda g: (-(g["kl_mean"] or 0.0), g["group"]))
    for rank, g in enumerate(measured, start=1):
        g["rank"] = rank
    return {
        "format": fmt,
        "calibration": {"set": calib, "size": calib_size},
        "kv_cache": "none",
        "groups": measured,
        "skipped": skipped,
        "suggestion": suggest_recipe(measured, fmt, calib=calib),
    }


def suggest_recipe(ranked: list[dict], fmt: str, calib: str = "synthetic") -> dict:
    """A recipe keeping the groups that carry most of the KL one step higher.

    Args:
        ranked: Groups sorted by decreasing ``kl_mean``.
        fmt: The target format.
        calib: Calibration set written into the recipe.

    Returns:
        ``{"keep_higher", "higher_format", "text", "recipe" (dict), "recipe_yaml"}``;
        ``recipe`` and ``recipe_yaml`` are ``None`` when no group was probed.
    """
    higher = HIGHER[fmt]
    total = sum(g["kl_mean"] or 0.0 for g in ranked)
    keep: list[str] = []
    if total > 0:
        acc = 0.0
        for g in ranked:
            if acc >= KL_SHARE * total:
                break
            keep.append(g["group"])
            acc += g["kl_mean"] or 0.0
    if not ranked:
        return {
            "keep_higher": [],
            "higher_format": higher,
            "text": "No group could be probed.",
            "recipe": None,
            "recipe_yaml": None,
        }
    rules = [{"group": g["group"], "format": higher if g["group"] in keep else fmt} for g in ranked]
    name = f"{fmt}_sensitivity"
    recipe = {
        "metadata": {
            "name": name,
            "description": (
                f"{fmt} except {', '.join(keep)} in {higher} (they carried most of the KL)"
                if keep
                else f"every probed group in {fmt} (no group added measurable KL)"
            ),
        },
        "calibration": {"set": calib, "size": 16},
        "quantization": {"kv_cache": "fp8", "algorithm": "max", "rules": rules},
    }
    share = sum(g["kl_mean"] or 0.0 for g in ranked if g["group"] in keep)
    if keep:
        text = (
            f"Keep {', '.join(keep)} in {higher}: {'it carries' if len(keep) == 1 else 'they carry'} "
            f"{100 * share / total:.0f}% of the KL that {fmt} adds; quantize "
            f"{', '.join(g['group'] for g in ranked if g['group'] not in keep) or 'nothing else'} to {fmt}."
        )
    else:
        text = f"No group adds measurable KL in {fmt}; every probed group can take {fmt}."
    header = (
        f"# {name}: suggested by `omniquant report --sensitivity` from per-group KL on the task set.\n"
        f"# {text}\n"
        "# The probes ran without KV-cache quantization; FP8 KV is what serving engines use\n"
        "# with NVFP4 (vLLM requires it); re-run the report on the result to confirm.\n"
    )
    return {
        "keep_higher": keep,
        "higher_format": higher,
        "text": text,
        "recipe": recipe,
        "recipe_yaml": header + yaml.safe_dump(recipe, sort_keys=False),
    }

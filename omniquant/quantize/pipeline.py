"""The quantize stage: recipe + model + calibration data -> audited checkpoint directory.

Policy:
- Pre-flight first, in order of cost: recipe validation, output directory,
  calibration data validation, plan resolution on the meta device (from
  config.json, before any weight is read), model load, plan resolution on the
  loaded model. No calibration starts before all of them pass.
- ``omniquant.json`` records the plan's predicted tensor bytes beside the
  measured ones.
- The output is built in a temporary sibling directory and renamed into place
  only after the audit passes (``omniquant.outdir.staged_dir``); ``omniquant.json`` is
  written through ``omniquant.checkpoint.layout``. An interrupted or failed run removes it, and a run
  killed outright leaves only a ``.omniquant-tmp-*`` directory without
  ``omniquant.json``: every consumer refuses a temporary directory, the audit and the
  evaluating consumers refuse a quantized one without ``omniquant.json``, and plain
  ``inspect`` shows such a directory only under a one-line note that it is not a
  finished omniquant checkpoint and its checksums were not verified.
- Same inputs and seed give byte-identical shards, wherever the model lives:
  ``--device cpu``, ``auto`` and an offloading ``--max-memory`` give the same bytes on
  the CPU (tested); GPU placements use modelopt's CUDA kernels and are not pinned here.
- The model is placed by ``omniquant.devices`` (one device or accelerate's device map);
  ``omniquant.json`` records the placement, the Mamba kernels and the peak memory per
  device. A disk-offload folder lives beside ``--out`` and is removed at the end.
- One run at a time per ``--out`` (a lock beside it, ``omniquant.outdir``); temporary
  directories of dead runs are cleaned first. Temporary names are never accepted as a
  checkpoint by any consumer (``omniquant.checkpoint.verify``), even if a kill left
  ``omniquant.json`` inside one.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omniquant.checkpoint.layout import (
    FORMAT_VERSION,
    OmniquantRecord,
    RecipeRecord,
    SourceRecord,
    write_record,
)
from omniquant.errors import ExportError, arg_ref
from omniquant.outdir import CHECKPOINT, check_out, locked_out, out_path, staged_dir

if TYPE_CHECKING:
    from omniquant.quantize.recipe import Recipe


@dataclass
class QuantizeResult:
    """What a quantize run produced."""

    out: Path
    manifest: dict
    plan_text: str
    warnings: list[str]
    #: Wall seconds per phase (load, plan, calibration_forward, quantize_other, export, audit).
    timings: dict[str, float] | None = None
    #: ``manifest`` as the typed ``omniquant.json`` record.
    record: OmniquantRecord | None = None


def versions() -> dict[str, str]:
    import modelopt
    import torch
    import transformers

    import omniquant

    return {
        "omniquant": omniquant.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modelopt": modelopt.__version__,
    }


def load_calibration_samples(
    loaded, calib: str, size: int, seed: int, skip_bad: bool = False, validated=None
):
    """Samples for calibration: the built-in ``synthetic`` set, a shipped set name or a directory.

    A sample longer than the model's positions is a bad line (named, with its token count).

    Returns:
        ``(samples, skipped)`` where ``skipped`` lists manifest problems tolerated by ``skip_bad``.
    """
    if calib == "synthetic":
        from omniquant.data.synthetic import synthetic_samples

        return synthetic_samples(loaded, size, seed), []
    from omniquant.data.sets import load_calibration_set

    return load_calibration_set(
        loaded, calib, size=size, skip_bad=skip_bad, validated=validated,
        max_tokens=loaded.adapter.max_positions(loaded.model),
    )  # fmt: skip


def _size_shortfall(rec, usable: int) -> str | None:
    """A warning when the set holds fewer usable samples than ``calibration.size`` asks."""
    size = rec.calibration.size
    if usable >= size:
        return None
    return (
        f"calibration.size is {size} but the calibration set {rec.calibration.set} has "
        f"{usable} usable sample(s): calibrating on {usable}, {size - usable} missing. Add "
        f"samples to the set, or set calibration.size={usable} if that is intended."
    )


@locked_out
def quantize(
    model: str | Path,
    recipe: str | Path | Recipe,
    out: str | Path,
    *,
    calib: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    skip_bad: bool = False,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
    device: str | None = None,
    max_memory: str | None = None,
    config_naming: str = "released",
    remote_code: str | Path | None = None,
) -> QuantizeResult:
    """Quantize ``model`` with ``recipe`` and write an audited checkpoint to ``out``.

    Args:
        model: Source checkpoint directory (hub layout, BF16).
        recipe: Built-in recipe name, YAML path, or a ``Recipe`` object (recorded in
            ``omniquant.json`` with no path).
        out: Output directory (must not exist unless ``force``).
        calib: Calibration set (``synthetic``, a shipped name, or a directory);
            overrides ``calibration.set`` of the recipe.
        overrides: ``key=value`` recipe overrides.
        force: Replace an existing ``out``.
        skip_bad: Skip unreadable calibration samples with a warning instead of failing.
        quiet: No progress bar.
        log: Receives human-readable progress lines (plan, stats, warnings).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default: accelerate's placement
            over the visible GPUs; the CPU where there is none). See ``omniquant.devices``.
        max_memory: Budget per device for ``auto``, e.g. ``0=120GiB,1=120GiB,cpu=200GiB``;
            what does not fit is offloaded to CPU memory, then disk.
        config_naming: ``released`` (default): ``config.json`` in the naming vLLM and
            TensorRT-LLM construct the model from, derived from the source whichever naming
            it used; ``native``: transformers' ``nemotron_h_omni`` naming; ``source``: the
            source's file as is. Tensor bytes do not depend on it.
        remote_code: A released checkpoint directory (its ``config.json`` and ``*.py``):
            its code is copied into the export and its ``auto_map`` written, so that serving
            stacks can build the released ``model_type`` (omniquant cannot ship that code).
    """
    from omniquant.checkpoint.verify import (
        check_writable_out,
        preflight_source,
    )
    from omniquant.devices import reset_cuda_peaks, resolve_placement
    from omniquant.models import load_model
    from omniquant.outdir import clean_stale_temp_dirs
    from omniquant.quantize.plan import resolve_plan
    from omniquant.quantize.predict import predict_size
    from omniquant.quantize.recipe import load_recipe

    say = log or (lambda _msg: None)
    if remote_code is not None:
        from omniquant.quantize.export import remote_code_files

        remote_code_files(Path(remote_code))  # pre-flight: refused before calibration
    rec, recipe_path = load_recipe(recipe, overrides)
    if calib is not None:
        rec.calibration.set = calib
    out = out_path(out).absolute()
    clean_stale_temp_dirs(out, say)
    check_out(
        out, force=force, spares=((Path(model), f"{arg_ref('model')} checkpoint"),), kind=CHECKPOINT
    )
    offload_dir = out.parent / f".omniquant-offload-{out.name}-{os.getpid()}"
    placement = resolve_placement(device, max_memory, scratch=offload_dir)

    validated = set_dir = None
    if rec.calibration.set != "synthetic":
        from omniquant.data.sets import preflight_calibration_set, resolve_calib_set

        set_dir = resolve_calib_set(rec.calibration.set)
        validated = preflight_calibration_set(set_dir, skip_bad=skip_bad)

    # Plan on the meta device first: a recipe this config cannot take is refused
    # before any weight is read, and the export's size is predicted from the same plan.
    meta = load_model(model, weights=False)
    if config_naming not in meta.adapter.config_namings:
        raise ExportError(
            f"choose one of {', '.join(meta.adapter.config_namings)}.",
            arg="config_naming", value=repr(config_naming),
        )  # fmt: skip
    prediction = predict_size(meta, resolve_plan(rec, meta))
    meta = None
    preflight_source(Path(model), rec, recipe_path or f"recipe {rec.metadata.name!r}")
    # The predicted tensor bytes are what the export writes (headers and configs add
    # kilobytes): refuse a read-only or too-small --out filesystem before calibrating.
    check_writable_out(out, prediction.predicted_bytes, ExportError)

    reset_cuda_peaks()
    try:
        result = _quantize_placed(
            rec, recipe_path, Path(model), out, placement, validated, set_dir, prediction,
            force=force, skip_bad=skip_bad, quiet=quiet, say=say, config_naming=config_naming,
            remote_code=remote_code,
        )  # fmt: skip
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    return result


def _quantize_placed(
    rec, recipe_path, model: Path, out: Path, placement, validated, set_dir, prediction, *,
    force: bool, skip_bad: bool, quiet: bool, say: Callable[[str], None], config_naming: str,
    remote_code=None,
) -> QuantizeResult:  # fmt: skip
    """The part of ``quantize`` that runs with the model loaded where ``placement`` says."""
    from omniquant.checkpoint.audit import audit_checkpoint
    from omniquant.checkpoint.verify import check_finite_loaded, source_fingerprint
    from omniquant.devices import device_map_summary, input_device, peak_memory
    from omniquant.errors import ModelLoadError
    from omniquant.models import load_model
    from omniquant.outdir import default_permissions
    from omniquant.quantize.calibrate import check_expert_coverage, iter_progress, run_calibration
    from omniquant.quantize.plan import render_plan, resolve_plan, to_modelopt_config
    from omniquant.quantize.predict import measured_tensor_bytes
    from omniquant.quantize.progress import byte_progress

    timings: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_model(model, placement=placement.from_pretrained_kwargs())
    timings["load"] = time.perf_counter() - t
    # NaN/Inf in the source: refused now, before calibration (modelopt would stop later with
    # "detected nan values in amax", naming no tensor), from the tensors in memory.
    check_finite_loaded(loaded.model, model, ModelLoadError)
    devices = {
        "requested": placement.requested,
        "placement": placement.kind,
        "max_memory": {str(k): v for k, v in (placement.max_memory or {}).items()} or None,
        "inputs_on": input_device(loaded.model),
        **device_map_summary(loaded.model),
    }
    devices["notes"] = list(placement.notes) + list(loaded.placement_notes)
    say(f"model placed on: {', '.join(devices['per_device'])} (inputs on {devices['inputs_on']})")
    kernels = loaded.adapter.kernel_report(list(devices["per_device"]))
    say(f"Mamba kernels: {kernels['mamba_path']}")
    t = time.perf_counter()
    plan = resolve_plan(rec, loaded)
    plan_text = render_plan(plan)
    timings["plan"] = time.perf_counter() - t
    say(f"plan ({rec.metadata.name}):\n{plan_text}")

    t = time.perf_counter()
    samples, skipped = load_calibration_samples(
        loaded, rec.calibration.set, rec.calibration.size, rec.calibration.seed, skip_bad, validated
    )
    warnings_out: list[str] = list(plan.warnings)  # said with the plan (render_plan)
    # Bad lines past the last sample used (calibration.size cut the set short) were not
    # skipped by this run; they are recorded apart so the record says what happened.
    last_used = max((s.meta.get("line", 0) for s in samples), default=0)
    unused_bad = [b for b in skipped if b.line > last_used]
    skipped = [b for b in skipped if b.line <= last_used]
    if skipped:
        warnings_out.append(f"skipped {len(skipped)} bad calibration sample(s)")
        for item in skipped:
            say(f"warning: skipped {item}")
    if unused_bad:
        say(f"note: {len(unused_bad)} bad line(s) after the last sample used were not needed")
    shortfall = _size_shortfall(rec, len(samples))
    if shortfall:  # said now: a coverage error after calibration would hide it
        say(f"warning: {shortfall}")

    import modelopt.torch.quantization as mtq

    mo_config = to_modelopt_config(plan, rec)
    root = loaded.adapter.quant_root(loaded.model)
    cov = rec.calibration.expert_coverage
    timings["calibration_data"] = time.perf_counter() - t
    loop_seconds = [0.0]

    from omniquant.quantize.algorithm_run import algorithm_context, preflight_algorithm

    preflight_algorithm(plan, loaded, samples, say)

    def quantize_with(loop):
        def timed_loop(m=None):
            t0 = time.perf_counter()
            loop(m)
            loop_seconds[0] += time.perf_counter() - t0

        with algorithm_context(plan):
            mtq.quantize(root, mo_config, timed_loop)

    t = time.perf_counter()
    stats = run_calibration(
        loaded,
        samples,
        quantize_with,
        evs_rate=rec.calibration.evs_rate,
        force_all_experts=cov.policy == "force_all_experts",
        progress=iter_progress(quiet),
    )
    timings["calibration_forward"] = loop_seconds[0]
    # mtq.quantize minus its forward passes: inserting quantizers, amax post-processing.
    timings["quantize_other"] = time.perf_counter() - t - loop_seconds[0]
    said = len(plan.warnings)
    warnings_out += check_expert_coverage(stats, cov.policy, cov.min_tokens)
    from omniquant.quantize.algorithm_run import algorithm_record

    algo_record = algorithm_record(plan, stats)
    for w in warnings_out[said:]:
        say(f"warning: {w}")
    warnings_out += [shortfall] if shortfall else []

    with staged_dir(out, replace=force, kind=CHECKPOINT) as tmp:
        t = time.perf_counter()
        written = _write_quiet(
            loaded, plan, tmp, config_naming, remote_code, byte_progress("exporting", quiet)
        )
        timings["export"] = time.perf_counter() - t
        record = OmniquantRecord(
            format_version=FORMAT_VERSION,
            source=SourceRecord(
                path=str(Path(loaded.path).resolve()),
                model_type=loaded.config_dict.get("model_type"),
                # report checks a candidate against its baseline by this (omniquant.checkpoint.verify).
                fingerprint=source_fingerprint(loaded.path),
            ),
            recipe=RecipeRecord(
                name=rec.metadata.name,
                path=None if recipe_path is None else str(recipe_path),
                effective=rec.model_dump(mode="json"),
            ),
            recipe_sha256=rec.sha256(),
            versions=versions(),
            calibration={
                "set": rec.calibration.set,
                "set_dir": None if set_dir is None else str(set_dir),
                "skipped_samples": [str(item) for item in skipped],
                "bad_lines_not_used": [str(item) for item in unused_bad],
                **stats.to_json(),
            },
            algorithm=algo_record,
            plan=plan.to_json(),
            quantized=plan.group_precision(),
            shards=written["shards"],
            # Tensor-data bytes (safetensors headers not counted): the plan's
            # prediction beside what was written.
            size={
                "predicted_bytes": prediction.predicted_bytes,
                "measured_bytes": measured_tensor_bytes(tmp),
                "layers_by_format": prediction.layers_by_format,
                "headers_counted": False,
            },
            warnings=warnings_out,
            devices=devices,
            kernels=kernels,
            peak_memory=peak_memory(),
            created_unix=int(time.time()),
        )
        write_record(tmp, record)  # last: a directory without it is not a finished checkpoint
        default_permissions(tmp)
        t = time.perf_counter()
        # The shards' sha256 were taken by reading the written files back moments ago
        # (write_checkpoint); hashing them again here would prove nothing new.
        audit_checkpoint(
            tmp, raise_on_error=True, progress=byte_progress("auditing", quiet), checksums=False
        )
        timings["audit"] = time.perf_counter() - t
    say(f"wrote {out}")
    # The quantized model sits in reference cycles (modelopt's quantizer modules): free
    # it now, not at some later collection, so back-to-back runs (cliff) do not stack up.
    loaded = root = None
    gc.collect()
    return QuantizeResult(
        out=out, manifest=record.to_json(), plan_text=plan_text, warnings=warnings_out,
        timings=timings, record=record,
    )  # fmt: skip


def _write_quiet(
    loaded, plan, tmp: Path, config_naming: str, remote_code=None, progress=None
) -> dict:
    """modelopt's exporter prints per-expert fallbacks to stdout; keep stdout for our output
    (progress lines go to stderr)."""
    import contextlib
    import io
    import warnings

    from omniquant.quantize.export import write_checkpoint

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The model is not used after its export here: its tensors are freed as they are
        # exported, so the export's memory is the model's (write_checkpoint's ``release``).
        return write_checkpoint(
            loaded, plan, tmp, config_naming, remote_code, progress, release=True
        )

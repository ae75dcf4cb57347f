"""The GPU check of omniquant: one run on a lent H100/H200 (no network, 15 minutes of
device time in all, at most 10 per command), so it must work the first time.

Run on the GPU host with ``benchmarks/gpu/run.sh`` (installs the carried wheels). Steps in
order of value, each with a budget printed before anything starts (arithmetic in
``budget``; at most 6 minutes in all, so a rerun fits on the warm machine):

1. ``versions``: CUDA torch, transformers, modelopt; a mismatch stops the check with one
   line saying what to install.
2. ``suite_gpu_tests``: the suite's own CUDA comparisons (``environment.SUITE_GPU_TESTS``).
3. ``ext_warmup``: modelopt's CUDA extension build, prerequisites first, timed.
4. ``nvfp4_compare``: CUDA fake quant against the CPU emulation: tensors, exported weights,
   whole-model logits of ``nvfp4_aggressive`` with the FP8 KV cache off (``compare``).
5. ``build_source`` then ``quantize/<recipe>``: a real-width model of ``--layers`` layers
   (8: ~10 GiB) quantized with ``--device``; phases, peaks, the plan's estimate.
6. ``cpu_vs_gpu``: the tiny source quantized on the CPU and the GPU, shard hashes.
7. ``auto_offload``: ``--device auto`` with a ``--max-memory`` that forces offload.
8. ``algorithms``: step 6 for each calibration algorithm the recipes offer.

The JSON (``--out``) holds every step from the start (``runner``): pending, running,
ok, failed with its traceback, or skipped with the reason. A disk and time pre-flight
lowers ``--layers`` when the run would not fit.

``--device cpu --scale tiny`` is the CPU rehearsal (``tests/test_gpu_check_script.py``):
the same steps end to end, with the CUDA calls recorded as not run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path

from benchmarks.gpu import budget
from benchmarks.gpu.runner import Runner, Step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="omniquant GPU check (see the module docstring)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--work", type=Path, default=Path("/tmp/omniquant-gpu-check"))
    ap.add_argument("--scale", choices=("real", "tiny"), default="real")
    ap.add_argument("--layers", type=int, default=8, help="first N layers of the released pattern")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--recipes", default="nvfp4_omni,fp8_omni")
    ap.add_argument("--samples", type=int, default=4, help="calibration samples per quantize run")
    ap.add_argument("--compare-pattern", default="M*E", help="text layers of the step-4 model")
    ap.add_argument("--steps", default="", help="comma-separated step names to run (default all)")
    ap.add_argument("--deadline-s", type=float, default=540, help="stop starting steps after this")
    ap.add_argument(
        "--plan-only", action="store_true", help="versions, pre-flight and the budget table only"
    )
    ap.add_argument("--free-disk", type=int, default=None, help=argparse.SUPPRESS)  # tests
    return ap.parse_args(argv)


def preflight(args, work: Path) -> dict:
    """Sizes from meta builds; the layer count that fits the disk and the time budget."""
    from benchmarks.gpu import sources

    sizes = sources.bytes_by_layer(sources.config_kwargs(args.scale, args.layers))
    cmp_kwargs = sources.config_kwargs(
        args.scale, 0, pattern=args.compare_pattern, encoder_layers=(2, 2)
    )
    cmp_sizes = sources.bytes_by_layer(cmp_kwargs)
    compare_src = budget.source_bytes(cmp_sizes, len(cmp_sizes["layers"]))
    free = args.free_disk if args.free_disk is not None else shutil.disk_usage(work).free
    fixed = fixed_seconds(args, compare_src)
    layers = min(args.layers, len(sizes["layers"]))
    fit = budget.fit_layers(
        sizes, layers, compare_src, free, fixed, args.samples, len(args.recipes.split(","))
    )
    return {**fit, "compare_source_bytes": compare_src, "compare_kwargs": cmp_kwargs}


def fixed_seconds(args, compare_src: int) -> float:
    """Every budget that does not depend on the layer count, the pre-flight's included."""
    return budget.PREFLIGHT_S + sum(b for b, _ in _fixed_budgets(args, compare_src).values())


def _fixed_budgets(args, compare_src: int) -> dict[str, tuple[float, str]]:
    t = budget.TINY_QUANTIZE
    n = len(args.recipes.split(","))
    return {
        "versions": (budget.VERSIONS_S, "imports and version reads"),
        "suite_gpu_tests": (
            budget.SUITE_TESTS_S,
            "pytest process: 15 s imports, 5 s tiny build, 15 s tiny NVFP4 on CUDA, 5 s numerics",
        ),
        "ext_warmup": (budget.EXT_BUILD_S, "two nvcc builds of ~45 s (MAX_JOBS=16)"),
        "nvfp4_compare": budget.compare_seconds(compare_src, args.samples),
        "cpu_vs_gpu": (2 + 2 * n * t, f"tiny build 2 s + {n} recipes x 2 devices x {t:.0f} s"),
        "auto_offload": (2 * t + 1, f"2 x {t:.0f} s (CPU reference, auto with offload)"),
        "algorithms": (
            2 * t + 2,
            f"each algorithm but max: 2 x {t:.0f} s + 2 s KL (one today: mse)",
        ),
    }


def make_steps(args, fit: dict, cuda: bool, work: Path) -> list[Step]:
    from benchmarks.gpu import compare, environment, quantize_steps, sources

    dev = args.device if cuda else "cpu"
    fixed = _fixed_budgets(args, fit["compare_source_bytes"])
    src, tiny_src = work / "source", work / "tiny_source"
    kwargs = sources.config_kwargs(args.scale, fit["layers"])

    def step(name, fn, needs=(), limit=None, b=None):
        secs, arith = b or fixed[name]
        return Step(name, fn, secs, arith, tuple(needs), limit)

    def nvfp4_compare():
        try:
            return compare.compare_nvfp4(work / "compare", fit["compare_kwargs"], dev, args.samples)
        finally:
            shutil.rmtree(work / "compare", ignore_errors=True)

    def tiny_source() -> Path:
        if not tiny_src.exists():
            sources.build(tiny_src, sources.config_kwargs("tiny", 0), "cpu")
        return tiny_src

    steps = [
        step("versions", lambda: environment.check_versions(args.device)),  # run first by main
        step(
            "suite_gpu_tests", lambda: environment.suite_gpu_tests(cuda, budget.SUITE_TESTS_S * 3)
        ),
        step(
            "ext_warmup",
            lambda: environment.warm_up_extensions(cuda, budget.EXT_BUILD_LIMIT_S),
            limit=budget.EXT_BUILD_LIMIT_S + 10,
        ),
        step("nvfp4_compare", nvfp4_compare),
        step(
            "build_source",
            lambda: sources.build(src, kwargs, dev),
            b=budget.build_seconds(fit["source_bytes"]),
        ),
    ]
    qb = budget.quantize_seconds(fit["source_bytes"], args.samples)
    for recipe in args.recipes.split(","):
        steps.append(step(f"quantize/{recipe}", lambda r=recipe: quantize_steps.quantize_measured(
            src, r, work / f"out_{r}", args.device, args.samples), needs=("build_source",), b=qb))  # fmt: skip
    steps += [
        step(
            "cpu_vs_gpu",
            lambda: quantize_steps.cpu_vs_gpu(tiny_source(), work, dev, args.recipes.split(","), 2),
        ),
        step("auto_offload", lambda: quantize_steps.auto_offload(tiny_source(), work, cuda, 2)),
        step("algorithms", lambda: quantize_steps.algorithms(tiny_source(), work, dev, 2)),
    ]
    return steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "started_unix": time.time(),
                    "rehearsal": not cuda, "steps": {}}  # fmt: skip
    enforce = cuda and args.deadline_s > 0
    runner = Runner(
        args.out, result, deadline_s=args.deadline_s if enforce else None, enforce_limits=enforce
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        result["error"] = f"--device {args.device}: CUDA is not available on this host"
        runner.save()
        print(result["error"], file=sys.stderr)
        return result
    from benchmarks.gpu import environment

    # The versions first, before anything builds a model with them.
    versions = Step("versions", lambda: environment.check_versions(args.device), budget.VERSIONS_S,
                    "imports and version reads")  # fmt: skip
    runner.plan([versions])
    runner.run([versions])
    if result["steps"]["versions"]["status"] != "ok":
        return result
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        try:
            fit = preflight(args, args.work)
        except Exception:  # noqa: BLE001 - the steps that need no real-width model still run
            result["preflight_error"] = traceback.format_exc()
            print(
                f"[gpu_check] pre-flight failed, sizes unknown:\n{result['preflight_error']}",
                flush=True,
            )
            from benchmarks.gpu import sources

            fit = {"layers": args.layers, "source_bytes": 0, "compare_source_bytes": 0, "fits": None,
                   "compare_kwargs": sources.config_kwargs(args.scale, 0, pattern=args.compare_pattern,
                                                           encoder_layers=(2, 2))}  # fmt: skip
        result["preflight"] = {k: v for k, v in fit.items() if k != "compare_kwargs"}
        result["preflight"]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[gpu_check] pre-flight: {result['preflight']}", flush=True)
        steps = make_steps(args, fit, cuda, args.work)
        wanted = {s for s in args.steps.split(",") if s}
        if wanted:
            steps = [s for s in steps if s.name in wanted or s.name == "versions"]
        where = "seconds on one H100 by budget.py's arithmetic" + (
            "" if cuda else "; this run is the CPU rehearsal"
        )
        print(f"[gpu_check] estimated time per step ({where}):", flush=True)
        runner.plan(steps)
        result["estimated_total_s"] = round(result["estimated_total_s"] + budget.PREFLIGHT_S, 1)
        print(f"[gpu_check]   {'(pre-flight)':<24} {budget.PREFLIGHT_S:6.0f} s  two meta-device builds "
              f"(ran before this table: {result['preflight'].get('seconds', 0):.0f} s); "
              f"total {result['estimated_total_s']:.0f} s", flush=True)  # fmt: skip
        runner.save()
        if not args.plan_only:
            runner.run(steps)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()

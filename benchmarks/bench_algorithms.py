"""Calibration algorithms on the demo model: fidelity and accuracy at identical bytes.

For each built-in recipe x each calibration algorithm (``omniquant.quantize.algorithms``)
that the recipe can take, quantize the bundled demo model with its shipped calibration
set (``omni-demo``), then evaluate every export of the recipe against BF16 on the demo
task set with serving numerics (``build_report``, one report per recipe):

- mean and p95 (over samples) KL(BF16 || candidate) and top-1 agreement, accuracy per task;
- exported tensor bytes (must be the same for every algorithm of a recipe: asserted);
- calibration wall time (the whole ``quantize`` call and modelopt's part of it) and the
  process's peak memory as ``omniquant.json`` records it.

Writes one JSON (default ``benchmarks/results/bench_algorithms.json``) and prints a
Markdown table (the README's). Every number is measured in this run on this machine's
CPU; nothing is a GPU number. Run:

    .venv/bin/python benchmarks/bench_algorithms.py [--recipes nvfp4_aggressive,nvfp4_omni]
        [--algorithms max,mse,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

ALL_RECIPES = ("nvfp4_aggressive", "nvfp4_omni", "fp8_omni", "fp8_backbone")


def _p95(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = max(0, min(len(vals) - 1, round(0.95 * (len(vals) - 1))))
    return vals[k]


def _candidate_row(c: dict, q: dict) -> dict:
    samples = c.get("samples") or []
    kls = [s.get("kl") for s in samples if isinstance(s, dict)]
    return {
        "name": c["name"],
        "algorithm": c.get("algorithm"),
        "kl_mean": c["overall"]["kl_mean"],
        "kl_p95": _p95(kls),
        "top1_agreement": c["overall"]["top1_agreement"],
        "accuracy": c["overall"]["accuracy"],
        "accuracy_by_task": {t: v["accuracy"] for t, v in c["tasks"].items()},
        "size_bytes": c["size_bytes"],
        **q,
    }


def run(recipes, algorithms, out: Path) -> dict:
    import torch

    from omniquant.demo import DEMO_CALIB, DEMO_TASKS, demo_model_dir
    from omniquant.errors import OmniquantError
    from omniquant.experiments.compare import build_report
    from omniquant.quantize.pipeline import quantize
    from omniquant.quantize.recipe import load_recipe

    torch.set_num_threads(1)
    result: dict = {"model": "omniquant/demo/model", "calib": DEMO_CALIB, "tasks": DEMO_TASKS,
                    "threads": 1, "recipes": {}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-algorithms-"))
    for recipe in recipes:
        entry: dict = {"refused": {}, "candidates": []}
        outs, quant = [], {}
        for algo in algorithms:
            spec = f"{recipe}:{algo}"
            try:
                load_recipe(spec)
            except OmniquantError as err:
                entry["refused"][algo] = str(err).splitlines()[-1].strip()
                continue
            t = time.perf_counter()
            res = quantize(demo_model_dir(), spec, work / spec.replace(":", "-"), calib=DEMO_CALIB)
            seconds = time.perf_counter() - t
            m = res.manifest
            quant[spec] = {
                "quantize_seconds": round(seconds, 2),
                "modelopt_seconds": round(
                    res.timings["calibration_forward"] + res.timings["quantize_other"], 2
                ),
                "peak_memory": m.get("peak_memory"),
                "measured_bytes": m["size"]["measured_bytes"],
                "fallbacks": m["algorithm"]["fallbacks"],
                "notes": m["algorithm"]["notes"],
            }
            outs.append(res.out)
            print(f"{spec}: quantized in {seconds:.1f} s", flush=True)
        sizes = {q["measured_bytes"] for q in quant.values()}
        assert len(sizes) == 1, f"{recipe}: exported bytes differ across algorithms: {quant}"
        report = build_report(demo_model_dir(), outs, DEMO_TASKS, work / f"report-{recipe}",
                              baseline_name="bf16", evs_rates=(), bootstrap=0)  # fmt: skip
        for c, spec in zip(report["candidates"], quant):
            entry["candidates"].append(_candidate_row(c, quant[spec]))
        base = next(r for r in entry["candidates"] if r["algorithm"] == "max")
        for r in entry["candidates"]:
            r["kl_mean_vs_max"] = (
                None if not base["kl_mean"] else r["kl_mean"] / base["kl_mean"] - 1
            )
        result["recipes"][recipe] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(table(result), flush=True)
    return result


def table(result: dict) -> str:
    lines = [
        "| recipe | algorithm | mean KL | vs max | p95 KL | top-1 | accuracy | bytes | quantize s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for recipe, entry in result["recipes"].items():
        for r in entry["candidates"]:
            vs = "" if r["kl_mean_vs_max"] is None else f"{100 * r['kl_mean_vs_max']:+.0f} %"
            p95 = "" if r["kl_p95"] is None else f"{r['kl_p95']:.4f}"
            lines.append(
                f"| `{recipe}` | {r['algorithm']} | {r['kl_mean']:.4f} | {vs} | {p95} | "
                f"{r['top1_agreement']:.3f} | {r['accuracy']:.3f} | {r['measured_bytes']:,} | "
                f"{r['quantize_seconds']:.0f} |"
            )
        for algo, why in entry["refused"].items():
            lines.append(f"| `{recipe}` | {algo} | refused: {why[:90]} | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    from omniquant.quantize.algorithms import ALGORITHMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(ALL_RECIPES))
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_algorithms.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    run(args.recipes.split(","), args.algorithms.split(","), args.out)


if __name__ == "__main__":
    main()

"""How well ``omniquant fit``'s additive damage model predicts the damage of the recipes
it writes, on the bundled demo model.

Run: ``python -m benchmarks.bench_fit [--out bench_fit.json]`` or
``pytest benchmarks/bench_fit.py --benchmark-enable -s`` (one run; nothing asserted: the
numbers are reported, whatever they are).

What it does (one torch thread):
- For each granularity (module groups; each layer's groups): ``prepare_fit`` +
  ``measure`` on the demo model with its calibration set (omni-demo, 16 calibration
  samples, units scored on the first 8): one measurement for every budget.
- Six budgets evenly spaced from ``nvfp4_aggressive``'s exported bytes (the smallest
  legal layout here) towards BF16 (i = 0..5 of 6 steps), plus ``nvfp4_omni``'s exact
  bytes and 90 % of them. Each fitted recipe is written, quantized by the ordinary
  ``quantize`` (its bytes measured on disk), loaded with the serving numerics, and its
  KL of the final logits measured against BF16 on the 144 ``omni-demo`` task samples
  (held out: not the samples fit scored units on), and on fit's own scoring samples.
- The calibration algorithm is a dimension of the fit (``--algorithms``, default
  fit's ``max,mse``): each row names the algorithm the interaction check chose.
- ``nvfp4_omni`` and ``nvfp4_aggressive`` (max, as NVIDIA's recipes calibrate) are
  measured the same way.
- Two held-out KLs on the task samples: every position of prompt + answer
  (``kl_tasks``), and the answer span alone (``kl_tasks_answer``: the positions that
  predict the answer tokens, full vocabulary; the report's fidelity uses top-k spans).
- Spearman's rank correlation over the six budgets, per granularity: predicted (additive)
  KL vs measured KL on the task samples; the interaction check (whole layout composed) vs
  measured; predicted vs measured on fit's own scoring samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _measure(ckpt: Path, task_ref, task_samples, fit_ref, fit_samples) -> dict:
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.logit_kl import mean_answer_kl, mean_kl, sample_logprobs
    from omniquant.quantize.predict import measured_tensor_bytes

    loaded = load_emulated(ckpt)
    task = sample_logprobs(loaded, task_samples)
    return {
        "measured_bytes": measured_tensor_bytes(ckpt),
        "kl_tasks": mean_kl(task_ref, task),
        "kl_tasks_answer": mean_answer_kl(task_ref, task, task_samples),
        "kl_fit_samples": mean_kl(fit_ref, sample_logprobs(loaded, fit_samples)),
    }


def _sweep(session, model, budgets, task_ref, task_samples, tmp: Path, log) -> dict:
    """Fit, write, quantize and measure one recipe per budget."""
    from omniquant.errors import PlanError
    from omniquant.experiments.fit import fit_budget, write_recipe
    from omniquant.quantize.pipeline import quantize

    fit_samples, fit_ref = session.composer.samples, session.composer.reference
    rows: dict[str, dict] = {}
    for label, budget in budgets.items():
        try:
            res = fit_budget(session, budget, label)
        except PlanError as err:
            rows[label] = {"budget": budget, "refused": str(err)}
            log(f"{session.granularity} {label}: refused: {err}")
            continue
        name = f"{session.granularity}_{label}"
        path = write_recipe(res, tmp / f"{name}.yaml")
        ckpt = quantize(model, path, tmp / name, quiet=True).out
        rows[label] = {
            "budget": budget,
            "predicted_bytes": res.predicted_bytes,
            "algorithm": res.algorithm,
            "predicted_kl": res.predicted_kl,
            "composed_kl": res.composed_kl,
            "layout": {u["unit"]: u["format"] for u in res.units if u["format"] != "bf16"},
            "chosen_rank": res.chosen_rank,
            "alternatives": [
                {**a, "layout": {u: f for u, f in a["layout"].items() if f != "bf16"}}
                for a in res.alternatives
            ],
            **_measure(ckpt, task_ref, task_samples, fit_ref, fit_samples),
        }
        log(f"{session.granularity} {label}: {json.dumps(rows[label])}")
    return rows


def _spearman(rows: dict) -> dict:
    from scipy.stats import spearmanr

    steps = [rows[f"step{i}"] for i in range(6) if "refused" not in rows[f"step{i}"]]
    meas = [r["kl_tasks"] for r in steps]
    return {
        "predicted_vs_measured_tasks": float(
            spearmanr([r["predicted_kl"] for r in steps], meas).statistic
        ),
        "composed_vs_measured_tasks": float(
            spearmanr([r["composed_kl"] for r in steps], meas).statistic
        ),
        "predicted_vs_measured_tasks_answer": float(
            spearmanr(
                [r["predicted_kl"] for r in steps], [r["kl_tasks_answer"] for r in steps]
            ).statistic
        ),
        "predicted_vs_measured_fit_samples": float(
            spearmanr(
                [r["predicted_kl"] for r in steps], [r["kl_fit_samples"] for r in steps]
            ).statistic
        ),
    }


def run(log=print, granularities=("group", "layer"), algorithms="max,mse") -> dict:
    import torch

    from omniquant.data.processing import OmniProcessor
    from omniquant.demo import DEMO_CALIB, DEMO_TASKS, demo_model_dir
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.logit_kl import sample_logprobs
    from omniquant.evaluate.tasks import prepare_task_items, validate_task_set
    from omniquant.experiments.fit import prepare_fit
    from omniquant.quantize.pipeline import quantize
    from omniquant.quantize.planner import plan_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = demo_model_dir()
    size = {
        r: plan_model(model, r).size.predicted_bytes for r in ("nvfp4_aggressive", "nvfp4_omni")
    }
    base = load_emulated(model)
    items = prepare_task_items(OmniProcessor.from_pretrained(model), validate_task_set(DEMO_TASKS))
    task_samples = [it.sample for it in items]
    task_ref = sample_logprobs(base, task_samples)
    del base
    result: dict = {"sizes": size, "task_samples": len(task_samples), "algorithms": algorithms}
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        for gran in granularities:
            t = time.perf_counter()
            session = prepare_fit(model, calib=DEMO_CALIB, granularity=gran, algorithms=algorithms)
            session.measure(log)
            bf16, low = session.costs.bf16_bytes, size["nvfp4_aggressive"]
            budgets = {f"step{i}": low + i * (bf16 - low) // 6 for i in range(6)}
            budgets["nvfp4_omni_bytes"] = size["nvfp4_omni"]
            budgets["nvfp4_omni_90pct"] = int(0.9 * size["nvfp4_omni"])
            measure_s = time.perf_counter() - t
            rows = _sweep(session, model, budgets, task_ref, task_samples, Path(tmp), log)
            result[gran] = {
                "bf16_bytes": bf16,
                "smallest_bytes": session.smallest_bytes,
                "units": len(session.units),
                "unit_options": {
                    a: {u: [o.__dict__ for o in opts] for u, opts in by_unit.items()}
                    for a, by_unit in session.options_by_algorithm.items()
                },
                "kv_kl": session.kv_kl,
                "rows": rows,
                "spearman": _spearman(rows),
                "measure_seconds": round(measure_s, 1),
            }
        fit_samples, fit_ref = session.composer.samples, session.composer.reference
        for recipe in ("nvfp4_omni", "nvfp4_aggressive"):
            ckpt = quantize(model, recipe, Path(tmp) / recipe, calib=DEMO_CALIB, quiet=True).out
            result[recipe] = {"predicted_bytes": size[recipe],
                              **_measure(ckpt, task_ref, task_samples, fit_ref, fit_samples)}  # fmt: skip
            log(f"{recipe}: {json.dumps(result[recipe])}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def test_bench_fit(benchmark):
    out = benchmark.pedantic(run, kwargs={"log": lambda _m: None}, rounds=1, iterations=1)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--granularities", default="group,layer")
    ap.add_argument("--algorithms", default="max,mse")
    args = ap.parse_args()
    res = run(granularities=tuple(args.granularities.split(",")), algorithms=args.algorithms)
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)

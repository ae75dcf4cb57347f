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
import warnings
from pathlib import Path

ALL_RECIPES = ("nvfp4_aggressive", "nvfp4_omni", "fp8_omni", "fp8_backbone")


def _p95(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = max(0, min(len(vals) - 1, round(0.95 * (len(vals) - 1))))
    return vals[k]


#: Exported weight name -> group of the per-group weight error.
_GROUPS = (
    ("routed_experts", ".mixer.experts."),
    ("shared_experts", ".mixer.shared_experts."),
    ("mamba_in_out", (".mixer.in_proj.", ".mixer.out_proj.")),
    ("attention", (".mixer.q_proj.", ".mixer.k_proj.", ".mixer.v_proj.", ".mixer.o_proj.")),
)


def weight_error(ckpt: Path, source: Path) -> dict[str, float]:
    """Per group, ``sqrt(sum ||W - deq(Wq)||^2 / sum ||W||^2)`` over the quantized weights:
    the exported bytes dequantized with ``omniquant.numerics`` against the BF16 source.
    (GPTQ trades weight error for output error, so its weight error can be the larger.)"""
    from safetensors import safe_open

    from omniquant.formats import by_stored_dtype

    src = {}
    for shard in sorted(source.glob("*.safetensors")):
        fh = safe_open(shard, "pt")
        src.update({k: fh for k in fh.keys()})  # noqa: SIM118
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            keys = set(fh.keys())
            for k in sorted(keys):
                fmt = by_stored_dtype(fh.get_slice(k).get_dtype())
                if not k.endswith(".weight") or fmt is None or not fmt.quantized:
                    continue
                base = k[: -len("weight")]
                scales = {s: fh.get_tensor(base + s) for s in fmt.weight_scale_suffixes}
                deq = fmt.dequantize(fh.get_tensor(k), scales, dtype=torch_float32())
                w = src[k].get_tensor(k).float()
                group = next(
                    (
                        g
                        for g, pats in _GROUPS
                        if any(p in k for p in ((pats,) if isinstance(pats, str) else pats))
                    ),
                    "other",
                )
                num[group] = num.get(group, 0.0) + float((w - deq).pow(2).sum())
                den[group] = den.get(group, 0.0) + float(w.pow(2).sum())
    out = {g: (num[g] / den[g]) ** 0.5 for g in sorted(num) if den[g]}
    if num:
        out["all"] = (sum(num.values()) / sum(den.values())) ** 0.5
    return out


def torch_float32():
    import torch

    return torch.float32


def _kl_by_sample(c: dict) -> dict[str, float]:
    return {s["id"]: s["kl"] for s in c.get("samples") or [] if s.get("kl") is not None}


def _paired(kl: dict[str, float], base: dict[str, float], seed: int = 0) -> dict:
    """How robust the mean-KL change vs max is. The KL is heavy-tailed on the demo tasks
    (a few samples carry most of it), so the ratio comes with a paired bootstrap interval
    (1000 resamples of the samples) and the share of samples where the algorithm is lower."""
    import random

    ids = sorted(set(kl) & set(base))
    if not ids or not sum(base[i] for i in ids):
        return {}
    rng = random.Random(seed)
    ratios = []
    for _ in range(1000):
        pick = [rng.choice(ids) for _ in ids]
        b = sum(base[i] for i in pick)
        if b > 0:
            ratios.append(sum(kl[i] for i in pick) / b)
    ratios.sort()
    lo, hi = ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]
    return {
        "kl_mean_ratio_ci95": [lo, hi],
        "samples_lower_kl_than_max": sum(kl[i] < base[i] for i in ids) / len(ids),
    }


def _candidate_row(c: dict, q: dict, base: dict[str, float] | None) -> dict:
    kl = _kl_by_sample(c)
    vals = sorted(kl.values())
    total = sum(vals) or 1.0
    row = {
        "name": c["name"],
        "algorithm": c.get("algorithm"),
        "kl_mean": c["overall"]["kl_mean"],
        "kl_p95": _p95(vals),
        "kl_median": vals[len(vals) // 2] if vals else None,
        "kl_max": vals[-1] if vals else None,
        "kl_share_of_top3_samples": sum(vals[-3:]) / total,
        "top1_agreement": c["overall"]["top1_agreement"],
        "accuracy": c["overall"]["accuracy"],
        "accuracy_by_task": {t: v["accuracy"] for t, v in c["tasks"].items()},
        "size_bytes": c["size_bytes"],
        **q,
    }
    if base is not None and row["algorithm"] != "max":
        row.update(_paired(kl, base))
    return row


def _rows(report: dict, quant: dict) -> list[dict]:
    cands = report["candidates"]
    base = next((_kl_by_sample(c) for c in cands if c.get("algorithm") == "max"), None)
    rows = [_candidate_row(c, quant[spec], base) for c, spec in zip(cands, quant)]
    mean_max = next((r["kl_mean"] for r in rows if r["algorithm"] == "max"), None)
    for r in rows:
        r["kl_mean_vs_max"] = None if not mean_max else r["kl_mean"] / mean_max - 1
    return rows


def quantize_measured(spec: str, dest: Path) -> dict:
    """``quantize`` the demo model with ``spec`` in a fresh process (one thread): wall time,
    peak resident and anonymous memory above the process after imports
    (``benchmarks._memwatch``), and what ``omniquant.json`` records."""
    from benchmarks._memwatch import measure
    from omniquant.demo import DEMO_CALIB

    mem = measure(
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch; torch.set_num_threads(1)\n"
        "from omniquant.demo import demo_model_dir\n"
        "from omniquant.quantize.pipeline import quantize\n",
        f"res = quantize(demo_model_dir(), {spec!r}, {str(dest)!r}, calib={DEMO_CALIB!r}, force=True)\n",
    )
    m = json.loads((dest / "omniquant.json").read_text())
    return {
        "quantize_seconds": round(mem["seconds"], 2),
        "peak_rss_delta_bytes": mem["rss_peak_delta"],
        "peak_anon_delta_bytes": mem["anon_peak_delta"],
        "measured_bytes": m["size"]["measured_bytes"],
        "fallbacks": m["algorithm"]["fallbacks"],
        "notes": m["algorithm"]["notes"],
    }


def run(recipes, algorithms, out: Path) -> dict:
    import torch

    from omniquant.demo import DEMO_CALIB, DEMO_TASKS, demo_model_dir
    from omniquant.errors import OmniquantError
    from omniquant.experiments.compare import build_report
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
            dest = work / spec.replace(":", "-")
            quant[spec] = quantize_measured(spec, dest)
            quant[spec]["weight_rel_error"] = weight_error(dest, demo_model_dir())
            outs.append(dest)
            seconds = quant[spec]["quantize_seconds"]
            print(f"{spec}: quantized in {seconds:.1f} s", flush=True)
        sizes = {q["measured_bytes"] for q in quant.values()}
        assert len(sizes) == 1, f"{recipe}: exported bytes differ across algorithms: {quant}"
        report = build_report(demo_model_dir(), outs, DEMO_TASKS, work / f"report-{recipe}",
                              baseline_name="bf16", evs_rates=(), bootstrap=0)  # fmt: skip
        (work / f"report-{recipe}" / "quant.json").write_text(json.dumps(quant, default=str))
        entry["candidates"] = _rows(report, quant)
        result["recipes"][recipe] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(table(result), flush=True)
    return result


def _mib(r: dict) -> str:
    v = r.get("peak_anon_delta_bytes")
    return "" if v is None else f"{v / 2**20:.0f}"


def _werr(r: dict) -> str:
    w = r.get("weight_rel_error") or {}
    if not w:
        return ""
    experts = w.get("routed_experts")
    return f"{experts:.4f} / {w['all']:.4f}" if experts is not None else f"- / {w['all']:.4f}"


def table(result: dict) -> str:
    lines = [
        (
            "| recipe | algorithm | mean KL | vs max (95% CI) | median KL | p95 KL | max KL "
            "| samples below max | top-1 | accuracy | weight rel. error (experts / all) | bytes "
            "| quantize s | peak MiB |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for recipe, entry in result["recipes"].items():
        for r in entry["candidates"]:
            vs = "" if r["kl_mean_vs_max"] is None else f"{100 * r['kl_mean_vs_max']:+.0f} %"
            ci = r.get("kl_mean_ratio_ci95")
            if ci:
                vs += f" ({100 * (ci[0] - 1):+.0f}, {100 * (ci[1] - 1):+.0f})"
            wins = r.get("samples_lower_kl_than_max")
            wins = "" if wins is None else f"{100 * wins:.0f} %"
            lines.append(
                f"| `{recipe}` | {r['algorithm']} | {r['kl_mean']:.4f} | {vs} | "
                f"{r['kl_median']:.1e} | {r['kl_p95']:.1e} | {r['kl_max']:.3f} | {wins} | "
                f"{r['top1_agreement']:.3f} | {r['accuracy']:.3f} | {_werr(r)} | {r['measured_bytes']:,} | "
                f"{r['quantize_seconds']:.0f} | {_mib(r)} |"
            )
        for algo in entry["refused"]:
            lines.append(f"| `{recipe}` | {algo} | refused (reason in the JSON) |" + " |" * 11)
    return "\n".join(lines)


def main() -> None:
    from omniquant.quantize.algorithms import ALGORITHMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(ALL_RECIPES))
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_algorithms.json"))
    ap.add_argument("--remeasure", action="store_true",
                    help="re-run only the quantize step of every row in a fresh process for time and memory")  # fmt: skip
    ap.add_argument("--reanalyse", type=Path, help="recompute the JSON from a run's work directory")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.remeasure:
        remeasure(args.out)
        return
    if args.reanalyse:
        reanalyse(args.reanalyse, args.out)
        return
    run(args.recipes.split(","), args.algorithms.split(","), args.out)


def remeasure(out: Path) -> None:
    """Time and peak memory of each row's ``quantize`` in a fresh process (``--remeasure``);
    the exported bytes must equal the row's (quantize is deterministic)."""
    result = json.loads(out.read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-algorithms-mem-"))
    for recipe, entry in result["recipes"].items():
        for r in entry["candidates"]:
            spec = f"{recipe}:{r['algorithm']}"
            q = quantize_measured(spec, work / spec.replace(":", "-"))
            assert q["measured_bytes"] == r["measured_bytes"], spec
            for k in ("quantize_seconds", "peak_rss_delta_bytes", "peak_anon_delta_bytes"):
                r[k] = q[k]
            r.pop("peak_memory", None)
            r.pop("modelopt_seconds", None)
            print(spec, q["quantize_seconds"], q["peak_anon_delta_bytes"], flush=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))


def reanalyse(work: Path, out: Path) -> None:
    """Rebuild the JSON's statistics from the reports of an earlier run (``--reanalyse``)."""
    from omniquant.demo import demo_model_dir

    result = json.loads(out.read_text())
    keep = ("quantize_seconds", "peak_rss_delta_bytes", "peak_anon_delta_bytes",
            "measured_bytes", "fallbacks", "notes", "weight_rel_error")  # fmt: skip
    for recipe, entry in result["recipes"].items():
        d = work / f"report-{recipe}"
        report = json.loads((d / "report.json").read_text())
        if (d / "quant.json").exists():
            quant = json.loads((d / "quant.json").read_text())
        else:  # a run before quant.json was written: its rows carry the same fields
            quant = {
                f"{recipe}:{r['algorithm']}": {k: r.get(k) for k in keep}
                for r in entry["candidates"]
            }
        for spec, q in quant.items():
            ckpt = work / spec.replace(":", "-")
            if q.get("weight_rel_error") is None and ckpt.is_dir():
                q["weight_rel_error"] = weight_error(ckpt, demo_model_dir())
        entry["candidates"] = _rows(report, quant)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks._memwatch
    main()

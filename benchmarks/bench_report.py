"""Cost of ``omniquant report``: evaluation throughput, and peak memory with three candidates.

Run: ``pytest benchmarks/bench_report.py --benchmark-enable -s`` (not part of the
default test command). Single-threaded torch throughout: on a shared 2-core machine
oversubscribed OpenMP threads make small forwards erratic by orders of magnitude.

* Throughput: the tiny model, BF16 baseline + three candidates (fp8_omni, nvfp4_omni,
  nvfp4_aggressive) on ``omni-smoke``; samples/s per model and for the whole report.
* Memory: the ``bench`` preset of ``make_tiny`` (~320M parameters, ~650 MB in BF16), so
  the model, not the Python runtime, dominates. Peak RSS (``VmHWM``) of a fresh
  process above its footprint after imports, for: one model loaded with serving
  numerics and evaluated on the task set ("one model"), the report with one
  candidate, the report with three. The report's policy (one model in memory at a
  time) makes the last two about the first, not three times it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

RECIPES = ("fp8_omni", "nvfp4_omni", "nvfp4_aggressive")
# Small calibration: the benchmark measures the report, not calibration quality.
QUANT_OVERRIDES = ["calibration.size=4", "calibration.expert_coverage.policy=warn"]

_PRELUDE = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import modelopt.torch.quantization  # imported by every path below; part of the base footprint
from omniquant.experiments.compare import build_report
from omniquant.evaluate.emulated import load_emulated
from omniquant.evaluate.runner import evaluate_model
from omniquant.evaluate.tasks import prepare_task_items, validate_task_set
from omniquant.data.processing import OmniProcessor
def _rss_mb():
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a big pytest process
    # would start at its parent's peak.
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
_base = _rss_mb()
_t0 = time.perf_counter()
"""


def _measure(body: str) -> dict:
    """Run ``body`` after the prelude in a fresh process; peak RSS above the post-import base."""
    code = (
        _PRELUDE
        + textwrap.dedent(body)
        + (
            "\nprint('MEASURE ' + json.dumps({'base_mb': _base, 'peak_mb': _rss_mb(), "
            "'seconds': time.perf_counter() - _t0, **globals().get('extra', {})}))\n"
        )
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEASURE ")][-1]
    result = json.loads(line[len("MEASURE ") :])
    result["delta_mb"] = result["peak_mb"] - result["base_mb"]
    return result


def _checkpoints(root: Path, size: str) -> tuple[Path, list[Path]]:
    import contextlib
    import io

    import torch

    from omniquant.demo.tiny import make_tiny
    from omniquant.quantize.pipeline import quantize

    torch.set_num_threads(1)
    base = make_tiny(root / "model", seed=0, size=size)
    cands = []
    for recipe in RECIPES:
        with contextlib.redirect_stdout(io.StringIO()):
            cands.append(
                quantize(
                    base, recipe, root / recipe, calib="synthetic", overrides=QUANT_OVERRIDES
                ).out
            )
    return base, cands


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    return _checkpoints(tmp_path_factory.mktemp("bench_report_tiny"), "tiny")


@pytest.fixture(scope="module")
def bench_ckpts(tmp_path_factory):
    return _checkpoints(tmp_path_factory.mktemp("bench_report_bench"), "bench")


def test_bench_report_throughput_tiny(benchmark, tiny_ckpts, tmp_path):
    import torch

    from omniquant.experiments.compare import build_report

    base, cands = tiny_ckpts
    torch.set_num_threads(1)
    runs = iter(range(100))

    def run():
        start = time.perf_counter()
        report = build_report(
            base, cands, "omni-smoke", tmp_path / f"r{next(runs)}", max_new_tokens=8, bootstrap=1000
        )
        return report, time.perf_counter() - start

    report, wall = benchmark.pedantic(run, rounds=2, iterations=1)
    models = [report["baseline"], *report["candidates"]]
    per_model = {m["name"]: m["evaluation"]["samples_per_s"] for m in models}
    samples = sum(m["evaluation"]["samples"] for m in models)
    benchmark.extra_info.update(
        samples_per_s=per_model, report_seconds=round(wall, 2), evaluated_samples=samples
    )
    print(
        f"\nreport on tiny, 1 baseline + 3 candidates, {report['task_set']['samples']} samples each: "
        f"{wall:.1f} s wall (incl. EVS sweep at 4 rates)"
    )
    for name, rate in per_model.items():
        print(f"  {name:<18} {rate:6.2f} samples/s (main evaluation)")


def test_bench_report_peak_memory_three_candidates(benchmark, bench_ckpts, tmp_path):
    base, cands = bench_ckpts
    common = "max_new_tokens=4, evs_rates=(0.0,), bootstrap=100"

    def run():
        one = _measure(f"""
            loaded = load_emulated({str(base)!r})
            items = prepare_task_items(OmniProcessor.from_pretrained({str(base)!r}), validate_task_set('omni-smoke'))
            ev = evaluate_model(loaded, items, keep_spans=True, max_new_tokens=4)
            extra = {{'samples_per_s': ev.samples_per_s}}
        """)
        single = _measure(f"""
            r = build_report({str(base)!r}, [{str(cands[1])!r}], 'omni-smoke', {str(tmp_path / "one")!r}, {common})
        """)
        three = _measure(f"""
            r = build_report({str(base)!r}, {[str(c) for c in cands]!r}, 'omni-smoke', {str(tmp_path / "three")!r},
                             {common}, force=True)
            extra = {{'samples_per_s': {{m['name']: m['evaluation']['samples_per_s']
                                         for m in [r['baseline'], *r['candidates']]}}}}
        """)
        return one, single, three

    one, single, three = benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = three["delta_mb"] / one["delta_mb"]
    benchmark.extra_info.update(
        one_model_mb=round(one["delta_mb"], 1),
        report_1_candidate_mb=round(single["delta_mb"], 1),
        report_3_candidates_mb=round(three["delta_mb"], 1),
        ratio_3_candidates_to_one_model=round(ratio, 3),
        samples_per_s=three.get("samples_per_s"),
        report_3_seconds=round(three["seconds"], 1),
    )
    print(f"\nbench model (~650 MB BF16), peak RSS above imports ({one['base_mb']:.0f} MB):")
    print(f"  one model loaded + evaluated : {one['delta_mb']:8.1f} MB  ({one['seconds']:.1f} s)")
    print(
        f"  report, 1 candidate          : {single['delta_mb']:8.1f} MB  ({single['seconds']:.1f} s)"
    )
    print(
        f"  report, 3 candidates         : {three['delta_mb']:8.1f} MB  ({three['seconds']:.1f} s)"
    )
    print(f"  ratio 3 candidates / one model: {ratio:.2f}")
    print(f"  samples/s: {three.get('samples_per_s')}")
    # The policy under measurement: memory does not grow with the number of candidates.
    assert three["delta_mb"] < 1.25 * single["delta_mb"]

"""Issue 26's speed numbers, as ratios measured in one run (pytest-benchmark, one JSON).

One command writes ``benchmarks/results/bench_speed.json`` (every section, machine load
beside each) and regenerates the README speed table from it
(``benchmarks/render_readme_table.py``):

    python3 -m benchmarks.bench_speed --slice-model /tmp/slice   # ~15-20 min, quiet box

``--skip slice,cliff`` leaves sections out (recorded as not measured); ``--slice-json F``
takes the slice section from a ``bench_slice --json`` file instead of running it. Without
``--slice-model`` (and no ``--slice-json``) the slice is skipped. The slice needs
``omniquant make-tiny --size slice --out /tmp/slice`` first (~1 min, 6.8 GiB, ~12 GB RAM
while running).

Or as pytest-benchmark tests (the main job takes minutes; the machine should be quiet):

    python3 -m pytest benchmarks/bench_speed.py --benchmark-enable -s \\
        --benchmark-json speed.json

Each test records its numbers in ``extra_info`` (the JSON's ``benchmarks[].extra_info``):

- ``test_emulated_eval_per_precision``: the bundled demo model as BF16, and exported as
  FP8 (``fp8_omni``) and NVFP4 (``nvfp4_aggressive``), all loaded once with serving
  numerics, evaluated on the demo task set in interleaved rounds (BF16, FP8, NVFP4, ...)
  so load drifts hit all three alike. Samples/s per precision, and wall and process-CPU
  time as multiples of BF16's (goals: NVFP4 <= 1.3x, FP8 <= 1.15x). CPU time is the
  steadier number on a shared machine.
- ``test_export_against_plain_copy``: ``write_checkpoint`` of a calibrated random
  ~340M-parameter model (``fp8_omni`` and ``nvfp4_omni``) against a plain read + write
  of the same source bytes on the same disk (goal: within 3x), MB of source per second.
- ``test_plan_released_config``: ``omniquant plan`` wall time in a fresh process on the
  config-only released model (goal: <= 5 s), with the import share (``python -X
  importtime``'s cumulative time of the modules ``plan`` imports).
- ``test_cliff_wall_time`` (marked slow, and runs only with ``OMNIQUANT_BENCH_CLIFF=1``):
  ``omniquant cliff`` on the demo in a fresh process, with quantize and evaluate phases
  from its log (goal: <= 60 s).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: Interleaved evaluation rounds per precision.
EVAL_ROUNDS = 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory):
    from omniquant.demo import DEMO_CALIB, demo_model_dir
    from omniquant.quantize.pipeline import quantize

    root = tmp_path_factory.mktemp("speed")
    out = {"bf16": demo_model_dir()}
    for name, recipe in (("fp8", "fp8_omni"), ("nvfp4", "nvfp4_aggressive")):
        out[name] = quantize(demo_model_dir(), recipe, root / recipe, calib=DEMO_CALIB).out
    return out


def _eval_ratios(paths: dict, rounds: int) -> dict:
    from omniquant.data.processing import OmniProcessor
    from omniquant.demo import DEMO_TASKS
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.runner import evaluate_model
    from omniquant.evaluate.tasks import prepare_task_items, validate_task_set

    items = prepare_task_items(
        OmniProcessor.from_pretrained(paths["bf16"]), validate_task_set(DEMO_TASKS)
    )
    models = {k: load_emulated(p) for k, p in paths.items()}
    wall = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for k, loaded in models.items():
            w, c = time.perf_counter(), time.process_time()
            evaluate_model(loaded, items)
            wall[k] += time.perf_counter() - w
            cpu[k] += time.process_time() - c
    info = {"samples": len(items), "rounds": rounds}
    for k in models:
        info[f"{k}_samples_per_s"] = round(rounds * len(items) / wall[k], 2)
        info[f"{k}_wall_x_bf16"] = round(wall[k] / wall["bf16"], 3)
        info[f"{k}_cpu_x_bf16"] = round(cpu[k] / cpu["bf16"], 3)
    return info


def test_emulated_eval_per_precision(benchmark, demo_checkpoints):
    info = benchmark.pedantic(
        _eval_ratios, args=(demo_checkpoints, EVAL_ROUNDS), rounds=1, iterations=1
    )
    benchmark.extra_info.update(info)
    print(f"\nemulated eval: {info}")
    assert info["bf16_wall_x_bf16"] == 1.0


def _plain_copy_seconds(src: Path, dst: Path) -> float:
    """Read every source shard and write its bytes to ``dst`` (fsync-free, as the export)."""
    dst.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
            while chunk := fin.read(16 << 20):
                fout.write(chunk)
    return time.perf_counter() - t


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_export_against_plain_copy(benchmark, tmp_path, recipe):
    import modelopt.torch.quantization as mtq

    from omniquant.demo.tiny import make_tiny
    from omniquant.models import load_model
    from omniquant.quantize.calibrate import run_calibration
    from omniquant.quantize.export import write_checkpoint
    from omniquant.quantize.pipeline import load_calibration_samples
    from omniquant.quantize.plan import resolve_plan, to_modelopt_config
    from omniquant.quantize.recipe import load_recipe

    model = make_tiny(tmp_path / "model", seed=0, size="bench")
    rec, _ = load_recipe(recipe)
    loaded = load_model(model)
    plan = resolve_plan(rec, loaded)
    cfg = to_modelopt_config(plan, rec)
    samples, _ = load_calibration_samples(loaded, "synthetic", 2, 0)
    root = loaded.adapter.quant_root(loaded.model)
    run_calibration(loaded, samples, lambda loop: mtq.quantize(root, cfg, loop))
    gc.collect()
    source = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    copy_s = _plain_copy_seconds(model, tmp_path / "copy")
    t = time.perf_counter()
    benchmark.pedantic(write_checkpoint, args=(loaded, plan, tmp_path / "out"), rounds=1)
    export_s = time.perf_counter() - t
    info = {
        "source_bytes": source,
        "export_s": round(export_s, 2),
        "plain_copy_s": round(copy_s, 2),
        "export_mb_per_s": round(source / export_s / 1e6, 1),
        "plain_copy_mb_per_s": round(source / copy_s / 1e6, 1),
        "export_x_plain_copy": round(export_s / copy_s, 2),
    }
    benchmark.extra_info.update(info)
    print(f"\n{recipe} export: {info}")


def _importtime_share(stderr: str) -> float:
    """Seconds of top-level imports in ``python -X importtime`` output."""
    total = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)\S", line)
        if m and not m.group(2):  # top-level imports only (no indent)
            total += int(m.group(1))
    return total / 1e6


def test_plan_released_config(benchmark, tmp_path):
    from omniquant.demo.tiny import write_config_only

    cfg = write_config_only(tmp_path / "config-only")
    cmd = [sys.executable, "-X", "importtime", "-m", "omniquant", "plan", "--model", str(cfg),
           "--recipe", "nvfp4_omni"]  # fmt: skip

    def run():
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return time.perf_counter() - t, done.stderr

    seconds, stderr = benchmark.pedantic(run, rounds=1, iterations=1)
    imports = _importtime_share(stderr)
    info = {"plan_wall_s": round(seconds, 2), "imports_s": round(imports, 2),
            "imports_share": round(imports / seconds, 3)}  # fmt: skip
    benchmark.extra_info.update(info)
    print(f"\nplan: {info}")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("OMNIQUANT_BENCH_CLIFF") != "1", reason="set OMNIQUANT_BENCH_CLIFF=1"
)
def test_cliff_wall_time(benchmark, tmp_path):
    out = tmp_path / "cliff"
    cmd = [sys.executable, "-m", "omniquant", "cliff", "--out", str(out)]

    def run():
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return time.perf_counter() - t, done.stdout + done.stderr

    seconds, log = benchmark.pedantic(run, rounds=1, iterations=1)
    rates = dict(re.findall(r"(?:baseline|candidate) (\S+): [^\n]*?([\d.]+) samples/s", log))
    info = {"cliff_wall_s": round(seconds, 1), "eval_samples_per_s": rates}
    benchmark.extra_info.update(info)
    print(f"\ncliff: {info}")
    shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------ one command, one JSON
SECTIONS = ("eval", "export", "plan", "cliff", "slice")
RESULTS = REPO / "benchmarks" / "results" / "bench_speed.json"


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _section(fn, *args) -> dict:
    import torch

    before = _load_average()
    threads = torch.get_num_threads()
    t = time.perf_counter()
    out = fn(*args)
    out["section_wall_s"] = round(time.perf_counter() - t, 1)
    out["load_average_before"], out["load_average_after"] = before, _load_average()
    out["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["torch_threads"] = threads
    return out


def _eval_section(root: Path) -> dict:
    from omniquant.demo import DEMO_CALIB, demo_model_dir
    from omniquant.quantize.pipeline import quantize

    paths = {"bf16": demo_model_dir()}
    for name, recipe in (("fp8", "fp8_omni"), ("nvfp4", "nvfp4_aggressive")):
        paths[name] = quantize(demo_model_dir(), recipe, root / recipe, calib=DEMO_CALIB).out
    return _eval_ratios(paths, EVAL_ROUNDS)


def _export_section(root: Path) -> dict:
    """The bench-size model's export against a plain copy, in a child (pytest's test)."""
    out = {}
    for recipe in ("fp8_omni", "nvfp4_omni"):
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             f"{Path(__file__).resolve()}::test_export_against_plain_copy[{recipe}]",
             "--benchmark-enable", f"--basetemp={root / recipe}"],
            capture_output=True, text=True, check=True, cwd=REPO,
        )  # fmt: skip
        line = re.search(rf"{recipe} export: (\{{.*\}})", done.stdout)
        out[recipe] = json.loads(line.group(1).replace("'", '"'))
    return out


def _plan_section(root: Path) -> dict:
    from omniquant.demo.tiny import write_config_only

    cfg = write_config_only(root / "config-only")
    cmd = [sys.executable, "-m", "omniquant", "plan", "--model", str(cfg), "--recipe", "nvfp4_omni"]
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"plan_wall_s": round(time.perf_counter() - t, 2)}


def _cliff_section(root: Path) -> dict:
    cmd = [sys.executable, "-m", "omniquant", "cliff", "--out", str(root / "cliff")]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    rates = dict(re.findall(r"(?:baseline|candidate) (\S+): [^\n]*?([\d.]+) samples/s", log))
    return {"cliff_wall_s": round(time.perf_counter() - t, 1), "eval_samples_per_s": rates}


def _slice_section(model: Path, root: Path) -> dict:
    from benchmarks.bench_slice import run_all

    return run_all(model, 2, root / "slice")


def summarize_slice(res: dict) -> dict:
    """The slice numbers the README table shows, from a ``bench_slice`` result."""
    out = {"bf16_bytes": res["bf16_bytes"], "plain_read_write": res.get("plain_read_write")}
    for recipe in ("fp8_omni", "nvfp4_omni"):
        o, m = res["runs"].get(f"omniquant/{recipe}"), res["runs"].get(f"modelopt/{recipe}")
        if o is None or m is None or f"overhead_{recipe}" not in res:
            continue
        out[recipe] = {
            "omniquant_s": round(o["seconds"], 1),
            "modelopt_s": round(m["seconds"], 1),
            "omniquant_all_s": [round(x, 1) for x in o.get("all_seconds", [o["seconds"]])],
            "modelopt_all_s": [round(x, 1) for x in m.get("all_seconds", [m["seconds"]])],
            "overhead": round(res[f"overhead_{recipe}"], 3),
            "phase_ratios": {k: round(v, 3) for k, v in res.get(f"phase_ratios_{recipe}", {}).items()},
            "omniquant_export_s": round(o["phases"]["export"], 1),
            "modelopt_export_s": round(m["phases"]["export"], 1),
            "export_x_floor": {k: round(v, 2) for k, v in res.get(f"export_x_floor_{recipe}", {}).items()},
            "omniquant_rss_x_bf16": round(o.get("rss_peak_ratio_max", o["rss_peak_ratio"]), 3),
            "modelopt_rss_x_bf16": round(m.get("rss_peak_ratio_max", m["rss_peak_ratio"]), 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="issue 26's speed benchmark: one JSON, README table")
    ap.add_argument("--skip", default="", help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--slice-model", type=Path, default=None, help="make-tiny --size slice dir")
    ap.add_argument("--slice-json", type=Path, action="append", default=None,
                    help="a bench_slice --json result (repeatable: a later file's recipes win; "
                    "each recipe's ratios stay from one invocation)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README's table")
    ap.add_argument("--update", action="store_true",
                    help="keep the sections of the existing --json that this run skips")  # fmt: skip
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    res: dict = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "cpus": os.cpu_count(), "sections": {}}  # fmt: skip
    if args.update and args.json.is_file():
        res["sections"] = json.loads(args.json.read_text()).get("sections", {})
    with tempfile.TemporaryDirectory(prefix="omniquant-bench-speed-") as tmp:
        root = Path(tmp)
        runs = {"eval": (_eval_section, root / "eval"), "export": (_export_section, root / "export"),
                "plan": (_plan_section, root / "plan"), "cliff": (_cliff_section, root)}  # fmt: skip
        for name, (fn, arg) in runs.items():
            if name not in skip:
                arg.mkdir(parents=True, exist_ok=True)
                res["sections"][name] = _section(fn, arg)
                print(f"{name}: {res['sections'][name]}", flush=True)
        if "slice" not in skip and args.slice_json is not None:
            merged: dict = {}
            for f in args.slice_json:
                one = summarize_slice(json.loads(f.read_text()))
                stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(f.stat().st_mtime))
                for recipe in ("fp8_omni", "nvfp4_omni"):
                    if recipe in one:
                        one[recipe]["measured_at"] = stamp
                merged.update(one)
            merged["source"] = ", ".join(f.name for f in args.slice_json)
            res["sections"]["slice"] = merged
        elif "slice" not in skip and args.slice_model is not None:
            res["sections"]["slice"] = _section(
                lambda: summarize_slice(_slice_section(args.slice_model, root))
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    if not args.no_readme:
        from benchmarks.render_readme_table import update_readme

        update_readme(args.json, REPO / "README.md")
    return res


if __name__ == "__main__":
    main()

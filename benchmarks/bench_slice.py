"""omniquant's overhead over bare modelopt on a real-width slice, phase by phase, on the CPU.

Run (heavy: 6.8 GiB checkpoint, ~12 GB peak; under the shared lock on the project box):

    omniquant make-tiny --size slice --out /tmp/slice
    flock /tmp/omniquant-heavy.lock python3 -m benchmarks.bench_slice --model /tmp/slice \\
        --samples 2 --json slice.json

or ``python3 -m pytest benchmarks/bench_slice.py --benchmark-enable -s`` with
``OMNIQUANT_SLICE_DIR`` set (skipped otherwise).

For each recipe (``fp8_omni``, ``nvfp4_omni``) fresh processes, two of each kind in
the order omniquant, modelopt, modelopt, omniquant (``ORDER``; per kind the faster run
counts), run the same model and the same calibration forward (``synthetic`` samples, the adapter's forward, no
forced expert routing in either, so both see the same tokens):

- ``omniquant``: ``omniquant.quantize.pipeline.quantize`` (load, plan, calibration data,
  calibration forward, the rest of ``mtq.quantize``, streaming export, audit), with the
  coverage policy ``warn`` (a short run leaves experts without tokens).
- ``modelopt``: the same ``from_pretrained`` load, ``mtq.quantize(language_model,
  same config, same loop)`` and modelopt's ``export_hf_checkpoint(language_model)``.

Each process reports wall seconds per phase, CPU seconds (cores busy = CPU / wall),
forward seconds per block type (Mamba, MoE, attention layers, vision blocks, audio
layers, lm_head, the rest), and its memory: the peak resident set (``VmHWM``) and the
peak of anonymous memory (``RssAnon``, sampled every 5 ms), both minus the process's
memory after imports, as multiples of the checkpoint's BF16 bytes. The overhead ratio is
omniquant's total over modelopt's total, measured in the same invocation. The I/O floor
(a plain read and write of the source) is measured twice and the faster counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks._memwatch import _PRELUDE

RECIPES = ("fp8_omni", "nvfp4_omni")

#: Installed in the measured process: forward wall/CPU seconds per block type.
_TIMER = """
import time as _time
_BLOCK = {}
def _install_block_timer(model):
    types = list(model.config.text_config.layers_block_type)
    kinds = {"linear_attention": "mamba_layer", "moe": "moe_layer", "full_attention": "attention_layer"}
    picked = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        if name.startswith("language_model.model.layers.") and len(parts) == 4:
            picked[name] = kinds.get(types[int(parts[3])], types[int(parts[3])])
        elif name.startswith("vision_model.encoder.layer.") and len(parts) == 4:
            picked[name] = "vision_block"
        elif name.startswith("audio_tower.layers.") and len(parts) == 3:
            picked[name] = "audio_layer"
        elif name == "language_model.lm_head":
            picked[name] = "lm_head"
    mods = dict(model.named_modules())
    for name, kind in picked.items():
        slot = _BLOCK.setdefault(kind, {"calls": 0, "wall": 0.0, "cpu": 0.0, "modules": 0})
        slot["modules"] += 1
        def pre(_m, _a, slot=slot):
            _m._bench_t = (_time.perf_counter(), _time.process_time())
        def post(_m, _a, _o, slot=slot):
            w, c = _m._bench_t
            slot["calls"] += 1
            slot["wall"] += _time.perf_counter() - w
            slot["cpu"] += _time.process_time() - c
        mods[name].register_forward_pre_hook(pre)
        mods[name].register_forward_hook(post)
"""

_OMNI = """
import omniquant.models as _models
_orig_load = _models.load_model
def _load(*a, **k):
    loaded = _orig_load(*a, **k)
    _install_block_timer(loaded.model)
    return loaded
_models.load_model = _load
# Export broken down: modelopt's per-layer export, and the writer thread's shard writes
# (hashing included; they overlap the export), with the writer's CPU seconds; the rest is
# reading source tensors and bookkeeping.
import omniquant.quantize.export as _ex, resource as _rs
from omniquant.checkpoint.safetensors_file import SafetensorsWriter as _SW
_EXPORT = {"modelopt_layers": 0.0, "write_shards": 0.0, "write_shards_cpu": 0.0}
def _thread_cpu(key, fn):
    def wrapper(*a, **k):
        r = _rs.getrusage(_rs.RUSAGE_THREAD)
        try:
            return fn(*a, **k)
        finally:
            q = _rs.getrusage(_rs.RUSAGE_THREAD)
            _EXPORT[key] += q.ru_utime - r.ru_utime + q.ru_stime - r.ru_stime
    return wrapper
def _timed(key, fn):
    def wrapper(*a, **k):
        t = _time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _EXPORT[key] += _time.perf_counter() - t
    return wrapper
_ex._LayerwiseQuantExport.export = _timed("modelopt_layers", _ex._LayerwiseQuantExport.export)
_SW.write = _timed("write_shards", _thread_cpu("write_shards_cpu", _SW.write))
from omniquant.quantize.pipeline import quantize
_c0 = _time.process_time()
res = quantize(MODEL, RECIPE, OUT, calib="synthetic", force=True, device="cpu",
               overrides=[f"calibration.size={SAMPLES}", "calibration.expert_coverage.policy=warn"])
_RESULT = {"phases": res.timings, "cpu_seconds": _time.process_time() - _c0, "blocks": _BLOCK,
           "export_breakdown": _EXPORT,
           "tokens": res.manifest["calibration"]["tokens_by_modality"],
           "shard_bytes": sum(p.stat().st_size for p in Path(OUT).glob("*.safetensors"))}
"""

_BARE = """
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from omniquant.models import load_model
from omniquant.quantize.plan import resolve_plan, to_modelopt_config
from omniquant.quantize.pipeline import load_calibration_samples
from omniquant.quantize.recipe import load_recipe
phases = {}
_c0 = _time.process_time()
t = _time.perf_counter()
loaded = load_model(MODEL)
phases["load"] = _time.perf_counter() - t
_install_block_timer(loaded.model)
rec, _ = load_recipe(RECIPE)
# The recipe's modelopt config, as omniquant would hand it over: the same quantizers.
t = _time.perf_counter()
cfg = to_modelopt_config(resolve_plan(rec, loaded), rec)
samples, _ = load_calibration_samples(loaded, "synthetic", SAMPLES, rec.calibration.seed)
phases["calibration_data"] = _time.perf_counter() - t
root = loaded.model.language_model
loop_s = [0.0]
def loop(_m=None):
    t0 = _time.perf_counter()
    with torch.no_grad():
        for s in samples:
            loaded.adapter.forward(loaded.model, s)
    loop_s[0] += _time.perf_counter() - t0
t = _time.perf_counter()
mtq.quantize(root, cfg, loop)
phases["calibration_forward"] = loop_s[0]
phases["quantize_other"] = _time.perf_counter() - t - loop_s[0]
t = _time.perf_counter()
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    export_hf_checkpoint(root, export_dir=OUT)
phases["export"] = _time.perf_counter() - t
_RESULT = {"phases": phases, "cpu_seconds": _time.process_time() - _c0, "blocks": _BLOCK,
           "shard_bytes": sum(p.stat().st_size for p in Path(OUT).glob("*.safetensors"))}
"""


def _run(kind: str, model: Path, recipe: str, samples: int, out: Path, threads: int | None) -> dict:
    body = {"omniquant": _OMNI, "modelopt": _BARE}[kind]
    code = (
        _PRELUDE
        + "import torch\nfrom pathlib import Path\n"
        + (f"torch.set_num_threads({threads})\n" if threads else "")
        + _TIMER
        + f"MODEL, RECIPE, OUT, SAMPLES = {str(model)!r}, {recipe!r}, {str(out)!r}, {samples}\n"
        + "import modelopt.torch.quantization, transformers\n"
        + "_base = _read()\nthreading.Thread(target=_sample, daemon=True).start()\n"
        + "_t0 = _time.perf_counter()\n"
        + textwrap.dedent(body)
        + "\n_RESULT['seconds'] = _time.perf_counter() - _t0\ntime.sleep(0.02)\n"
        + "_hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        + "_RESULT.update(rss_base=_base['VmRSS'], anon_base=_base['RssAnon'], rss_peak=_hwm,"
        + " anon_peak=_peak['RssAnon'], threads=torch.get_num_threads())\n"
        + "print('SLICE ' + json.dumps(_RESULT))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {recipe} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SLICE ")][-1]
    return json.loads(line[len("SLICE ") :])


def plain_read_write(model: Path, scratch: Path) -> dict:
    """The I/O floor: read every source shard and write its bytes back out (16 MiB chunks,
    no fsync, as the exports), reading and writing seconds kept apart so that a recipe's
    floor is ``read_s + write_s * its output bytes / source bytes``."""
    out = scratch / "plain_copy"
    out.mkdir(parents=True, exist_ok=True)
    read_s = write_s = 0.0
    total = 0
    try:
        for f in sorted(Path(model).glob("*.safetensors")):
            with open(f, "rb") as fin, open(out / f.name, "wb") as fout:
                while True:
                    t = time.perf_counter()
                    chunk = fin.read(16 << 20)
                    read_s += time.perf_counter() - t
                    if not chunk:
                        break
                    t = time.perf_counter()
                    fout.write(chunk)
                    write_s += time.perf_counter() - t
                    total += len(chunk)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"bytes": total, "read_s": read_s, "write_s": write_s}


def floor_seconds(floor: dict, out_bytes: int) -> float:
    """Plain read of the source plus plain write of ``out_bytes``, at the measured speeds."""
    return floor["read_s"] + floor["write_s"] * out_bytes / max(floor["bytes"], 1)


#: Phases both runs report, compared one to one.
COMPARED_PHASES = ("load", "calibration_forward", "quantize_other", "export")


def bf16_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))


#: Run order per recipe: each kind twice, ABBA. On this sandbox the same write costs from
#: 0.4 to 4.3 s of system time for 1.6 GB depending on what the file system did before
#: (measured: four saves of the same tensors in one process), so whichever process runs
#: second after a delete writes faster; ABBA gives each kind both positions.
ORDER = ("omniquant", "modelopt", "modelopt", "omniquant")


def run_all(
    model: Path, samples: int, scratch: Path, recipes=RECIPES, threads=None, save=None,
    order=ORDER,
) -> dict:  # fmt: skip
    """Both recipes, omniquant and bare modelopt in ``order``, each run a fresh process;
    per kind the faster of its runs is kept (every run's seconds in ``all_seconds``), and
    the ratios are taken once both kinds have all their runs. ``save(results)`` is called
    after every run (a run stopped at a time limit keeps what it measured)."""
    scratch.mkdir(parents=True, exist_ok=True)
    bf16 = bf16_bytes(model)
    results: dict = {"model": str(model), "bf16_bytes": bf16, "samples": samples, "runs": {}}
    floors = [plain_read_write(model, scratch) for _ in range(2)]
    results["plain_read_write"] = min(floors, key=lambda f: f["read_s"] + f["write_s"])
    results["plain_read_write"]["all_seconds"] = [f["read_s"] + f["write_s"] for f in floors]
    for recipe in recipes:
        left = {kind: order.count(kind) for kind in order}
        for kind in order:
            out = scratch / f"{kind}_{recipe}"
            r = _run(kind, model, recipe, samples, out, threads)
            r["rss_peak_ratio"] = (r["rss_peak"] - r["rss_base"]) / bf16
            r["anon_peak_ratio"] = (r["anon_peak"] - r["anon_base"]) / bf16
            r["cores_busy"] = r["cpu_seconds"] / r["seconds"]
            shutil.rmtree(out, ignore_errors=True)
            kept = results["runs"].get(f"{kind}/{recipe}")
            r["all_seconds"] = [*(kept["all_seconds"] if kept else []), r["seconds"]]
            # memory is not a matter of luck: the highest peak of the kind's runs counts
            r["rss_peak_ratio_max"] = max(r["rss_peak_ratio"], kept["rss_peak_ratio_max"] if kept else 0)
            if kept is not None and kept["seconds"] <= r["seconds"]:
                kept["all_seconds"] = r["all_seconds"]
                kept["rss_peak_ratio_max"] = r["rss_peak_ratio_max"]
            else:
                results["runs"][f"{kind}/{recipe}"] = r
            left[kind] -= 1
            if not any(left.values()):
                o = results["runs"][f"omniquant/{recipe}"]
                r = results["runs"][f"modelopt/{recipe}"]
                o = results["runs"][f"omniquant/{recipe}"]
                results[f"overhead_{recipe}"] = o["seconds"] / r["seconds"]
                results[f"phase_ratios_{recipe}"] = {
                    p: o["phases"][p] / r["phases"][p]
                    for p in COMPARED_PHASES
                    if p in o["phases"] and r["phases"].get(p)
                }
                floor = results["plain_read_write"]
                results[f"export_x_floor_{recipe}"] = {
                    k: run["phases"]["export"] / floor_seconds(floor, run["shard_bytes"])
                    for k, run in (("omniquant", o), ("modelopt", r))
                }
            if save is not None:
                save(results)
    return results


#: Modules of each block type in the released model (FIELD_NOTES): 52 text layers.
FULL_COUNTS = {"mamba_layer": 23, "moe_layer": 23, "attention_layer": 6, "vision_block": 32,
               "audio_layer": 24, "lm_head": 1}  # fmt: skip
FULL_BF16_BYTES = 61.50 * 2**30


def extrapolate(run: dict, bf16_bytes: int) -> dict:
    """CPU seconds for the released model from one slice run, by block counts and bytes.

    calibration forward = sum over block types of (seconds per module x modules in the
    released model) + the rest of the forward (embeddings, projectors, encoder stems,
    hooks: not per layer, kept as measured); load, the rest of ``mtq.quantize``, export and
    audit scale with the checkpoint's bytes (61.50 GiB / the slice's); plan is kept.
    """
    blocks = run["blocks"]
    per_module = {k: v["wall"] / max(v["modules"], 1) for k, v in blocks.items()}
    measured_blocks = sum(v["wall"] for v in blocks.values())
    rest = run["phases"]["calibration_forward"] - measured_blocks
    forward = sum(per_module.get(k, 0.0) * n for k, n in FULL_COUNTS.items()) + rest
    scale = FULL_BF16_BYTES / bf16_bytes
    ph = run["phases"]
    by_bytes = sum(ph.get(k, 0.0) for k in ("load", "quantize_other", "export", "audit")) * scale
    fixed = sum(ph.get(k, 0.0) for k in ("plan", "calibration_data"))
    return {
        "calibration_forward_s": forward,
        "load_quantize_export_s": by_bytes,
        "fixed_s": fixed,
        "total_s": forward + by_bytes + fixed,
        "per_module_s": per_module,
        "rest_of_forward_s": rest,
        "bytes_scale": scale,
    }


def render(results: dict) -> str:
    """A markdown table: phases in seconds, memory as multiples of BF16 bytes."""
    phases = ("load", "plan", "calibration_data", "calibration_forward", "quantize_other", "export", "audit")
    head = "| run | " + " | ".join(phases) + " | total s | cores busy | peak RSS / BF16 | peak anon / BF16 |"
    lines = [head, "|" + "---|" * (len(phases) + 5)]
    for name, r in results["runs"].items():
        cells = [f"{r['phases'].get(p, 0.0):.1f}" if p in r["phases"] else "-" for p in phases]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['seconds']:.1f} | {r['cores_busy']:.2f} | "
            f"{r['rss_peak_ratio']:.2f} | {r['anon_peak_ratio']:.2f} |"
        )
    for name, r in results["runs"].items():
        if "export_breakdown" in r:
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in r["export_breakdown"].items())
            lines.append(f"\n{name} export: {parts} of {r['phases']['export']:.1f}s")
    for recipe in RECIPES:
        if f"overhead_{recipe}" in results:
            lines.append(f"\n{recipe}: omniquant / bare modelopt wall time = {results[f'overhead_{recipe}']:.2f}")
    if "plain_read_write" in results:
        f = results["plain_read_write"]
        lines.append(
            f"\nplain read + write of the source ({f['bytes'] / 2**30:.2f} GiB): read {f['read_s']:.1f}s, "
            f"write {f['write_s']:.1f}s"
        )
    for recipe in RECIPES:
        if f"phase_ratios_{recipe}" in results:
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in results[f"phase_ratios_{recipe}"].items())
            floor = ", ".join(f"{k} {v:.2f}x" for k, v in results[f"export_x_floor_{recipe}"].items())
            lines.append(f"- {recipe}: omniquant / modelopt per phase: {ratios}; export / I/O floor: {floor}")
    lines.append("\nforward seconds per block type (per module, summed over samples; cores busy):")
    for name, r in results["runs"].items():
        blocks = ", ".join(
            f"{k} {v['wall'] / max(v['modules'], 1):.2f}s/module x{v['modules']} ({v['cpu'] / max(v['wall'], 1e-9):.2f})"
            for k, v in sorted(r["blocks"].items())
        )
        lines.append(f"- {name}: {blocks}")
    lines.append("\nreleased model on this CPU, extrapolated (see extrapolate()):")
    for name, r in results["runs"].items():
        e = extrapolate(r, results["bf16_bytes"])
        lines.append(
            f"- {name}: calibration forward {e['calibration_forward_s'] / 60:.1f} min + load/quantize/"
            f"export/audit {e['load_quantize_export_s'] / 60:.1f} min + fixed {e['fixed_s']:.0f} s = "
            f"{e['total_s'] / 3600:.2f} h for {results['samples']} samples"
        )
    return "\n".join(lines)


@pytest.mark.skipif(not os.environ.get("OMNIQUANT_SLICE_DIR"), reason="set OMNIQUANT_SLICE_DIR to a slice checkpoint")
def test_slice_overhead(benchmark, tmp_path):
    model = Path(os.environ["OMNIQUANT_SLICE_DIR"])
    res = benchmark.pedantic(run_all, args=(model, 2, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if k.startswith("overhead_")})
    print("\n" + render(res))
    assert all(r["shard_bytes"] > 0 for r in res["runs"].values())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="checkpoint (make-tiny --size slice)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/omniquant-bench-slice"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    def save(res: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(render(res), flush=True)

    res = run_all(
        args.model, args.samples, args.scratch, tuple(args.recipes.split(",")), args.threads, save
    )
    return res


if __name__ == "__main__":
    main()

"""Export memory during write_checkpoint against shard size and total bytes.

Run: ``python3 -m pytest benchmarks/bench_export.py --benchmark-enable -s`` (or
``python3 -m benchmarks.bench_export``). A random ~340M-parameter ``bench`` model is
written as 1 and as 8 shards; each is quantized (``fp8_omni``, 2 synthetic samples) in a
fresh process, and the growth of memory during ``write_checkpoint`` alone (peak during
export minus the level just before it; ``RssAnon`` sampled every 5 ms, and ``VmRSS``) is
reported next to the largest source shard and the total checkpoint bytes.

Measured once on the shared 2-core box (2026-12-02): growth 45 MB with 1 shard (676 MB)
and 46 MB with 8 shards (largest 92 MB), i.e. 0.07x the checkpoint; main's all-at-once
export (before streaming) gave 42 and 46 MB on the same model. On the CPU modelopt
exports in place, freeing each BF16 weight as its FP8 replacement is written, which
offsets the copies of the unquantized source tensors; in this model those are small, so
at this scale the benchmark bounds export growth but does not separate the two exports.
Where they differ is a model whose unquantized tensors are large (the released model's
towers, embeddings and lm_head: ~4 GiB, all held at once before) and a model on a GPU
(its quantized tensors were all gathered before writing; now one layer at a time).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks._memwatch import _PRELUDE

_BODY = """
import torch
from omniquant.models import load_model
from omniquant.quantize.recipe import load_recipe
from omniquant.quantize.plan import resolve_plan, to_modelopt_config
from omniquant.quantize.calibrate import run_calibration
from omniquant.quantize.pipeline import load_calibration_samples
from omniquant.quantize.export import write_checkpoint
import modelopt.torch.quantization as mtq
rec, _ = load_recipe("fp8_omni")
loaded = load_model(MODEL)
plan = resolve_plan(rec, loaded)
cfg = to_modelopt_config(plan, rec)
samples, _ = load_calibration_samples(loaded, "synthetic", 2, 0)
root = loaded.model.language_model
run_calibration(loaded, samples, lambda loop: mtq.quantize(root, cfg, loop))
import gc; gc.collect()
threading.Thread(target=_sample, daemon=True).start()
time.sleep(0.05)
before = _read()
_peak.update(before)
t0 = time.perf_counter()
write_checkpoint(loaded, plan, Path(OUT))
dt = time.perf_counter() - t0
time.sleep(0.05)
print("EXPORT " + json.dumps({"seconds": dt, "anon_growth": _peak["RssAnon"] - before["RssAnon"],
                              "rss_growth": _peak["VmRSS"] - before["VmRSS"]}))
"""


def reshard(src: Path, dst: Path, n: int) -> Path:
    """``src`` (one ``model.safetensors``) rewritten as ``n`` shards with an index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    weight_map = {}
    with safe_open(src / "model.safetensors", "pt") as fh:
        names = list(fh.keys())
        sizes = {k: fh.get_slice(k).get_shape() for k in names}
        total = sum(_numel(s) for s in sizes.values())
        target, part, acc, i = total / n, [], 0, 0
        groups = []
        for k in names:  # by size, in key order
            part.append(k)
            acc += _numel(sizes[k])
            if acc >= target * (len(groups) + 1) and len(groups) < n - 1:
                groups.append(part)
                part = []
        groups.append(part)
        for i, keys in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: fh.get_tensor(k) for k in keys}, str(dst / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def measure_export(model: Path, out: Path) -> dict:
    code = _PRELUDE + f"from pathlib import Path\nMODEL, OUT = {str(model)!r}, {str(out)!r}\n" + _BODY
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("EXPORT ")][-1]
    res = json.loads(line[len("EXPORT ") :])
    shards = list(Path(model).glob("*.safetensors"))
    res.update(
        shards=len(shards),
        largest_shard=max(p.stat().st_size for p in shards),
        total_bytes=sum(p.stat().st_size for p in shards),
    )
    return res


def run(scratch: Path) -> dict:
    from omniquant.demo.tiny import make_tiny

    one = make_tiny(scratch / "one", seed=0, size="bench", force=True)
    eight = scratch / "eight"
    shutil.rmtree(eight, ignore_errors=True)
    reshard(one, eight, 8)
    results = {}
    for name, model in (("1 shard", one), ("8 shards", eight)):
        out = scratch / f"out_{name.replace(' ', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        results[name] = measure_export(model, out)
        shutil.rmtree(out, ignore_errors=True)
    return results


def render(results: dict) -> str:
    lines = [
        "| source | largest shard MB | total MB | anon growth MB | anon growth / largest shard | RSS growth MB | export s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['largest_shard'] / 1e6:.0f} | {r['total_bytes'] / 1e6:.0f} | "
            f"{r['anon_growth'] / 1e6:.0f} | {r['anon_growth'] / r['largest_shard']:.2f} | "
            f"{r['rss_growth'] / 1e6:.0f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def test_export_memory_follows_shard_size(benchmark, tmp_path):
    res = benchmark.pedantic(run, args=(tmp_path,), rounds=1, iterations=1)
    for name, r in res.items():
        benchmark.extra_info[name] = {
            "anon_growth_over_largest_shard": round(r["anon_growth"] / r["largest_shard"], 3),
            "anon_growth_over_total": round(r["anon_growth"] / r["total_bytes"], 3),
        }
    print("\n" + render(res))
    assert res["8 shards"]["shards"] == 8


if __name__ == "__main__":
    import tempfile

    print(render(run(Path(tempfile.mkdtemp()))))

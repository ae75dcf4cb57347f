"""Steps 5-8 of the GPU check: the quantize stage on the GPU, measured and cross-checked.

- ``quantize_measured``: one recipe on one source with ``--device``; time per phase, peak
  GPU and host memory (the runner resets both before the step) beside ``plan``'s estimate
  for the same device. The quantize stage audits its output itself (no second audit);
  the output is removed afterwards.
- ``cpu_vs_gpu``: the same source quantized on the CPU and on the GPU; shard hashes,
  and where they differ, tensors differing and the KL divergence of the emulated logits.
- ``auto_offload``: ``--device auto`` with a ``--max-memory`` below the model's size, so
  accelerate offloads; its shards against the CPU run's.
- ``algorithms``: ``cpu_vs_gpu`` once per calibration algorithm the project offers (a
  registry module, else the recipe schema's choices); recorded as not run where neither
  exists.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import typing
from pathlib import Path

QUANTIZE_OVERRIDES = ("calibration.expert_coverage.policy=force_all_experts",)


def _overrides(samples: int, extra=()) -> list[str]:
    return [f"calibration.size={samples}", *QUANTIZE_OVERRIDES, *extra]


def shard_hashes(ckpt: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ckpt.glob("*.safetensors"))
    }


def quantize_measured(
    src: Path, recipe: str, out: Path, device: str, samples: int, max_memory=None
) -> dict:
    """Step 5: quantize with timings and peaks beside the plan's estimate."""
    from benchmarks.gpu.runner import gpu_peaks, host_peak_bytes
    from omniquant.quantize.pipeline import quantize
    from omniquant.quantize.planner import plan_model

    report = plan_model(
        src, recipe, overrides=_overrides(samples), device=device, max_memory=max_memory
    )
    t0 = time.perf_counter()
    try:
        res = quantize(src, recipe, out, calib="synthetic", force=True, device=device, max_memory=max_memory,
                       overrides=_overrides(samples))  # fmt: skip
        seconds = time.perf_counter() - t0
        measured = {
            "seconds": round(seconds, 2),
            "phases": {k: round(v, 2) for k, v in (res.timings or {}).items()},
            "out_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
            "predicted_bytes": report.size.predicted_bytes,
            "peak_gpu_bytes": gpu_peaks(),
            "peak_host_bytes": host_peak_bytes(),
            "plan_estimate": {
                "devices": report.memory.to_json()["devices"],
                "weights_bytes": report.memory.weights_bytes,
                "activation_peak_bytes": report.memory.activation_peak_bytes,
            },
            "devices": res.manifest["devices"],
            "kernels": res.manifest["kernels"],
            "tokens": res.manifest["calibration"]["tokens_by_modality"],
            "shards": shard_hashes(out),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return measured


def _quantize(
    src: Path, recipe: str, out: Path, device: str, samples: int, extra=(), max_memory=None
):
    from omniquant.quantize.pipeline import quantize

    return quantize(src, recipe, out, calib="synthetic", force=True, device=device, max_memory=max_memory,
                    overrides=_overrides(samples, extra))  # fmt: skip


def _emulated_logits(ckpt: Path, n: int = 3):
    import torch

    from omniquant.data.synthetic import synthetic_samples
    from omniquant.evaluate.emulated import load_emulated

    served = load_emulated(ckpt, dtype="float32")
    with torch.no_grad():
        return [
            served.adapter.forward(served.model, s).logits.float()
            for s in synthetic_samples(served, n, seed=5)
        ]


def _same_bytes(x, y) -> bool:
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(
        x.reshape(-1).contiguous().view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8)
    )


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Shard hashes; where they differ, tensors differing and the KL of emulated logits."""
    import torch
    from safetensors.torch import load_file

    ha, hb = shard_hashes(a), shard_hashes(b)
    out: dict = {"identical": ha == hb, "shards": len(ha)}
    if ha == hb:
        return out
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    differing = [k for k in sorted(ta) if k not in tb or not _same_bytes(ta[k], tb[k])]
    kl = []
    for la, lb in zip(_emulated_logits(a), _emulated_logits(b)):
        p, q = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
        kl.append(float((p.exp() * (p - q)).sum(-1).mean()))
    out.update(tensors=len(ta), tensors_differing=len(differing), differing_examples=differing[:10],
               kl_mean_per_sample=kl, kl_max=max(kl))  # fmt: skip
    return out


def cpu_vs_gpu(src: Path, work: Path, gpu: str, recipes: list[str], samples: int, extra=()) -> dict:
    """Step 6: each recipe on the CPU and on ``gpu`` (``cpu`` in the rehearsal)."""
    rows = {}
    for recipe in recipes:
        a, b = work / f"{recipe}_cpu", work / f"{recipe}_{gpu.replace(':', '')}"
        try:
            _quantize(src, recipe, a, "cpu", samples, extra)
            _quantize(src, recipe, b, gpu, samples, extra)
            rows[recipe] = {"second_device": gpu, **compare_checkpoints(a, b)}
        finally:
            shutil.rmtree(a, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
    return {"recipes": rows}


def auto_offload(src: Path, work: Path, cuda: bool, samples: int, recipe: str = "fp8_omni") -> dict:
    """Step 7: ``--device auto`` with a budget below the model, against the CPU's bytes."""
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    # Half the weights on the GPU, the rest in CPU memory; without a GPU, a CPU budget
    # below the model sends the rest to disk.
    budget = f"0={size // 2}B,cpu=64GiB" if cuda else f"cpu={size // 2}B"
    ref, off = work / "offload_cpu", work / "offload_auto"
    try:
        _quantize(src, recipe, ref, "cpu", samples)
        res = _quantize(src, recipe, off, "auto", samples, max_memory=budget)
        dev = res.manifest["devices"]
        if not dev.get("offloaded"):
            raise RuntimeError(
                f"--max-memory {budget} for a {size} B model offloaded nothing: {dev}"
            )
        return {"max_memory": budget, "devices": dev, "vs_cpu": compare_checkpoints(ref, off)}
    finally:
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(off, ignore_errors=True)


def discover_algorithms() -> tuple[list[str], str] | None:
    """Calibration algorithms recipes can choose, and where the list came from."""
    import importlib

    try:
        mod = importlib.import_module("omniquant.quantize.algorithms")
    except ImportError:
        mod = None
    for attr in ("ALGORITHMS", "REGISTRY", "CALIBRATION_ALGORITHMS"):
        reg = getattr(mod, attr, None)
        if reg:
            return sorted(reg), f"omniquant.quantize.algorithms.{attr}"
    from omniquant.quantize.recipe import Quantization

    field = Quantization.model_fields.get("algorithm")
    if field is not None and typing.get_origin(field.annotation) is typing.Literal:
        return sorted(typing.get_args(field.annotation)), "recipe schema (Quantization.algorithm)"
    return None


def algorithms(src: Path, work: Path, gpu: str, samples: int, recipe: str = "fp8_omni") -> dict:
    """Step 8: CPU against GPU for each algorithm other than the default ``max`` (step 6)."""
    found = discover_algorithms()
    if found is None:
        return {"skipped": "no algorithm registry"}
    names, source = found
    rows = {}
    for name in [n for n in names if n != "max"]:
        try:
            rows[name] = cpu_vs_gpu(
                src, work, gpu, [recipe], samples, [f"quantization.algorithm={name}"]
            )["recipes"][recipe]
        except Exception as exc:  # noqa: BLE001 - one algorithm's failure is its row
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    return {"source": source, "algorithms": names, "recipe": recipe, "rows": rows}

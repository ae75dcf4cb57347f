"""One GPU check of omniquant on an H100/H200: quantize a real-width model at half depth on
``cuda``, audit it, and compare the NVFP4 serving emulation with modelopt's CUDA fake quant.

Run on the GPU host with ``benchmarks/gpu/run.sh`` (installs the carried wheels, no
network). Everything is written to one JSON file, rewritten after every step so a run
stopped at its time limit still leaves what it measured.

Steps:
1. ``build``: the released widths (hidden 2688, 128 experts, vocab 131072, RADIO and
   Parakeet at their widths) with the first ``--layers`` layers of the released pattern
   (26: 12 Mamba, 11 MoE, 3 attention) and half the encoder depth, random
   weights built on the GPU in BF16 (~31 GiB), saved in 5 GB shards.
2. ``quantize/<recipe>`` for ``fp8_omni`` and ``nvfp4_omni`` on ``--device``: wall
   seconds per phase, peak GPU memory (``torch.cuda.max_memory_allocated``) and peak
   host memory (``VmHWM``), the audit's verdict, output bytes. Each output is deleted
   after its audit (the 64 GiB disk holds the source and one output).
3. ``compare_nvfp4``: a smaller real-width model (``--compare-pattern``, default ``ME*E``)
   in float32 on the GPU, calibrated with ``nvfp4_omni`` through modelopt (CUDA fake
   quant), exported; the exported checkpoint loaded with omniquant's serving emulation
   (``omniquant.evaluate.emulated.load_emulated``) on the GPU; logits of the same samples compared.
   Verdict: bit-exact, or within the tolerance the tiny-model GPU test states (3e-2
   absolute on logits: ties at E2M1 boundaries may round differently), with the
   relative error and top-1 agreement recorded.

``--scale tiny --device cpu`` runs steps 1-2 on the tiny preset on the CPU (how the
CPU test exercises this file); step 3 needs CUDA and is recorded as skipped without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

TOLERANCE_ABS = 3e-2


def host_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def gpu_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


def reset_gpu_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def config_kwargs(scale: str, layers: int, pattern: str | None = None) -> dict:
    """Config kwargs: released widths (``real``) or the tiny preset (``tiny``)."""
    from omniquant.demo import tiny

    if scale == "tiny":
        kwargs = tiny.tiny_config_dict(tiny.SIZES["tiny"])
        if pattern:
            kwargs["text_config"]["layers_block_type"] = [tiny.PATTERN_BLOCK_TYPES[c] for c in pattern]
        return kwargs
    pat = pattern or tiny.RELEASED_PATTERN[:layers]
    return tiny.released_config_dict(pat, vision_layers=16 if not pattern else 2, audio_layers=12 if not pattern else 2)


def build(out: Path, kwargs: dict, device: str, dtype: str, seed: int = 0) -> dict:
    """Random omni model of ``kwargs`` built on ``device`` and saved to ``out`` (hub layout)."""
    import torch

    from omniquant.demo import tiny

    t0 = time.perf_counter()
    tokenizer = tiny.build_tokenizer()
    kwargs = json.loads(json.dumps(kwargs))
    kwargs["text_config"]["vocab_size"] = max(kwargs["text_config"]["vocab_size"], len(tokenizer))
    with torch.device(device):
        model = tiny._build_from_kwargs(kwargs, tokenizer, seed, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    tiny._write_preprocessor_config(out, model.config)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "parameters": params,
        "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "shards": len(list(out.glob("*.safetensors"))),
        "build_seconds": built,
        "save_seconds": time.perf_counter() - t0 - built,
    }


def quantize_one(model: Path, recipe: str, out: Path, device: str, samples: int) -> dict:
    from omniquant.checkpoint.audit import audit_checkpoint
    from omniquant.quantize.pipeline import quantize

    reset_gpu_peaks()
    t0 = time.perf_counter()
    res = quantize(
        model, recipe, out, calib="synthetic", force=True, device=device,
        overrides=[f"calibration.size={samples}", "calibration.expert_coverage.policy=force_all_experts"],
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    report = audit_checkpoint(out, raise_on_error=False)
    return {
        "seconds": seconds,
        "phases": res.timings,
        "audit_ok": report.ok,
        "audit_checked_weights": report.checked_weights,
        "out_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "peak_gpu_bytes": gpu_peaks(),
        "peak_host_bytes": host_peak(),
        "devices": res.manifest["devices"],
        "kernels": res.manifest["kernels"],
        "tokens": res.manifest["calibration"]["tokens_by_modality"],
    }


def compare_nvfp4(work: Path, kwargs: dict, samples: int) -> dict:
    """modelopt CUDA fake quant vs omniquant's emulation of the exported bytes, on CUDA."""
    import modelopt.torch.quantization as mtq
    import torch

    from omniquant.data.synthetic import synthetic_samples
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.models import load_model
    from omniquant.quantize.calibrate import _to_device, run_calibration
    from omniquant.quantize.export import write_checkpoint
    from omniquant.quantize.plan import resolve_plan, to_modelopt_config
    from omniquant.quantize.recipe import load_recipe

    src, ckpt = work / "compare_src", work / "compare_ckpt"
    info = build(src, kwargs, "cuda", "float32")
    loaded = load_model(src, dtype="float32", placement={"device_map": "cuda:0"})
    rec, _ = load_recipe("nvfp4_omni")
    plan = resolve_plan(rec, loaded)
    calib = synthetic_samples(loaded, samples, seed=0)
    root = loaded.model.language_model
    run_calibration(
        loaded, calib, lambda loop: mtq.quantize(root, to_modelopt_config(plan, rec), loop),
        force_all_experts=True,
    )  # fmt: skip
    evals = synthetic_samples(loaded, 5, seed=123)  # text, image, video, audio, image+audio

    def logits(m):
        with torch.no_grad():
            return [m.adapter.forward(m.model, _to_device(s, "cuda:0")).logits.float() for s in evals]

    fake = logits(loaded)
    write_checkpoint(loaded, plan, ckpt)
    loaded = root = None  # free the fake-quant model before loading the emulated one
    torch.cuda.empty_cache()
    served = load_emulated(ckpt, dtype="float32")
    served.model.to("cuda:0")
    got = logits(served)
    rows = []
    for s, a, b in zip(evals, fake, got):
        diff = (a - b).abs()
        rows.append({
            "sample": s.meta.get("kind", s.id),
            "bit_exact": bool(torch.equal(a, b)),
            "max_abs": float(diff.max()),
            "max_rel": float(diff.max() / a.abs().max().clamp_min(1e-12)),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        })  # fmt: skip
    return {
        "model": info,
        "tolerance_abs": TOLERANCE_ABS,
        "samples": rows,
        "verdict": "bit-exact" if all(r["bit_exact"] for r in rows)
        else ("within tolerance" if all(r["max_abs"] < TOLERANCE_ABS for r in rows) else "DIFFERS"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="omniquant GPU check (see module docstring)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--work", type=Path, default=Path("/tmp/omniquant-gpu-check"))
    ap.add_argument("--scale", choices=("real", "tiny"), default="real")
    ap.add_argument("--layers", type=int, default=26, help="first N layers of the released pattern")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--recipes", default="fp8_omni,nvfp4_omni")
    ap.add_argument("--samples", type=int, default=8, help="calibration samples per recipe")
    ap.add_argument("--compare-pattern", default="ME*E")
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args(argv)

    import torch

    result: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "steps": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def step(name: str, fn):
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result["steps"][name] = {"ok": True, **fn()}
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON; the next step still runs
            result["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["steps"][name]["wall_seconds"] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {json.dumps(result['steps'][name])[:600]}", flush=True)
        save()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        result["error"] = f"--device {args.device}: CUDA is not available on this host"
        save()
        print(result["error"], file=sys.stderr)
        return result
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    src = args.work / "source"
    build_device = "cuda" if torch.cuda.is_available() else "cpu"
    step("build", lambda: build(src, config_kwargs(args.scale, args.layers), build_device, "bfloat16"))
    if result["steps"]["build"]["ok"]:
        for recipe in args.recipes.split(","):
            out = args.work / f"out_{recipe}"
            step(
                f"quantize/{recipe}",
                lambda recipe=recipe, out=out: quantize_one(src, recipe, out, args.device, args.samples),
            )
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    if args.skip_compare or not torch.cuda.is_available():
        result["steps"]["compare_nvfp4"] = {"ok": False, "skipped": "needs CUDA (modelopt's NVFP4 fake quant)"}
        save()
    else:
        kw = config_kwargs(args.scale, args.layers, pattern=args.compare_pattern)
        step("compare_nvfp4", lambda: compare_nvfp4(args.work, kw, min(args.samples, 8)))
    shutil.rmtree(args.work, ignore_errors=True)
    save()
    return result


if __name__ == "__main__":
    main()

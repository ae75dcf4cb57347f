"""Step 4 of the GPU check: modelopt's NVFP4 CUDA fake quant against omniquant's CPU
emulation, three ways.

1. ``tensors``: random tensors (normal, heavy-tailed, with zero blocks; float32 and
   bfloat16), each fake-quantized by modelopt's ``TensorQuantizer`` on CUDA and by the
   emulation (``fake_quant_nvfp4_activation``; and the export path
   ``dequantize_nvfp4(quantize_nvfp4(...))``), counted element by element.
2. ``weights``: every NVFP4 weight of an exported checkpoint, dequantized from its bytes,
   against modelopt's fake quant of the source weight under the exported global scale.
3. ``logits``: the whole model, ``nvfp4_aggressive`` with the FP8 KV cache off (FP8's
   known 1e-7 differences would hide NVFP4's), fake-quantized on CUDA, against the
   exported checkpoint loaded with the serving emulation, on the same samples.

The source is BF16 on disk and loaded as float32 (see ``sources``). Without CUDA (the
CPU rehearsal) the reference in 1 and 2 is the project's own emulation of the CUDA kernel
(recorded as such, so the plumbing runs and a wrong source dtype shows up as differing
weights), and 3 records the emulated logits only: modelopt's NVFP4 fake-quant forward
asserts CUDA tensors.
"""

from __future__ import annotations

import torch

#: Logit tolerance the tiny-model GPU test states (ties at E2M1 boundaries may round
#: differently on the GPU).
TOLERANCE_ABS = 3e-2
E2M1_X_E4M3 = 6.0 * 448.0


def _modelopt_nvfp4(device: str):
    """``f(x, global_scale) -> fake-quantized x`` through modelopt's TensorQuantizer."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    cfg = QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
    )
    quantizer = TensorQuantizer(cfg).to(device)

    def fake(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        amax = (global_scale.float() * E2M1_X_E4M3).to(device)
        quantizer.amax = amax
        return quantizer(x.to(device)).cpu()

    return fake


def _emulated_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    from omniquant.numerics import fake_quant_nvfp4_activation

    return fake_quant_nvfp4_activation(x.cpu(), global_scale.float().cpu())


def reference(cuda: bool):
    """The fake quant compared against: modelopt's CUDA kernel, else the emulation."""
    if cuda:
        return _modelopt_nvfp4("cuda"), "modelopt TensorQuantizer on CUDA"
    return _emulated_nvfp4, "omniquant emulation (CPU rehearsal: no CUDA)"


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    differ = (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    return {"elements": a.numel(), "differing": int(differ.sum()),
            "max_abs": float((a - b).abs().max()) if a.numel() else 0.0}  # fmt: skip


def _test_tensors(seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    normal = torch.randn(512, 2688, generator=gen, device="cpu")
    heavy = (
        torch.randn(256, 1856, generator=gen, device="cpu")
        * torch.randn(256, 1, generator=gen, device="cpu").exp()
        * 3
    )
    zeros = torch.randn(64, 256, generator=gen, device="cpu")
    zeros[:, :32] = 0
    return {"normal_f32": normal, "heavy_f32": heavy, "zero_blocks_f32": zeros,
            "normal_bf16": normal.bfloat16(), "heavy_bf16": heavy.bfloat16()}  # fmt: skip


def compare_tensors(cuda: bool) -> dict:
    """Way 1: tensor by tensor, dynamic (activation) and export-path (weight) emulation."""
    from omniquant.numerics import dequantize_nvfp4, quantize_nvfp4

    ref, ref_name = reference(cuda)
    rows = []
    for name, x in _test_tensors().items():
        g = (x.float().abs().amax() / E2M1_X_E4M3).reshape(())
        want = ref(x, g)
        dynamic = _emulated_nvfp4(x, g)
        exported = dequantize_nvfp4(*quantize_nvfp4(x, g)[:2], g, dtype=x.dtype)
        rows.append(
            {
                "tensor": name,
                "dynamic_emulation": _diff(dynamic, want),
                "export_path": _diff(exported, want),
            }
        )
    return {"reference": ref_name, "rows": rows,
            "bit_exact": all(r["dynamic_emulation"]["differing"] == 0 for r in rows)}  # fmt: skip


def _tensor_files(ckpt) -> dict[str, str]:
    from safetensors import safe_open

    where = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            where.update(dict.fromkeys(h.keys(), str(f)))
    return where


def compare_exported_weights(src, ckpt, cuda: bool) -> dict:
    """Way 2: each NVFP4 weight's bytes against the fake quant of its source weight."""
    from safetensors import safe_open

    from omniquant.numerics import dequantize_nvfp4

    ref, ref_name = reference(cuda)
    out_files, src_files = _tensor_files(ckpt), _tensor_files(src)
    totals = {"tensors": 0, "tensors_exact": 0, "elements": 0, "differing": 0, "max_abs": 0.0}
    worst, unmatched = [], []
    for key in sorted(out_files):
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if base is None or f"{base}.weight_scale_2" not in out_files:
            continue
        with safe_open(out_files[key], "pt") as h:
            packed = h.get_tensor(key)
        with safe_open(out_files[f"{base}.weight_scale"], "pt") as h:
            scales = h.get_tensor(f"{base}.weight_scale")
        with safe_open(out_files[f"{base}.weight_scale_2"], "pt") as h:
            g = h.get_tensor(f"{base}.weight_scale_2").float()
        if key not in src_files:
            unmatched.append(key)
            continue
        with safe_open(src_files[key], "pt") as h:
            w = h.get_tensor(key).float()  # the BF16 source as the fake-quant model loads it
        if g.numel() != 1 or tuple(w.shape) != (packed.shape[0], packed.shape[1] * 2):
            unmatched.append(key)
            continue
        got = dequantize_nvfp4(
            packed, scales.view(torch.float8_e4m3fn), g.reshape(()), dtype=torch.float32
        )
        d = _diff(got, ref(w, g.reshape(())))
        totals["tensors"] += 1
        totals["tensors_exact"] += d["differing"] == 0
        totals["elements"] += d["elements"]
        totals["differing"] += d["differing"]
        totals["max_abs"] = max(totals["max_abs"], d["max_abs"])
        if d["differing"]:
            worst.append({"tensor": key, **d})
    if not totals["tensors"]:
        raise RuntimeError(
            f"{ckpt}: no NVFP4 weight matched a source tensor (unmatched: {unmatched[:5]})"
        )
    worst.sort(key=lambda r: -r["differing"])
    return {"reference": ref_name, **totals, "unmatched": unmatched[:20], "worst": worst[:10],
            "bit_exact": totals["differing"] == 0}  # fmt: skip


def _logits(loaded, samples) -> list[torch.Tensor]:
    from omniquant.devices import input_device
    from omniquant.quantize.calibrate import _to_device

    device = input_device(loaded.model)
    with torch.no_grad():
        return [
            loaded.adapter.forward(loaded.model, _to_device(s, device)).logits.float().cpu()
            for s in samples
        ]


def _logit_rows(evals, fake, got) -> list[dict]:
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
    return rows


def compare_nvfp4(
    work, kwargs: dict, device: str, samples: int, source_dtype: str = "bfloat16"
) -> dict:
    """All three ways on a model of ``kwargs`` (``source_dtype`` other than bfloat16 only
    to show what a float32 source does to the comparison)."""
    import modelopt.torch.quantization as mtq

    from benchmarks.gpu.sources import build
    from omniquant.data.synthetic import synthetic_samples
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.models import load_model
    from omniquant.quantize.calibrate import run_calibration
    from omniquant.quantize.export import write_checkpoint
    from omniquant.quantize.plan import resolve_plan, to_modelopt_config
    from omniquant.quantize.recipe import load_recipe

    cuda = device.startswith("cuda")
    device = "cuda:0" if device == "cuda" else device
    out = {"tensors": compare_tensors(cuda)}
    src, ckpt = work / "compare_src", work / "compare_ckpt"
    out["model"] = build(src, kwargs, device, source_dtype)
    loaded = load_model(src, dtype="float32", placement={"device_map": device})
    rec, _ = load_recipe("nvfp4_aggressive", ["quantization.kv_cache=none"])
    plan = resolve_plan(rec, loaded)
    calib = synthetic_samples(loaded, samples, seed=0)
    root = loaded.adapter.quant_root(loaded.model)
    run_calibration(loaded, calib, lambda loop: mtq.quantize(root, to_modelopt_config(plan, rec), loop),
                    force_all_experts=True)  # fmt: skip
    evals = synthetic_samples(loaded, 5, seed=123)  # text, image, video, audio, image+audio
    fake = _logits(loaded, evals) if cuda else None
    write_checkpoint(loaded, plan, ckpt)
    loaded = root = None  # free the fake-quant model before loading the emulated one
    from benchmarks.gpu.runner import release_memory

    release_memory()
    out["weights"] = compare_exported_weights(src, ckpt, cuda)
    served = load_emulated(ckpt, dtype="float32")
    served.model.to(device)
    got = _logits(served, evals)
    served = None
    if fake is None:
        out["logits"] = {"fake_quant": "not run: modelopt's NVFP4 fake-quant forward needs CUDA",
                         "emulated_finite": all(bool(torch.isfinite(g).all()) for g in got)}  # fmt: skip
    else:
        rows = _logit_rows(evals, fake, got)
        verdict = (
            "bit-exact"
            if all(r["bit_exact"] for r in rows)
            else (
                "within tolerance" if all(r["max_abs"] < TOLERANCE_ABS for r in rows) else "DIFFERS"
            )
        )
        out["logits"] = {"tolerance_abs": TOLERANCE_ABS, "samples": rows, "verdict": verdict}
    return out

"""The exported checkpoint, loaded with serving numerics, computes what the fake-quantized model computes."""

from __future__ import annotations

import sys

import pytest
import torch

from omniquant.data.synthetic import synthetic_samples
from omniquant.devices import input_device
from omniquant.evaluate.emulated import load_emulated
from omniquant.models import load_model
from omniquant.quantize.calibrate import _to_device, run_calibration
from omniquant.quantize.export import write_checkpoint
from omniquant.quantize.plan import resolve_plan, to_modelopt_config
from omniquant.quantize.recipe import load_recipe


def _logits(loaded, samples):
    # Samples are built on the CPU; they go where the model's first layer is (the GPU test
    # runs the fake-quantized model on CUDA).
    device = input_device(loaded.model)
    with torch.no_grad():
        return [
            loaded.adapter.forward(loaded.model, _to_device(s, device)).logits.float()
            for s in samples
        ]


def _fake_quant_then_export(tiny_dir, recipe, out, device="cpu"):
    import modelopt.torch.quantization as mtq

    # float32: modelopt's fake quant then rounds in fp32 like its exporter does; in a
    # bf16 model its fake-quant arithmetic rounds some weights one FP8 step away from
    # the bytes the exporter writes (and serving engines read).
    loaded = load_model(tiny_dir, dtype="float32")
    loaded.model.to(device)
    rec, _ = load_recipe(recipe)
    plan = resolve_plan(rec, loaded)
    calib = synthetic_samples(loaded, 10, seed=0)
    root = loaded.model.language_model
    run_calibration(loaded, calib, lambda loop: mtq.quantize(root, to_modelopt_config(plan, rec), loop))
    # One sample per modality, plus image+audio together (transformers 5.23 cannot hold an
    # image and a video in one sequence: both use the image placeholder token).
    evals = synthetic_samples(loaded, 5, seed=123)
    assert [s.meta["kind"] for s in evals] == ["text", "image", "video", "audio", "image+audio"]
    fake = _logits(loaded, evals)
    write_checkpoint(loaded, plan, out)
    return fake, evals


def test_fp8_export_matches_fake_quant(tiny_dir, tmp_path):
    fake, samples = _fake_quant_then_export(tiny_dir, "fp8_omni", tmp_path / "ckpt")
    served = load_emulated(tmp_path / "ckpt", dtype="float32")
    assert served.emulation["formats"] == ["fp8"] and served.emulation["kv_cache"] == "fp8"
    got = _logits(served, samples)
    ref = _logits(load_model(tiny_dir, dtype="float32"), samples)
    for s, a, b, r in zip(samples, fake, got, ref):
        # Same bytes and scales in fp32; the emulation divides by the stored scale where
        # modelopt multiplies by its reciprocal (<= 2 ulp per activation): 1e-4 absolute
        # on logits of magnitude ~0.5, while FP8 quantization itself moves them > 1e-2.
        err = (a - b).abs().max().item()
        assert err < 1e-4, (s.id, err)
        assert (a - r).abs().max().item() > 1e-2, s.id  # the emulation is not just BF16


def test_emulated_checkpoint_loads_without_missing_keys(quantized):
    expected = {"fp8_omni": "FP8", "nvfp4_omni": "MIXED_PRECISION", "nvfp4_aggressive": "NVFP4"}
    for recipe, quant_algo in expected.items():
        served = load_emulated(quantized(recipe))  # raises on missing/unexpected keys
        assert served.emulation["quant_algo"] == quant_algo, recipe


@pytest.mark.requires_sm(89)
def test_nvfp4_export_matches_cuda_fake_quant(tiny_dir, tmp_path):
    fake, samples = _fake_quant_then_export(tiny_dir, "nvfp4_omni", tmp_path / "ckpt", device="cuda")
    served = load_emulated(tmp_path / "ckpt", dtype="float32")
    served.model.to("cuda")
    got = _logits(served, samples)
    for s, a, b in zip(samples, fake, got):
        err = (a - b.to(a.device)).abs().max().item()
        assert err < 3e-2, (s.id, err)  # ties at E2M1 boundaries may round differently on GPU


def test_logits_moves_samples_to_the_model_device(monkeypatch):
    """The GPU test's helper feeds CPU-built samples to a model elsewhere: it must move them
    where the model's inputs go ("meta" stands in for CUDA, which this host may lack)."""
    from types import SimpleNamespace

    from omniquant.data.batch import Sample

    monkeypatch.setattr(sys.modules[__name__], "input_device", lambda model: "meta")
    seen = []

    def forward(model, sample):
        seen.append(sample.input_ids.device.type)
        return SimpleNamespace(logits=torch.zeros(1, 4, 8, device="meta"))

    loaded = SimpleNamespace(model=None, adapter=SimpleNamespace(forward=forward))
    _logits(loaded, [Sample(id="s", input_ids=torch.ones(1, 4, dtype=torch.long))])
    assert seen == ["meta"]

"""benchmarks/gpu/gpu_check.py: its CPU-runnable parts (arguments, model building, the
quantize/audit step) on the tiny preset; the GPU run itself is not exercised here."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_scale_on_cpu_builds_quantizes_and_audits(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--scale", "tiny", "--device", "cpu", "--recipes", "fp8_omni", "--samples", "2",
                    "--out", str(out), "--work", str(tmp_path / "work")])  # fmt: skip
    res = json.loads(out.read_text())
    build, q = res["steps"]["build"], res["steps"]["quantize/fp8_omni"]
    assert build["ok"] and build["parameters"] == 673416 and build["shards"] == 1
    assert q["ok"] and q["audit_ok"] and q["audit_checked_weights"] > 0
    assert set(q["phases"]) == {"load", "plan", "calibration_data", "calibration_forward",
                                "quantize_other", "export", "audit"}  # fmt: skip
    assert q["devices"]["per_device"].keys() == {"cpu"} and q["peak_host_bytes"] > 0
    if not torch.cuda.is_available():
        assert res["steps"]["compare_nvfp4"]["skipped"].startswith("needs CUDA")
    assert not (tmp_path / "work").exists()  # sources and outputs are removed


def test_real_scale_config_is_half_the_released_depth():
    kw = gpu_check.config_kwargs("real", 26)
    types = kw["text_config"]["layers_block_type"]
    assert len(types) == 26 and kw["text_config"]["hidden_size"] == 2688
    assert types.count("full_attention") == 3 and types.count("moe") == 11
    assert kw["vision_config"]["num_hidden_layers"] == 16 and kw["audio_config"]["num_hidden_layers"] == 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without CUDA")
def test_cuda_without_cuda_is_recorded(tmp_path):
    out = tmp_path / "r.json"
    gpu_check.main(["--out", str(out), "--work", str(tmp_path / "w")])
    assert "CUDA is not available" in json.loads(out.read_text())["error"]

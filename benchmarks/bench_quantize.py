"""Wall time and peak memory of quantize + export on a random ~340M-parameter nemotron_h_omni.

Run: ``python3 -m pytest benchmarks/bench_quantize.py --benchmark-enable -s``.
Goal (issue 4): peak memory at most 1.5x the checkpoint's BF16 bytes (no full model
copies). Both resident (VmRSS) and anonymous (RssAnon) peaks are recorded in
``extra_info`` as ratios of the BF16 bytes; see ``_memwatch`` for the difference.
"""

from __future__ import annotations

import pytest

from benchmarks._memwatch import measure


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    from omniquant.demo.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("bench") / "model", seed=0, size="bench")


def _bf16_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_quantize_export_memory(benchmark, bench_model, tmp_path, recipe):
    setup = "import torch, modelopt.torch.quantization\nfrom omniquant.quantize.pipeline import quantize\n"
    body = (
        f"quantize({str(bench_model)!r}, {recipe!r}, {str(tmp_path / 'out')!r}, calib='synthetic', force=True,\n"
        "         overrides=['calibration.size=8', 'calibration.expert_coverage.policy=force_all_experts'])\n"
    )
    result = benchmark.pedantic(measure, args=(setup, body), rounds=1, iterations=1)
    bf16 = _bf16_bytes(bench_model)
    benchmark.extra_info.update(
        bf16_bytes=bf16,
        seconds=round(result["seconds"], 2),
        rss_peak_ratio=round(result["rss_peak_delta"] / bf16, 3),
        anon_peak_ratio=round(result["anon_peak_delta"] / bf16, 3),
    )
    print(f"\n{recipe}: {benchmark.extra_info}")
    assert result["anon_peak_delta"] > 0

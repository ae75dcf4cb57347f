"""Wall time and peak memory of ``plan`` on the released model's config alone.

Run: ``python3 -m pytest benchmarks/bench_plan.py --benchmark-enable -s``.
Goal (issue 13): plan the 33 B-parameter released model from ``config.json`` in
seconds, without memory for its weights (the model is built on the meta device).
``extra_info`` records seconds after imports, and the resident peak as a ratio of
the BF16 checkpoint it plans (61.50 GiB).
"""

from __future__ import annotations

import pytest

from benchmarks._memwatch import measure


@pytest.fixture(scope="module")
def released_config(tmp_path_factory):
    from omniquant.demo.tiny import write_config_only

    return write_config_only(tmp_path_factory.mktemp("released") / "config-only")


@pytest.mark.parametrize("recipe", ["nvfp4_omni", "fp8_omni"])
def test_plan_released_config(benchmark, released_config, recipe):
    setup = "import torch, transformers\nfrom omniquant.quantize.planner import plan_model\n"
    body = f"r = plan_model({str(released_config)!r}, {recipe!r})\n"
    result = benchmark.pedantic(measure, args=(setup, body), rounds=1, iterations=1)
    bf16 = 33_015_727_040 * 2
    benchmark.extra_info.update(
        seconds=round(result["seconds"], 2),
        rss_peak_bytes=result["rss_peak_delta"],
        rss_peak_ratio_of_bf16=round(result["rss_peak_delta"] / bf16, 5),
    )

"""README's speed table is what benchmarks/render_readme_table.py renders from the committed
benchmarks/results/bench_speed.json (issue 26): the table cannot drift from the numbers."""

import json
from pathlib import Path

from benchmarks.render_readme_table import END, START, render, replace_block

REPO = Path(__file__).resolve().parents[1]


def test_readme_speed_table_equals_the_rendered_json():
    readme = (REPO / "README.md").read_text()
    results = json.loads((REPO / "benchmarks/results/bench_speed.json").read_text())
    assert START in readme and END in readme
    assert replace_block(readme, render(results)) == readme


def test_render_marks_missing_sections_not_measured():
    table = render({"sections": {"plan": {"plan_wall_s": 4.21}}})
    assert "| `plan`, config-only released model | <= 5 s | 4.2 s |" in table
    assert "| `omniquant cliff` wall (demo) | <= 60 s | not measured |" in table
    assert "slice nvfp4_omni: omniquant / bare modelopt | <= 1.05x | not measured |" in table


def test_slice_runs_each_kind_abba_and_keeps_the_faster_run_and_the_higher_peak(monkeypatch, tmp_path):
    """bench_slice runs omniquant, modelopt, modelopt, omniquant per recipe; per kind the
    faster run's numbers count, every run's seconds are kept, memory is the higher peak,
    and the ratios come from the kept runs (checked here with fake runs)."""
    from benchmarks import bench_slice, bench_speed

    fake = {  # (kind, recipe) -> seconds and peak of each successive run
        ("omniquant", "fp8_omni"): [(30.0, 1.10), (20.0, 1.05)],
        ("modelopt", "fp8_omni"): [(16.0, 1.00), (18.0, 1.20)],
    }
    calls = []

    def run(kind, model, recipe, samples, out, threads):
        seconds, peak = fake[kind, recipe][sum(c[:2] == (kind, recipe) for c in calls)]
        calls.append((kind, recipe))
        return {"seconds": seconds, "cpu_seconds": seconds, "rss_base": 0, "anon_base": 0,
                "rss_peak": int(peak * 100), "anon_peak": 0, "shard_bytes": 50,
                "phases": {"export": seconds / 2, "load": 1.0}}  # fmt: skip

    floors = iter([{"bytes": 100, "read_s": 2.0, "write_s": 3.0},
                   {"bytes": 100, "read_s": 1.0, "write_s": 2.0}])  # fmt: skip
    monkeypatch.setattr(bench_slice, "_run", run)
    monkeypatch.setattr(bench_slice, "plain_read_write", lambda model, scratch: next(floors))
    monkeypatch.setattr(bench_slice, "bf16_bytes", lambda model: 100)
    res = bench_slice.run_all(tmp_path, 2, tmp_path / "s", recipes=("fp8_omni",))
    assert [kind for kind, _ in calls] == ["omniquant", "modelopt", "modelopt", "omniquant"]
    assert res["overhead_fp8_omni"] == 20.0 / 16.0
    assert res["plain_read_write"]["read_s"] == 1.0  # the faster floor
    assert res["export_x_floor_fp8_omni"]["omniquant"] == 10.0 / (1.0 + 2.0 * 50 / 100)
    summary = bench_speed.summarize_slice(res)["fp8_omni"]
    assert summary["omniquant_all_s"] == [30.0, 20.0] and summary["modelopt_all_s"] == [16.0, 18.0]
    assert summary["omniquant_rss_x_bf16"] == 1.1 and summary["modelopt_rss_x_bf16"] == 1.2

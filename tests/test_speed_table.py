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

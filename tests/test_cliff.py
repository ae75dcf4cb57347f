"""``omniquant cliff``: the main job, through the CLI, on the bundled demo defaults."""

from __future__ import annotations

import json

import pytest

from omniquant.cli import main
from omniquant.demo import DEMO_TASKS
from omniquant.evaluate import validate_task_set
from omniquant.experiments.cliff import BASELINE_NAME
from omniquant.report.table import render_cliff_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_cliff(tmp_path_factory):
    """``omniquant cliff`` with the demo defaults and one recipe (the full run is three)."""
    out = tmp_path_factory.mktemp("cliff") / "run"
    rc = main(["cliff", "--out", str(out), "--recipe", "nvfp4_aggressive"])
    return rc, out


@pytest.mark.slow  # cliff on the demo model with one recipe (~40 s)
def test_demo_defaults_quantize_and_report(demo_cliff, capsys):
    rc, out = demo_cliff
    assert rc == 0
    ckpt = out / "checkpoints" / "nvfp4_aggressive"
    assert (ckpt / "omniquant.json").is_file()
    meta = json.loads((ckpt / "omniquant.json").read_text())
    assert meta["calibration"]["set"] == "omni-demo"  # the demo's own calibration set
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["baseline"]["name"] == BASELINE_NAME
    assert [c["name"] for c in report["candidates"]] == ["nvfp4_aggressive"]
    tasks = {e.task for e in validate_task_set(DEMO_TASKS)}
    assert set(report["baseline"]["tasks"]) == tasks
    assert (out / "report" / "report.html").is_file()


@pytest.mark.slow  # cliff on the demo model with one recipe (~40 s)
def test_table_has_a_row_per_task_with_accuracy_and_recovery(demo_cliff):
    rc, out = demo_cliff
    assert rc == 0
    report = json.loads((out / "report" / "report.json").read_text())
    table = render_cliff_table(report).splitlines()
    assert table[0].split() == ["task", BASELINE_NAME, "nvfp4_aggressive"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert set(rows) == set(report["baseline"]["tasks"]) | {"bits/weight"}
    for task, cells in rows.items():
        if task == "bits/weight":
            assert float(cells[0]) == pytest.approx(16.0, abs=0.01)
            assert float(cells[1]) < 16.0
            continue
        cand = report["candidates"][0]["tasks"][task]
        assert float(cells[0]) == pytest.approx(
            report["baseline"]["tasks"][task]["accuracy"], abs=0.005
        )
        assert float(cells[1]) == pytest.approx(cand["accuracy"], abs=0.005)
        recovery = cells[2].strip("()")
        assert (
            recovery == "-"
            if cand["recovery"] is None
            else float(recovery) == pytest.approx(cand["recovery"], abs=0.005)
        )


@pytest.mark.slow  # cliff on the demo model with one recipe (~40 s)
def test_an_existing_out_is_kept_unless_forced(demo_cliff, capsys):
    rc, out = demo_cliff
    assert rc == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["cliff", "--out", str(out), "--recipe", "fp8_omni"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_model_fails_before_any_work(tmp_path, capsys):
    rc = main(["cliff", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc != 0
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_force_never_deletes_the_model(tiny_dir, tmp_path, capsys):
    """--out that is, or contains, --model is refused before anything is deleted."""
    import shutil

    parent = tmp_path / "work"
    model = parent / "model"
    shutil.copytree(tiny_dir, model)
    (parent / "notes.txt").write_text("keep me")
    for out in (parent, model):
        rc = main(
            ["cliff", "--model", str(model), "--out", str(out), "--force", "--recipe", "fp8_omni"]
        )
        assert rc == 2
        assert "replacing --out would delete it" in capsys.readouterr().err
        rc = main(["quantize", "--model", str(model), "--recipe", "fp8_omni", "--calib", "synthetic",
                   "--out", str(out), "--force", "--quiet"])  # fmt: skip
        assert rc == 2
        assert "replacing --out would delete it" in capsys.readouterr().err
    assert (model / "config.json").is_file() and (parent / "notes.txt").read_text() == "keep me"

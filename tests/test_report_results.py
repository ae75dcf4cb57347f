"""The report renders typed results without any model stack; sensitivity passes ``Recipe`` objects."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omniquant.errors import ExportError
from omniquant.evaluate.results import Comparison, ModelResult, SampleResult

ROOT = Path(__file__).resolve().parents[1]


def _sample(sid: str, task: str, modality: str, score: float, kl: float, top1: float):
    return SampleResult(
        id=sid, task=task, modality=modality, metric="exact_match", prediction="x",
        score=score, wer=None, kl=kl, top1=top1, answer_tokens=2, video_tokens=None,
        video_placeholders=None, evs_rate=0.0,
    )  # fmt: skip


def _comparison(tmp: Path) -> Comparison:
    def model(name: str, bits: float, scores: list[float], kl: float) -> ModelResult:
        desc = {"name": name, "path": f"/x/{name}", "recipe": None, "precision": name.upper(),
                "kv_cache": None, "bits_per_weight": bits, "size_bytes": 2_000_000, "params": 10,
                "group_precision": {}, "calibration": None, "emulation": None}  # fmt: skip
        samples = [
            _sample("t1", "qa", "text", scores[0], kl, 1.0 if kl == 0 else 0.5),
            _sample("i1", "shape", "image", scores[1], kl, 1.0),
        ]
        return ModelResult(desc, samples, seconds=2.0, load_seconds=0.5, evs=[])

    return Comparison(
        created_unix=1, task_set=tmp / "tiny-set", samples=2, video_samples=0,
        baseline=model("bf16", 16.0, [1.0, 1.0], 0.0),
        candidates=[model("nvfp4", 4.5, [0.0, 1.0], 0.25)],
        recovery_threshold=0.95, bootstrap=0, seed=0, max_new_tokens=4, evs_rates=(0.0,),
        evs_reference=True, span_topk=None, versions={"omniquant": "v", "torch": "t", "transformers": "h"},
    )  # fmt: skip


def test_report_from_results_without_a_model(tmp_path):
    from omniquant.report.build import report_dict, write_report

    report = report_dict(_comparison(tmp_path))
    write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    base, cand = report["baseline"], report["candidates"][0]
    assert list(base)[:13] == ["name", "path", "recipe", "precision", "kv_cache", "bits_per_weight",
                               "size_bytes", "params", "group_precision", "calibration", "emulation",
                               "evaluation", "evs"]  # fmt: skip
    assert base["evaluation"] == {
        "samples": 2,
        "seconds": 2.0,
        "samples_per_s": 1.0,
        "load_seconds": 0.5,
    }
    assert cand["tasks"]["qa"]["recovery"] == 0.0 and cand["tasks"]["shape"]["recovery"] == 1.0
    assert cand["tasks_below_threshold"] == ["qa"]
    assert report["verdicts"] == [cand["verdict"]] and cand["verdict"].startswith(
        "nvfp4: recovery under 95% on 1 task(s): qa (0.000 vs 1.000, recovery 0%)."
    )
    assert report["settings"]["fidelity"]["distribution"] == "full vocabulary (exact KL)"
    assert "endpoints" not in report["settings"] and report["settings"]["sensitivity"] is False
    assert report["evs"] == {
        "rates": [0.0],
        "video_samples": 0,
        "reference": "baseline at EVS rate 0.0",
    }
    assert (
        "| qa | exact_match | text | 1.000 | 0.000 |"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_report_package_imports_no_stage_that_loads_a_model(tmp_path):
    """``omniquant.report`` renders results: importing and running it pulls in no quantize,
    model, checkpoint, emulated-loading, endpoint or experiment module."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from pathlib import Path
        import omniquant.report, omniquant.report.build, omniquant.report.render
        import omniquant.report.stats, omniquant.report.svg, omniquant.report.table
        from test_report_results import _comparison
        from omniquant.report.build import report_dict, write_report
        from omniquant.report.table import render_cliff_table, render_summary_table
        report = report_dict(_comparison(Path({str(tmp_path)!r})))
        write_report(report, Path({str(tmp_path / "out")!r}))
        render_cliff_table(report), render_summary_table(report)
        banned = ("omniquant.quantize", "omniquant.models", "omniquant.checkpoint",
                  "omniquant.evaluate.emulated", "omniquant.endpoint", "omniquant.experiments",
                  "modelopt", "transformers")
        print(sorted(m for m in sys.modules if m.startswith(banned)))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def test_summary_table_prints_na_for_what_a_served_model_did_not_report(tmp_path):
    from omniquant.report.build import report_dict
    from omniquant.report.table import render_summary_table

    report = report_dict(_comparison(tmp_path))
    served = report["candidates"][0]
    served.update(
        name="served", precision="served (not reported)", bits_per_weight=None, size_bytes=None
    )
    served["overall"].update(kl_mean=None, top1_agreement=None)
    assert render_summary_table(report).splitlines() == [
        "model                 precision           bits/w   size MB  accuracy min recov    KL mean   top-1",
        "bf16                  BF16                16.000     2.000     1.000    100.0%          0  100.0%",
        "served                served (not repor      n/a       n/a     0.500      0.0%        n/a     n/a",
    ]


def test_sensitivity_passes_recipe_objects_and_writes_no_file(tmp_path, monkeypatch):
    """Each probe reaches ``quantize`` as a ``Recipe`` equal to what its YAML file gave."""
    import yaml

    from omniquant.experiments import sensitivity
    from omniquant.quantize import pipeline
    from omniquant.quantize.recipe import Recipe, load_recipe

    seen = []

    def fake_quantize(model, recipe, out, **kwargs):
        seen.append(recipe)
        raise ExportError(f"{out}: probe refused by the test")

    monkeypatch.setattr(pipeline, "quantize", fake_quantize)
    work = tmp_path / "work"
    result = sensitivity.group_sensitivity(
        tmp_path / "bf16", [], {}, ["moe_experts", "mamba"], "nvfp4", work
    )
    assert [s["group"] for s in result["skipped"]] == ["moe_experts", "mamba"]
    assert all(isinstance(r, Recipe) for r in seen) and list(work.iterdir()) == []
    # Same content as the recipe file the probes used to write and load.
    data = sensitivity._probe_recipe("moe_experts", "nvfp4", "synthetic", 16)
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    from_file, _ = load_recipe(tmp_path / "probe.yaml")
    assert seen[0].model_dump(mode="json") == from_file.model_dump(mode="json")
    assert seen[0].sha256() == from_file.sha256()


def test_load_recipe_takes_a_recipe_object_and_leaves_it_unchanged():
    from omniquant.errors import RecipeError
    from omniquant.quantize.recipe import load_recipe

    original, path = load_recipe("fp8_omni")
    copy, no_path = load_recipe(original, ["calibration.size=4"])
    assert path is not None and no_path is None
    assert copy.calibration.size == 4 and original.calibration.size != 4
    assert load_recipe(original)[0].sha256() == original.sha256()
    with pytest.raises(RecipeError, match=r"recipe 'fp8_omni' \(in memory\)"):
        load_recipe(original, ["calibration.size=0"])

"""The report's Pareto front (``omniquant.report.pareto``): dominated points, ties, one
point, missing numbers; and where the report shows it (terminal table, HTML chart)."""

from __future__ import annotations

from omniquant.report.pareto import pareto_front


def test_dominated_points_are_off_the_front():
    pts = [("bf16", 16.0, 0.0), ("fp8", 8.0, 0.01), ("nvfp4", 4.0, 0.1),
           ("bad", 8.5, 0.2), ("worse_fp8", 8.0, 0.02)]  # fmt: skip
    assert pareto_front(pts) == ["nvfp4", "fp8", "bf16"]


def test_single_point_is_the_front():
    assert pareto_front([("only", 3.0, 0.5)]) == ["only"]
    assert pareto_front([]) == []


def test_ties_are_all_on_the_front_and_half_ties_are_dominated():
    pts = [("a", 4.0, 0.1), ("b", 4.0, 0.1), ("same_cost_more_loss", 4.0, 0.2),
           ("same_loss_more_cost", 5.0, 0.1)]  # fmt: skip
    assert pareto_front(pts) == ["a", "b"]


def test_missing_numbers_are_never_on_the_front():
    pts = [("served", None, 0.0), ("no_kl", 1.0, None), ("x", 4.0, 0.3)]
    assert pareto_front(pts) == ["x"]


def test_maximising_accuracy_by_negation():
    pts = [("a", 4.0, -0.9), ("b", 8.0, -0.95), ("c", 9.0, -0.95)]
    assert pareto_front(pts) == ["a", "b"]


def _report(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_report_results import _comparison

    from omniquant.report.build import report_dict

    report = report_dict(_comparison(tmp_path))
    nvfp4 = report["candidates"][0]
    # Three candidates of the same report: the nvfp4 one smaller than BF16 with more KL
    # (front), a fitted one smaller still and better (front, dominates nothing on size),
    # and one as large as nvfp4 with more KL (dominated).
    import copy

    fitted, worse = copy.deepcopy(nvfp4), copy.deepcopy(nvfp4)
    nvfp4["size_bytes"] = 600_000
    fitted.update(name="fit_0_5mb:mse", size_bytes=500_000)
    fitted["overall"]["kl_mean"] = 0.1
    worse.update(name="worse", size_bytes=600_000)
    worse["overall"]["kl_mean"] = 0.3
    report["candidates"] += [fitted, worse]
    return report


def test_summary_table_marks_the_front_with_a_legend(tmp_path):
    from omniquant.report.table import render_summary_table

    lines = render_summary_table(_report(tmp_path)).splitlines()
    assert lines[0].endswith("  front")
    marks = {line.split()[0]: line.endswith("*") for line in lines[1:-1]}
    assert marks == {"bf16": True, "nvfp4": False, "fit_0_5mb:mse": True, "worse": False}
    assert lines[-1].startswith("front: * = on the Pareto front of KL mean vs size")


def test_html_plots_kl_and_accuracy_against_size_with_the_front(tmp_path):
    from omniquant.report.render import write_html

    page = write_html(_report(tmp_path))
    assert "<h2>Quality versus size</h2>" in page
    assert "Quality vs size: mean KL to the baseline" in page
    assert "Quality vs size: mean accuracy" in page
    assert "KL front: fit_0_5mb:mse, bf16; accuracy front: " in page
    assert page.count('stroke-dasharray="5,3"') >= 2  # one front line per chart
    assert "worse: exported GiB" in page and "worse * " not in page


def test_front_line_names_the_front_by_size(tmp_path):
    from omniquant.report.table import render_front_line

    assert render_front_line(_report(tmp_path)) == (
        "Pareto front, KL mean vs size (no other model has both less KL and fewer bytes): "
        "fit_0_5mb:mse, bf16"
    )

"""The quality-cliff report end to end on the tiny model: files, fields, sanity, sensitivity, EVS, browser."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import weakref
from pathlib import Path

import pytest
import torch

from omniquant.cli import CLI_NAMES, main
from omniquant.errors import ReportError, argument_style
from omniquant.experiments.compare import build_report
from omniquant.report import REPORT_FILES

CHROMIUM = Path("/usr/bin/chromium")
TASK_FIELDS = {
    "metric",
    "modalities",
    "n",
    "accuracy",
    "recovery",
    "recovery_defined",
    "accuracy_delta",
    "accuracy_delta_ci95",
    "kl_mean",
    "top1_agreement",
}
MODEL_FIELDS = {
    "name",
    "path",
    "precision",
    "bits_per_weight",
    "size_bytes",
    "tasks",
    "modalities",
    "overall",
    "kl_by_modality",
    "calibration",
    "verdict",
    "evs",
    "samples",
    "evaluation",
    "emulation",
}
FAST = {"max_new_tokens": 3, "bootstrap": 200}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cliff(tiny_dir, quantized, tmp_path_factory):
    """BF16 baseline vs FP8 and NVFP4 candidates, with sensitivity; models tracked for liveness."""
    from omniquant.evaluate import emulated as serving

    out = tmp_path_factory.mktemp("cliff") / "report"
    fp8, nvfp4 = quantized("fp8_omni"), quantized("nvfp4_omni")
    live: list[weakref.ref] = []
    overlaps: list[str] = []
    original = serving.load_emulated

    def tracked(path, *args, **kwargs):
        import gc

        gc.collect()
        alive = [r for r in live if r() is not None]
        if alive:
            overlaps.append(f"{path}: {len(alive)} model(s) still alive")
        loaded = original(path, *args, **kwargs)
        live.append(weakref.ref(loaded.model))
        return loaded

    mp = pytest.MonkeyPatch()
    mp.setattr(serving, "load_emulated", tracked)
    try:
        report = build_report(tiny_dir, [fp8, nvfp4], "omni-smoke", out, sensitivity=True, **FAST)
    finally:
        mp.undo()
    return report, out, overlaps, len(live)


def _models(report):
    return [report["baseline"], *report["candidates"]]


def test_writes_three_files_with_every_field(cliff):
    report, out, _, _ = cliff
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    tasks = set(report["task_set"]["tasks"])
    assert tasks == {
        "text-qa",
        "text-choice",
        "image-shape",
        "image-colour",
        "video-motion",
        "audio-count",
        "audio-asr",
    }
    assert [c["name"] for c in report["candidates"]] == ["fp8_omni", "nvfp4_omni"]
    for model in _models(report):
        assert MODEL_FIELDS <= set(model), model["name"]
        assert set(model["tasks"]) == tasks
        for task, t in model["tasks"].items():
            assert TASK_FIELDS <= set(t), (model["name"], task)
            for key in ("accuracy", "recovery", "kl_mean", "top1_agreement", "accuracy_delta"):
                assert isinstance(t[key], float) and math.isfinite(t[key]), (
                    model["name"],
                    task,
                    key,
                )
            lo, hi = t["accuracy_delta_ci95"]
            assert lo <= t["accuracy_delta"] <= hi
            assert t["n"] == sum(1 for s in model["samples"] if s["task"] == task)
        assert set(model["kl_by_modality"]) == {"text", "image", "video", "audio"}
        assert model["size_bytes"] > 0 and model["bits_per_weight"] > 0
    fp8, nvfp4 = report["candidates"]
    assert (fp8["precision"], nvfp4["precision"]) == ("FP8", "MIXED_PRECISION")
    assert (
        report["baseline"]["precision"] == "BF16" and report["baseline"]["bits_per_weight"] == 16.0
    )
    assert report["baseline"]["bits_per_weight"] > fp8["bits_per_weight"] > nvfp4["bits_per_weight"]
    assert report["baseline"]["size_bytes"] > fp8["size_bytes"] > nvfp4["size_bytes"]
    # Calibration coverage straight from each candidate's omniquant.json.
    for cand in report["candidates"]:
        experts = cand["calibration"]["expert_tokens"]
        assert len(experts) == 4 and all(len(v) == 8 for v in experts.values())
    assert report["baseline"]["calibration"] is None  # make_tiny writes no omniquant.json
    assert report["verdicts"] == [c["verdict"] for c in report["candidates"]]
    md = (out / "report.md").read_text()
    for heading in (
        "## Verdicts",
        "## The cliff",
        "## Size",
        "## EVS",
        "## Calibration coverage",
        "## Sensitivity",
    ):
        assert heading in md


def test_nvfp4_candidate_runs_through_the_cpu_emulation(cliff):
    report, _, _, _ = cliff
    fp8, nvfp4 = report["candidates"]
    assert (
        nvfp4["emulation"]["formats"] == ["fp8", "nvfp4"]
        and nvfp4["emulation"]["kv_cache"] == "fp8"
    )
    assert fp8["emulation"]["formats"] == ["fp8"]
    assert not torch.cuda.is_initialized()
    for cand in (fp8, nvfp4):
        # Quantization moves the distributions, but not far (tiny random model, max calibration).
        assert 0 < cand["overall"]["kl_mean"] < 0.05
        assert all(s["kl"] is not None and s["kl"] >= 0 for s in cand["samples"])


def test_one_model_in_memory_at_a_time(cliff):
    _, _, overlaps, loads = cliff
    # baseline + 2 candidates + 5 sensitivity probes, never two alive at once
    assert loads == 8
    assert overlaps == []


def test_sensitivity_ranks_every_quantizable_group(cliff, tmp_path):
    from omniquant.quantize.recipe import load_recipe

    report, out, _, _ = cliff
    sens = report["sensitivity"]
    assert sens["format"] == "nvfp4" and sens["skipped"] == []
    groups = [g["group"] for g in sens["groups"]]
    assert sorted(groups) == [
        "attention_o",
        "attention_qkv",
        "mamba_in_out",
        "routed_experts",
        "shared_experts",
    ]
    kls = [g["kl_mean"] for g in sens["groups"]]
    assert all(k > 0 for k in kls) and kls == sorted(kls, reverse=True)
    assert [g["rank"] for g in sens["groups"]] == [1, 2, 3, 4, 5]
    assert all(g["bits_per_weight"] < 16.0 for g in sens["groups"])
    suggestion = sens["suggestion"]
    assert suggestion["keep_higher"][0] == groups[0] and suggestion["higher_format"] == "fp8"
    path = tmp_path / "suggested.yaml"
    path.write_text(suggestion["recipe_yaml"])
    recipe, _ = load_recipe(path)  # a valid recipe
    formats = {r.group: r.format for r in recipe.quantization.rules}
    assert formats[groups[0]] == "fp8" and formats[groups[-1]] == "nvfp4"
    assert not list(out.parent.glob(".omniquant-sensitivity-*"))  # probes cleaned up


def test_evs_sweep_in_the_report(cliff):
    report, _, _, _ = cliff
    assert report["evs"]["rates"] == [0.0, 0.25, 0.5, 0.75] and report["evs"]["video_samples"] == 2
    for model in _models(report):
        tokens = [r["video_tokens"] for r in model["evs"]]
        assert all(a > b for a, b in itertools.pairwise(tokens)), (model["name"], tokens)
        assert all(r["accuracy"] is not None and 0 <= r["accuracy"] <= 1 for r in model["evs"])
    assert report["baseline"]["evs"][0]["kl_mean"] == 0.0
    assert all(r["kl_mean"] > 0 for m in report["candidates"] for r in m["evs"])


def test_bf16_candidate_equals_baseline(tiny_dir, tmp_path):
    report = build_report(
        tiny_dir, [tiny_dir], "omni-smoke", tmp_path / "r", evs_rates=(0.0, 0.5), **FAST
    )
    base, same = report["baseline"], report["candidates"][0]
    assert same["name"] == "model (2)"
    for task, t in same["tasks"].items():
        assert t["kl_mean"] == 0.0 and t["top1_agreement"] == 1.0, task
        assert t["recovery"] == 1.0 and t["accuracy"] == base["tasks"][task]["accuracy"]
        lo, hi = t["accuracy_delta_ci95"]
        assert lo <= 0.0 <= hi and t["accuracy_delta"] == 0.0
    assert same["overall"]["kl_mean"] == 0.0 and same["kl_by_modality"] == dict.fromkeys(
        same["kl_by_modality"], 0.0
    )
    assert [s["prediction"] for s in same["samples"]] == [s["prediction"] for s in base["samples"]]
    assert [r["video_tokens"] for r in same["evs"]] == [128, 64]
    assert "every task recovers at least 95%" in same["verdict"]
    assert report["sensitivity"] is None


def test_verdict_names_tasks_under_the_threshold():
    from omniquant.report.stats import verdict

    summary = {
        "tasks": {
            "a": {
                "accuracy": 0.5,
                "baseline_accuracy": 1.0,
                "recovery": 0.5,
                "recovery_defined": True,
            },
            "b": {
                "accuracy": 1.0,
                "baseline_accuracy": 1.0,
                "recovery": 1.0,
                "recovery_defined": True,
            },
            "c": {
                "accuracy": 0.0,
                "baseline_accuracy": 0.0,
                "recovery": 1.0,
                "recovery_defined": False,
            },
        },
        "overall": {"kl_mean": 0.25, "top1_agreement": 0.9},
    }
    text, below = verdict("nvfp4", summary, 0.95)
    assert below == ["a"]
    assert text == (
        "nvfp4: recovery under 95% on 1 task(s): a (0.500 vs 1.000, recovery 50%). Baseline accuracy is 0 "
        "on c (recovery undefined, counted as 1; judge these by KL). Mean KL to the baseline 0.25 nats, "
        "top-1 agreement 90.0%."
    )


def test_preflight_errors(tiny_dir, quantized, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with argument_style(CLI_NAMES):  # the messages as `omniquant report` prints them
        with pytest.raises(ReportError, match=r"already holds report.json; pass --force"):
            build_report(tiny_dir, [tiny_dir], "omni-smoke", out)
        with pytest.raises(
            ReportError, match=r"--sensitivity quantizes groups from the baseline, which must be a BF16"
        ):
            build_report(
                quantized("fp8_omni"), [tiny_dir], "omni-smoke", tmp_path / "s", sensitivity=True
            )
        with pytest.raises(ReportError, match=r"every EVS rate must be in \[0, 1\)"):
            build_report(tiny_dir, [tiny_dir], "omni-smoke", tmp_path / "s", evs_rates=(0.0, 1.0))
        with pytest.raises(ReportError) as info:
            build_report(tiny_dir, [tmp_path / "nope"], "omni-smoke", tmp_path / "s")
        assert str(info.value) == (
            f"--candidate {tmp_path / 'nope'}: no such directory; pass a checkpoint directory (the BF16 "
            "source or an `omniquant quantize` output)."
        )
        (tmp_path / "empty").mkdir()
        with pytest.raises(ReportError, match=rf"--baseline {tmp_path / 'empty'}: no config.json"):
            build_report(tmp_path / "empty", [tiny_dir], "omni-smoke", tmp_path / "s")
    # A Python caller reads the arguments' own names.
    with pytest.raises(ReportError) as info:
        build_report(tiny_dir, [tmp_path / "nope"], "omni-smoke", tmp_path / "s")
    assert str(info.value).startswith(f"candidates {tmp_path / 'nope'}: no such directory")


def test_cli_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    out.mkdir()
    (out / "report.md").write_text("an older report")
    args = [
        "report",
        "--baseline",
        str(tiny_dir),
        "--candidate",
        str(tiny_dir),
        "--tasks",
        "omni-smoke",
        "--out",
        str(out),
        "--max-new-tokens",
        "2",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: --out {out}: already holds report.md; pass --force to overwrite, or choose another directory.\n"
    )
    assert main(args + ["--force"]) == 0
    text = capsys.readouterr().out
    assert "model (2)" in text and "min recov" in text and f"report: {out / 'report.html'}" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert "an older report" not in (out / "report.md").read_text()


def _screenshot(html: Path, png: Path, profile: Path, height: int) -> None:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size=1200,{height}",
        f"--screenshot={png}",
        html.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
@pytest.mark.slow  # starts a real browser
def test_html_renders_with_visible_plots_in_headless_chromium(cliff, tmp_path):
    from PIL import Image

    from omniquant.report.svg import PALETTE

    _, out, _, _ = cliff
    html = (out / "report.html").read_text()
    # Self-contained: no scripts, no fetched resources (the SVG namespace is not a fetch).
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert (
        html.count("<svg") >= 10
    )  # cliff x2, size, KL, agreement, EVS x2, heatmap x2, sensitivity
    png = tmp_path / "shot.png"
    _screenshot(out / "report.html", png, tmp_path / "profile", 7000)
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 7000)
    pixels = list(img.getdata())
    non_white = sum(1 for p in pixels if p != (255, 255, 255))
    assert non_white > 0.03 * len(pixels), non_white
    counts: dict[tuple[int, int, int], int] = {}
    for p in pixels:
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) > 100  # text, tables, bars, heatmap shades
    # Each model's bar colour is painted in solid areas: the plots themselves are visible.
    for hex_color in PALETTE[:3]:
        rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
        assert counts.get(rgb, 0) > 2000, (hex_color, counts.get(rgb, 0))
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_coverage_text_does_not_call_force_calibrated_experts_uncalibrated():
    from omniquant.report import svg
    from omniquant.report.render import _coverage_text

    cal = {"expert_tokens": {"l1": [3, 0, 0], "l3": [1, 2, 0]}, "experts_without_activations": 0}
    assert _coverage_text({**cal, "force_all_experts": True}) == (
        "3 of 6 experts were routed no token (force_all_experts ran every token through every "
        "expert; 0 expert GEMMs saw no input)"
    )
    assert _coverage_text({**cal, "force_all_experts": False}).endswith(
        "(their input scale comes from the other experts' traffic)"
    )
    forced = svg.heatmap(["l1"], ["0", "1"], [[3.0, 0.0]], "t", zero_note="routed no token, x")
    assert "red outline = routed no token, x" in forced and "received no calibration" not in forced


def test_a_checkpoint_given_as_dot_is_named_by_its_directory(tiny_dir, monkeypatch):
    from omniquant.evaluate.describe import describe_checkpoint

    monkeypatch.chdir(tiny_dir)
    assert describe_checkpoint(Path("."), "baseline")["name"] == tiny_dir.name

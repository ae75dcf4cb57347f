"""Calibration on real media: tokens per modality, EVS counts, expert coverage policy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniquant.cli import main
from omniquant.data.synthetic import synthetic_samples
from omniquant.errors import CalibrationError
from omniquant.models import load_model
from omniquant.quantize.calibrate import _Probe, run_calibration
from omniquant.quantize.pipeline import quantize
from omniquant.quantize.plan import resolve_plan, to_modelopt_config
from omniquant.quantize.recipe import load_recipe

STARVED = (6, 7)


@pytest.fixture(scope="module")
def starved_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a router bias that experts 6 and 7 never overcome."""
    d = tmp_path_factory.mktemp("starved") / "model"
    shutil.copytree(tiny_dir, d)
    t = load_file(str(d / "model.safetensors"))
    for k in t:
        if k.endswith("e_score_correction_bias"):
            t[k] = t[k].clone()
            t[k][list(STARVED)] = -10.0
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_omni_mix_reaches_all_modalities(tiny_dir, tmp_path, capsys):
    out = tmp_path / "mix"
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--calib", "omni-mix",
               "--set", "calibration.evs_rate=0.5", "--set", "calibration.size=8", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    cal = json.loads((out / "omniquant.json").read_text())["calibration"]
    assert cal["set"] == "omni-mix" and cal["samples"] == 8
    assert all(cal["tokens_by_modality"][m] > 0 for m in ("text", "image", "video", "audio"))
    evs = cal["evs"]
    assert evs["pruning_rate"] == 0.5
    assert evs["video_tokens_after"] == cal["tokens_by_modality"]["video"]
    assert 0 < evs["video_tokens_after"] < evs["video_tokens_before"]
    assert set(cal["expert_tokens"]) == {
        f"language_model.model.layers.{i}.mixer" for i in (1, 3, 5, 7)
    }
    assert all(len(c) == 8 and sum(c) > 0 for c in cal["expert_tokens"].values())


def test_starved_experts_fail_by_default(starved_dir, tmp_path):
    with pytest.raises(CalibrationError) as e:
        quantize(starved_dir, "fp8_omni", tmp_path / "o", calib="synthetic")
    msg = str(e.value)
    assert "4 MoE layer(s) have experts that received fewer than 1 calibration token(s)" in msg
    for layer in (1, 3, 5, 7):
        assert f"language_model.model.layers.{layer}.mixer: experts 6, 7" in msg
    assert "calibration.expert_coverage.policy=force_all_experts" in msg
    assert not (tmp_path / "o").exists()


def _calibrate(model_dir, policy):
    import modelopt.torch.quantization as mtq

    loaded = load_model(model_dir)
    rec, _ = load_recipe("nvfp4_omni")
    plan = resolve_plan(rec, loaded)
    root = loaded.model.language_model
    stats = run_calibration(
        loaded, synthetic_samples(loaded, 6), lambda loop: mtq.quantize(root, to_modelopt_config(plan, rec), loop),
        force_all_experts=policy == "force_all_experts",
    )  # fmt: skip
    return loaded, stats


def _starved(stats):
    """(layer, projection, expert) GEMMs whose input no calibration activation reached."""
    return sorted(
        (layer, proj, i)
        for layer, per in stats.expert_input_amax.items()
        for proj, vals in per.items()
        for i, v in enumerate(vals)
        if v == 0
    )


def _shared_input_amax_matches(loaded, stats):
    """modelopt's shared per-projection input amax is the max over the experts we observed."""
    mods = dict(loaded.model.named_modules())
    for layer, per in stats.expert_input_amax.items():
        experts = mods[f"{layer}.experts"]
        for proj, vals in per.items():
            q = getattr(experts, f"{proj}_input_quantizer")
            assert float(q.amax) == pytest.approx(max(vals), rel=1e-2), (layer, proj)


def test_force_all_experts_calibrates_every_expert(starved_dir):
    loaded, stats = _calibrate(starved_dir, "error")
    starved = _starved(stats)
    assert {i for _, _, i in starved} == set(STARVED)  # the test can fail: they really starve
    assert len(starved) == 4 * 2 * len(STARVED) == stats.experts_without_activations()
    _shared_input_amax_matches(loaded, stats)

    loaded, stats = _calibrate(starved_dir, "force_all_experts")
    assert _starved(stats) == [] and stats.experts_without_activations() == 0
    _shared_input_amax_matches(loaded, stats)
    assert all(c[6] == 0 and c[7] == 0 for c in stats.expert_tokens.values())  # natural counts kept
    assert stats.force_all_experts


def test_force_all_experts_does_not_change_outputs(starved_dir):
    loaded = load_model(starved_dir)
    samples = synthetic_samples(loaded, 5, seed=7)
    with torch.no_grad():
        plain = [loaded.adapter.forward(loaded.model, s).logits for s in samples]
        with _Probe(loaded, force_all_experts=True):
            forced = [loaded.adapter.forward(loaded.model, s).logits for s in samples]
    for a, b in zip(plain, forced):
        assert torch.equal(a, b)


def test_force_all_experts_end_to_end(starved_dir, tmp_path):
    res = quantize(starved_dir, "fp8_omni", tmp_path / "o", calib="synthetic",
                   overrides=["calibration.expert_coverage.policy=force_all_experts"])  # fmt: skip
    cal = res.manifest["calibration"]
    assert cal["force_all_experts"] is True
    assert res.manifest["warnings"] == []


def test_bad_calibration_set_fails_before_model_work(tiny_dir, bad_set, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(
        [
            "quantize",
            "--model",
            str(tiny_dir),
            "--recipe",
            "fp8_omni",
            "--calib",
            str(bad_set),
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 2
    assert "3 of 5 samples are bad:" in captured.err
    for needle in (
        "img/trunc.png: cannot decode image",
        "vid/fake.mp4: cannot decode video",
        "aud/missing.wav: file not found",
    ):
        assert needle in captured.err
    assert "plan (" not in captured.out  # failed before the model was loaded and planned
    assert not out.exists()


def test_skip_bad_proceeds_and_reports(tiny_dir, bad_set, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--calib", str(bad_set),
               "--skip-bad", "--quiet", "--out", str(out),
               "--set", "calibration.expert_coverage.policy=warn"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "skipped 3 bad calibration sample(s)" in captured.out
    meta = json.loads((out / "omniquant.json").read_text())
    assert len(meta["calibration"]["skipped_samples"]) == 3
    assert meta["calibration"]["samples"] == 2
    assert "skipped 3 bad calibration sample(s)" in meta["warnings"]
    assert meta["calibration"]["set_dir"] == str(bad_set.resolve())
    assert meta["source"]["path"] == str(tiny_dir.resolve())
    assert meta["calibration"]["bad_lines_not_used"] == []


def test_bad_lines_after_the_used_prefix_are_not_called_skipped(
    tiny_dir,
    bad_set,
    tmp_path,
    capsys,
):
    """calibration.size=1 uses line 1 only: the bad lines 2-4 were never needed."""
    out = tmp_path / "o"
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--calib", str(bad_set),
               "--skip-bad", "--quiet", "--out", str(out), "--set", "calibration.size=1",
               "--set", "calibration.expert_coverage.policy=warn"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "skipped" not in captured.out and "3 bad line(s) after the last sample" in captured.out
    meta = json.loads((out / "omniquant.json").read_text())
    assert meta["calibration"]["samples"] == 1
    assert meta["calibration"]["skipped_samples"] == []
    assert len(meta["calibration"]["bad_lines_not_used"]) == 3
    assert not any("skipped" in w for w in meta["warnings"])

"""benchmarks/gpu/: the GPU check, rehearsed on the CPU. One test per way the first
version would have lost its only paid run (issue 28), and the whole script end to end
with ``--device cpu --scale tiny`` (everything but the CUDA calls)."""

from __future__ import annotations

import json
import time
import weakref

import pytest
import torch

from benchmarks.gpu import budget, environment, gpu_check, runner
from benchmarks.gpu.runner import Runner, Step, StopCheck

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the rehearsal


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_end_to_end(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = gpu_check.main(["--scale", "tiny", "--device", "cpu", "--samples", "1",
                          "--out", str(out), "--work", str(tmp_path / "work")])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    steps = res["steps"]
    assert list(steps) == ["versions", "suite_gpu_tests", "ext_warmup", "nvfp4_compare", "build_source",
                           "quantize/nvfp4_omni", "quantize/fp8_omni", "cpu_vs_gpu", "auto_offload",
                           "algorithms"]  # fmt: skip
    for name, s in steps.items():
        assert s["status"] == "ok", (name, s.get("traceback"))
        assert s["budget_s"] > 0 and s["wall_s"] >= 0 and s["peak_host_bytes"] > 0, name
        assert s["host_peak_reset"] is True, name
    assert res["rehearsal"] and res["finished"]
    # The suite's GPU tests exist and skip here (one per float dtype + the export test).
    suite = steps["suite_gpu_tests"]
    assert suite["skipped"] == len(suite["cases"]) >= 3 and not suite["cuda_ran"]
    cmp = steps["nvfp4_compare"]
    assert cmp["model"]["dtype"] == "bfloat16"
    # A BF16 source loaded as float32: the exported bytes are the fake quant's weights.
    assert cmp["weights"]["tensors"] > 0 and cmp["weights"]["bit_exact"], cmp["weights"]["worst"]
    assert cmp["logits"]["emulated_finite"] and "needs CUDA" in cmp["logits"]["fake_quant"]
    q = steps["quantize/fp8_omni"]
    assert set(q["phases"]) == {"load", "plan", "calibration_data", "calibration_forward",
                                "quantize_other", "export", "audit"}  # fmt: skip
    assert q["plan_estimate"]["weights_bytes"] > 0 and q["devices"]["per_device"].keys() == {"cpu"}
    assert all(r["identical"] for r in steps["cpu_vs_gpu"]["recipes"].values())
    assert (
        steps["auto_offload"]["devices"]["offloaded"]
        and steps["auto_offload"]["vs_cpu"]["identical"]
    )
    assert "mse" in steps["algorithms"]["rows"]
    assert not (tmp_path / "work").exists()  # sources and outputs are removed


def test_real_scale_budget_fits_six_minutes_and_is_printed_first(tmp_path, capsys):
    out = tmp_path / "plan.json"
    # The GPU machine's 64 GiB disk, not this machine's free space (which other work moves).
    gpu_check.main(["--scale", "real", "--device", "cpu", "--plan-only", "--out", str(out),
                    "--work", str(tmp_path / "w"), "--free-disk", str(64 * 2**30)])  # fmt: skip
    res = json.loads(out.read_text())
    assert res["estimated_total_s"] <= budget.TOTAL_BUDGET_S
    assert res["preflight"]["layers"] == 8 and res["preflight"]["fits"]
    assert 10 * 2**30 < res["preflight"]["source_bytes"] < 11 * 2**30  # "8 layers, ~10 GiB"
    pending = [n for n, s in res["steps"].items() if s["status"] == "pending"]
    assert len(pending) == 9 and all(res["steps"][n]["arithmetic"] for n in pending)
    printed = capsys.readouterr().out
    assert "estimated time per step" in printed and "quantize/nvfp4_omni" in printed
    assert f"total {res['estimated_total_s']:.0f} s" in printed  # the pre-flight counted in


def test_disk_preflight_lowers_the_layer_count():
    sizes = {"rest": 3 * 2**30, "layers": [2**30] * 8}  # 11 GiB at 8 layers
    roomy = budget.fit_layers(sizes, 8, 2**30, 64 * 2**30, 0, 4, 2)
    assert roomy["layers"] == 8 and roomy["fits"] and not roomy["lowered_because"]
    tight = budget.fit_layers(sizes, 8, 2**30, 16 * 2**30, 0, 4, 2)  # 2 x (3 + n) + 2 <= 16
    assert tight["layers"] == 4 and tight["fits"] and "disk" in tight["lowered_because"][0]
    slow = budget.fit_layers(sizes, 8, 2**30, 64 * 2**30, budget.TOTAL_BUDGET_S - 10, 4, 2)
    assert slow["layers"] == budget.MIN_LAYERS and not slow["fits"]


# ---------------------------------------------------------------- defect 1: generator


class _GeneratorDeviceCheck(torch.overrides.TorchFunctionMode):
    """Refuses what CUDA refuses: a draw whose generator is not on the device the tensor
    is made on (the default device when none is named)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None and func in (torch.randn, torch.rand, torch.randint, torch.normal):
            target = torch.device(kwargs.get("device") or torch.get_default_device())
            if target.type != gen.device.type:
                raise RuntimeError(f"Expected a '{target.type}' device type for generator")
        return func(*args, **kwargs)


def test_tiny_model_builds_under_another_default_device():
    """``with torch.device("cuda")`` around the build (the GPU check) failed on the router
    bias draw; "meta" stands in for CUDA, the mode for CUDA's generator check."""
    from benchmarks.gpu import sources
    from omniquant.demo import tiny

    tok = tiny.build_tokenizer()
    with torch.device("meta"), _GeneratorDeviceCheck():
        model = tiny._build_from_kwargs(sources.config_kwargs("tiny", 0), tok, 0, dtype="bfloat16")
    assert next(model.parameters()).device.type == "meta"
    # The check bites: a CPU generator drawing on the default device.
    with (
        pytest.raises(RuntimeError, match="device type for generator"),
        torch.device("meta"),
        _GeneratorDeviceCheck(),
    ):
        torch.randn(3, generator=torch.Generator())


# ---------------------------------------------------------------- defect 2: compare dtype


@pytest.mark.slow
def test_a_float32_compare_source_would_show_differences(tmp_path):
    """What a float32 source does: export quantizes bf16(w), the fake quant w."""
    from benchmarks.gpu import compare, sources

    res = compare.compare_nvfp4(
        tmp_path, sources.config_kwargs("tiny", 0), "cpu", 1, source_dtype="float32"
    )
    assert res["weights"]["differing"] > 0 and not res["weights"]["bit_exact"]


# ---------------------------------------------------------------- the runner (defects 1, 6, 7)


def _runner(tmp_path, **kw):
    lines = []
    return Runner(tmp_path / "r.json", {}, log=lines.append, **kw), lines


def test_failed_step_keeps_its_traceback_frees_its_memory_and_later_steps_run(tmp_path):
    held = []

    def failing():
        big = torch.ones(1000, 1000)
        held.append(weakref.ref(big))
        raise ValueError("boom in the middle")

    r, _ = _runner(tmp_path)
    steps = [Step("a", failing, 1, "x"), Step("b", lambda: {"x": 1}, 1, "x"),
             Step("c", dict, 1, "x", needs=("a",))]  # fmt: skip
    r.plan(steps)
    res = r.run(steps)
    a = res["steps"]["a"]
    assert a["status"] == "failed" and a["error"] == "ValueError: boom in the middle"
    assert "Traceback (most recent call last)" in a["traceback"] and "in failing" in a["traceback"]
    assert held[0]() is None  # the failed step's tensor is gone (its frames were cleared)
    assert res["steps"]["b"] == {**res["steps"]["b"], "status": "ok", "x": 1}
    assert res["steps"]["c"]["status"] == "skipped" and "needs a" in res["steps"]["c"]["reason"]
    assert json.loads((tmp_path / "r.json").read_text())["steps"]["c"]["status"] == "skipped"


def test_stop_check_skips_every_later_step_with_the_reason(tmp_path):
    def wrong():
        raise StopCheck("transformers 5.17.0 is not the tested 5.23.0")

    r, _ = _runner(tmp_path)
    steps = [Step("versions", wrong, 1, "x"), Step("b", dict, 1, "x"), Step("c", dict, 1, "x")]
    r.plan(steps)
    res = r.run(steps)
    assert [res["steps"][n]["status"] for n in "bc"] == ["skipped", "skipped"]
    assert "5.17.0" in res["steps"]["c"]["reason"]


def test_running_marker_is_saved_before_the_step(tmp_path):
    seen = {}

    def look():
        seen.update(json.loads((tmp_path / "r.json").read_text())["steps"])
        return {}

    r, _ = _runner(tmp_path)
    steps = [Step("a", look, 1, "x"), Step("b", dict, 1, "x")]
    r.plan(steps)
    r.run(steps)
    assert seen["a"]["status"] == "running" and seen["b"]["status"] == "pending"


def test_steps_past_their_limit_or_the_deadline(tmp_path):
    r, _ = _runner(tmp_path, deadline_s=5)
    steps = [
        Step("slow", lambda: time.sleep(3) or {}, 1, "x", limit_s=0.5),
        Step("big", dict, 60, "x"),
    ]
    r.plan(steps)
    res = r.run(steps)
    assert (
        res["steps"]["slow"]["status"] == "failed"
        and "StepTimeout" in res["steps"]["slow"]["error"]
    )
    assert (
        res["steps"]["big"]["status"] == "skipped" and "deadline" in res["steps"]["big"]["reason"]
    )


def test_host_peak_resets_per_step():
    if runner.host_peak_bytes() is None:
        pytest.skip("no /proc/self/status")
    block = bytearray(200 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    high = runner.host_peak_bytes()
    del block
    assert runner.reset_host_peak()
    assert runner.host_peak_bytes() < high - 150 * 2**20


# ---------------------------------------------------------------- versions, extensions


def test_version_mismatch_stops_with_one_clear_line(capsys):
    got = {"torch": "2.11.0+cu130", "torch_cuda": "13.0", "transformers": "5.17.0",
           "nvidia-modelopt": "0.47.0", "cuda_available": "True"}  # fmt: skip
    with pytest.raises(StopCheck, match=r"transformers 5\.17\.0 is not the tested 5\.23\.0"):
        environment.check_versions("cuda", installed=got)
    assert "VERSION MISMATCH: transformers 5.17.0" in capsys.readouterr().out
    ok = environment.check_versions("cuda", installed={**got, "transformers": "5.23.0"})
    assert "torch 2.11.0+cu130 is not the tested 2.13.0" in ok["notes"][0]  # noted, not fatal
    with pytest.raises(StopCheck, match="needs a CUDA build of torch"):
        environment.check_versions(
            "cuda", installed={**got, "transformers": "5.23.0", "torch_cuda": None}
        )


def test_extension_warmup_names_missing_prerequisites_before_compiling():
    pre = {"c++": "/usr/bin/c++", "Python.h": None, "ninja": None, "nvcc": "/usr/bin/nvcc"}
    with pytest.raises(RuntimeError, match="missing Python.h, ninja"):
        environment.warm_up_extensions(True, 1, prerequisites=pre)
    off = environment.warm_up_extensions(False, 1, prerequisites=pre)
    assert off["missing"] == ["Python.h", "ninja"] and off["compile"].startswith("not run")


def test_suite_gpu_test_ids_exist():
    for node in environment.SUITE_GPU_TESTS:
        path, name = node.split("::")
        assert f"def {name}(" in (environment.ROOT / path).read_text(), node


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without CUDA")
def test_cuda_without_cuda_is_recorded(tmp_path):
    out = tmp_path / "r.json"
    gpu_check.main(["--out", str(out), "--work", str(tmp_path / "w")])
    assert "CUDA is not available" in json.loads(out.read_text())["error"]


def test_requirements_missing_on_the_image_are_noted_unless_the_check_needs_them(monkeypatch):
    """The image lacks PyAV and fastapi (media decoding, the server): noted, the check
    goes on; a tokenizers outside transformers' range stops it."""
    import importlib.metadata as md

    real = md.version
    image = {"av": None, "fastapi": None, "tokenizers": "0.23.2"}

    def fake(name):
        if name in image:
            if image[name] is None:
                raise md.PackageNotFoundError(name)
            return image[name]
        return real(name)

    monkeypatch.setattr(md, "version", fake)
    problems, notes = environment._requirement_problems(environment.ROOT)
    assert problems == [] and any(n.startswith("av is not installed") for n in notes)
    image["tokenizers"] = "0.22.0"
    problems, _ = environment._requirement_problems(environment.ROOT)
    assert problems and problems[0].startswith("tokenizers 0.22.0 does not satisfy transformers'")

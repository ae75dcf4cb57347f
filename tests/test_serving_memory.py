"""Serving memory beside the weights (``omniquant.quantize.serving_memory``): the released
configuration's terms against the numbers written out by hand, the plan's printout and the
refusal that names the terms."""

from __future__ import annotations

import pytest

from omniquant.errors import PlanError


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from omniquant.demo.tiny import write_config_only
    from omniquant.models import load_model

    path = tmp_path_factory.mktemp("released") / "cfg"
    write_config_only(path)
    return load_model(path, weights=False)


def test_released_terms_by_hand(released):
    from omniquant.quantize.serving_memory import serving_memory_for

    mem = serving_memory_for(released, context=32768, batch=8, kv_cache="fp8",
                             gpu_memory=80 * 2**30, weights_bytes=22_390_012_560)  # fmt: skip
    # 6 attention layers, 2 KV heads x 128, FP8: 1 byte.
    assert mem.terms["kv_cache"] == 6 * 2 * 2 * 128 * 32768 * 8 * 1
    # 23 Mamba layers; conv state 3 x (64 x 64 + 2 x 8 x 128) in BF16; SSM 64 x 64 x 128 in FP32.
    assert mem.terms["mamba_conv_state"] == 23 * 8 * 3 * (64 * 64 + 2 * 8 * 128) * 2
    assert mem.terms["mamba_ssm_state"] == 23 * 8 * 64 * 64 * 128 * 4
    # RADIO: 1280 wide, MLP 5120: live width max(5 x 1280, 2 x 1280 + 5120) = 7680; a video of
    # 32768 / 256 = 128 tubelets of 1024 + 10 patches is the largest input.
    assert mem.terms["encoder_activations"] == 128 * 1034 * 7680 * 2
    assert mem.terms["runtime_reserve"] == 8 * 2**30
    assert mem.weights_budget == 80 * 2**30 - sum(mem.terms.values())
    assert mem.fits is True
    bf16 = serving_memory_for(released, context=32768, batch=8, kv_cache="bf16")
    assert bf16.terms["kv_cache"] == 2 * mem.terms["kv_cache"]
    assert "runtime_reserve" not in bf16.terms and bf16.weights_budget is None


def test_state_alone_beyond_the_gpu_is_refused_naming_the_terms(released):
    from omniquant.quantize.serving_memory import serving_memory_for

    with pytest.raises(PlanError) as err:
        serving_memory_for(released, context=1_000_000, batch=64, kv_cache="bf16",
                           gpu_memory=32 * 2**30)  # fmt: skip
    msg = str(err.value)
    assert msg.startswith("gpu_memory 32.00 GiB: KV cache and Mamba state alone need ")
    for term in ("kv_cache", "mamba_conv_state", "mamba_ssm_state", "use an FP8 KV cache"):
        assert term in msg
    for bad in ({"context": 0}, {"batch": 0}, {"kv_cache": "int8"}):
        kwargs = {"context": 8, "batch": 1, "kv_cache": "fp8", **bad}
        with pytest.raises(PlanError):
            serving_memory_for(released, **kwargs)


def test_plan_prints_serving_memory(released, capsys):
    from omniquant.cli import main

    rc = main(["plan", "--model", str(released.path), "--recipe", "nvfp4_omni",
               "--context", "32768", "--batch", "8", "--gpu-memory", "80GiB"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "serving memory (by arithmetic, vLLM's layout):" in out
    assert "kv_cache: 6 attention layers x 2 (K, V) x 2 KV heads x head_dim 128" in out
    assert "mamba_ssm_state: 23 Mamba layers x batch 8 x 64 heads x 64 x state 128 x 4 B" in out
    assert "weights 22,390,012,560 (20.85 GiB) fits" in out

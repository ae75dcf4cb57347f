"""Where the model lives (--device, --max-memory) and the streaming export: same bytes
wherever the tiny model is placed on the CPU, sharding and index kept."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniquant.cli import CLI_NAMES, main
from omniquant.devices import parse_max_memory, resolve_placement
from omniquant.errors import DeviceError, argument_style

pytestmark = pytest.mark.usefixtures("one_thread")

# Shard checksums of the tiny model (seed 0, synthetic calibration) computed with main's
# export at b58fac9 (before streaming), single file and resharded into three.
PINNED = {
    "fp8_omni": {
        "model.safetensors": "363733deed6d0dd0509aa1dde325cd3dee13405b66ba996c844d673c634fc481"
    },
    "nvfp4_omni": {
        "model.safetensors": "bd3701228b6cd6b02c93f19cebf0f0634776535c24cdeffa564285803a81f58b"
    },
}
PINNED_3 = {
    "fp8_omni": {
        "model-00001-of-00003.safetensors": "1f8acc3594e0ac499b509496b3d14fd94bf6ff47a4758474f2d54d1d49a10a34",
        "model-00002-of-00003.safetensors": "00aa0dd73964dc3718d05664fa8f53d877faa4b9ec57ca52d79d5beb8493f24c",
        "model-00003-of-00003.safetensors": "1f315c61fa63a17d42d01117f8073eb89e2b0e7375bdb3cb1024aa82a920729c",
    },
    "nvfp4_omni": {
        "model-00001-of-00003.safetensors": "d1847c0d544b2d9eeabbf02408d5c0b391a7cd85137f6b8abd046173aefc4074",
        "model-00002-of-00003.safetensors": "f5e025d727e2f635e8e53941aeeee02e64a228d56a45842796b4a6743fe73096",
        "model-00003-of-00003.safetensors": "1f315c61fa63a17d42d01117f8073eb89e2b0e7375bdb3cb1024aa82a920729c",
    },
}


def reshard(src, dst, n: int):
    """Copy checkpoint ``src`` to ``dst`` with its tensors split over ``n`` shards (in the
    file's key order) and a ``model.safetensors.index.json``."""
    shutil.copytree(
        src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json")
    )
    weight_map = {}
    with safe_open(src / "model.safetensors", "pt") as fh:
        names = list(fh.keys())
        per = -(-len(names) // n)
        for i in range(n):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: fh.get_tensor(k) for k in names[i * per : (i + 1) * per]}
            save_file(part, str(dst / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return dst


@pytest.fixture(scope="module")
def sharded_dir(tiny_dir, tmp_path_factory):
    return reshard(tiny_dir, tmp_path_factory.mktemp("sharded") / "model", 3)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- parsing, errors
def test_max_memory_parses_gpus_cpu_and_units():
    assert parse_max_memory("0=120GiB, 1=80GB,cpu=512MiB") == {
        0: 120 * 2**30,
        1: 80 * 10**9,
        "cpu": 512 * 2**20,
    }
    assert parse_max_memory("cuda:2=1000") == {2: 1000}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0:120GiB", "expected DEVICE=SIZE"),
        ("gpu0=1GiB", "unknown device 'gpu0'"),
        ("cpu=lots", "'lots' is not a size"),
        ("cpu=1GiB,cpu=2GiB", "given twice"),
    ],
)
def test_max_memory_errors_name_the_entry(text, needle):
    with pytest.raises(DeviceError, match=needle):
        parse_max_memory(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without CUDA")
def test_placement_without_cuda():
    auto = resolve_placement("auto", None)
    assert (auto.kind, auto.device) == ("single", "cpu")
    assert resolve_placement(None, None).device == "cpu"
    offload = resolve_placement("auto", "cpu=1MiB")
    assert offload.kind == "dispatch" and offload.max_memory == {"cpu": 2**20}
    with argument_style(CLI_NAMES):  # the messages as the `omniquant` command prints them
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(DeviceError, match=f"--device {dev}: CUDA is not available"):
                resolve_placement(dev, None)
        with pytest.raises(DeviceError, match="GPU 0 is not visible on this host"):
            resolve_placement("auto", "0=10GiB,cpu=1GiB")
        with pytest.raises(DeviceError, match="unknown device; choose one of cpu, cuda, cuda:N, auto"):
            resolve_placement("tpu", None)
        with pytest.raises(DeviceError, match="--max-memory is a budget for --device auto"):
            resolve_placement("cpu", "cpu=1GiB")
    # A Python caller reads the arguments' own names.
    with pytest.raises(DeviceError, match="^max_memory is a budget for device auto"):
        resolve_placement("cpu", "cpu=1GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without CUDA")
def test_cli_cuda_without_cuda_is_a_clear_error(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out),
               "--calib", "synthetic", "--device", "cuda", "--quiet"])  # fmt: skip
    err = capsys.readouterr()
    assert rc == 2 and not out.exists()
    assert "--device cuda: CUDA is not available" in err.out + err.err
    assert "Traceback" not in err.out + err.err


# ------------------------------------------------------------ same bytes everywhere
@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_default_placement_keeps_pinned_bytes_and_records_devices(quantized, recipe):
    # The session fixture quantizes with the default --device auto: the CPU here.
    out = quantized(recipe)
    meta = json.loads((out / "omniquant.json").read_text())
    assert meta["shards"] == PINNED[recipe]
    assert {s: _sha(out / s) for s in meta["shards"]} == PINNED[recipe]
    dev = meta["devices"]
    if not torch.cuda.is_available():
        assert dev["requested"] == "auto" and dev["placement"] == "single"
        assert list(dev["per_device"]) == ["cpu"] and dev["inputs_on"] == "cpu"
        assert "no CUDA device: auto means cpu" in dev["notes"]
        assert meta["kernels"]["mamba_path"] == "PyTorch reference scan (transformers fallback)"
    assert set(meta["kernels"]["importable"]) == {"mamba_ssm", "causal_conv1d"}
    assert meta["peak_memory"]["host_peak_rss_bytes"] >= meta["peak_memory"]["host_rss_bytes"] > 0


def _check_index(out, src):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    on_disk = {}
    for shard in sorted({*index["weight_map"].values()}):
        with safe_open(out / shard, "pt") as fh:
            on_disk.update(dict.fromkeys(fh.keys(), shard))
    assert index["weight_map"] == on_disk
    assert sorted(set(on_disk.values())) == sorted(set(src_map.values()))
    for k, shard in src_map.items():  # every source tensor stays in its shard
        assert on_disk[k] == shard, k
    for k, shard in on_disk.items():  # scales sit in the shard of the weight they scale
        if k not in src_map:
            assert shard == src_map[k.rsplit(".", 1)[0] + ".weight"], k
    size = 0
    for shard in set(on_disk.values()):
        with safe_open(out / shard, "pt") as fh:
            size += sum(fh.get_tensor(k).nbytes for k in fh.keys())  # noqa: SIM118 (a safetensors handle is not iterable)
    assert index["metadata"]["total_size"] == size


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp8_omni", "nvfp4_omni"])
def test_multi_shard_source_cpu_and_offload_give_the_same_shards(sharded_dir, tmp_path, recipe):
    base = ["quantize", "--model", str(sharded_dir), "--recipe", recipe, "--calib", "synthetic", "--quiet"]
    cpu, off = tmp_path / "cpu", tmp_path / "offload"
    assert main([*base, "--out", str(cpu), "--device", "cpu"]) == 0
    # 300 KB of CPU for a 1.3 MB model: accelerate offloads most layers to disk.
    assert main([*base, "--out", str(off), "--device", "auto", "--max-memory", "cpu=300KB"]) == 0
    for out in (cpu, off):
        meta = json.loads((out / "omniquant.json").read_text())
        assert meta["shards"] == PINNED_3[recipe]
        assert {s: _sha(out / s) for s in meta["shards"]} == PINNED_3[recipe]
        _check_index(out, sharded_dir)
    dev = json.loads((off / "omniquant.json").read_text())["devices"]
    assert dev["placement"] == "dispatch" and dev["offloaded"] == ["cpu", "disk"]
    assert dev["per_device"]["disk"]["parameters"] > 0 and dev["max_memory"] == {"cpu": 300_000}
    assert not list(tmp_path.glob(".omniquant-offload-*"))  # offload folder removed


def test_layerwise_calibration_is_refused_with_the_reason(capsys, tiny_dir, tmp_path):
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out",
               str(tmp_path / "o"), "--set", "calibration.layerwise=true"])  # fmt: skip
    err = capsys.readouterr()
    text = err.out + err.err
    assert rc == 2 and "Traceback" not in text
    assert "layerwise: true is not supported" in text and "--max-memory" in text

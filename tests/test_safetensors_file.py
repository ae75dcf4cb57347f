"""omniquant's safetensors writer against safetensors' own ``save_file``: the same bytes,
and a sha256 of those bytes, whether written with direct I/O, through the page cache, or
after a file system refuses direct writes part way."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniquant.checkpoint import safetensors_file as sf
from omniquant.checkpoint.safetensors_file import SafetensorsWriter, header_bytes


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(sf._DTYPES):
        size = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (3 + i, 5 * size), dtype=torch.uint8, generator=g)
        # random bytes reinterpreted: every dtype gets arbitrary bit patterns (NaNs included)
        out[f"t.{i}.{str(dtype).split('.')[-1]}"] = raw.view(dtype)
    out["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    out["empty"] = torch.empty(0, 4, dtype=torch.float32)
    out["a.same_dtype_name_order"] = torch.ones(2, dtype=torch.float32)
    out["b"] = torch.arange(7, dtype=torch.int64)
    return out


def _both(tmp_path, tensors, metadata, **kw) -> tuple[bytes, bytes, str]:
    ref, ours = tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, str(ref), metadata=metadata)
    with SafetensorsWriter(**kw) as w:
        digest = w.write(ours, tensors, metadata)
    return ref.read_bytes(), ours.read_bytes(), digest


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_same_bytes_as_save_file_for_every_dtype(tmp_path, metadata):
    tensors = _every_dtype()
    ref, ours, digest = _both(tmp_path, tensors, metadata)
    assert ours == ref
    assert digest == hashlib.sha256(ref).hexdigest()
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_names_needing_json_escapes_and_unicode(tmp_path):
    names = ['q"uote', "back\\slash", "tab\tnew\nline", "ctrl\x01\x1f", "del\x7f", "ümlaut.ß", "z", "A"]
    tensors = {n: torch.full((i + 1,), i, dtype=torch.float16) for i, n in enumerate(names)}
    ref, ours, _ = _both(tmp_path, tensors, {"format": "pt"})
    assert ours == ref


@pytest.mark.parametrize("chunk", [4096, 8192, 3 * 4096])
def test_chunk_boundaries_inside_tensors_and_header(tmp_path, chunk):
    """Small chunks put boundaries inside the header, inside tensors and on their edges."""
    tensors = {f"w{i}": torch.randn(i * 331 + 1, dtype=torch.float32) for i in range(12)}
    tensors["exact"] = torch.zeros(chunk, dtype=torch.uint8)
    ref, ours, digest = _both(tmp_path, tensors, {"format": "pt"}, chunk=chunk)
    assert ours == ref
    assert digest == hashlib.sha256(ref).hexdigest()


def test_a_file_of_exactly_whole_chunks(tmp_path):
    n = 8000
    for _ in range(3):  # header + data = two 4 KiB chunks exactly (the header holds n)
        n = 2 * 4096 - len(header_bytes({"x": torch.zeros(n, dtype=torch.uint8)}, None)[0])
    tensors = {"x": torch.arange(n, dtype=torch.int64).to(torch.uint8)}
    ref, ours, _ = _both(tmp_path, tensors, None, chunk=4096)
    assert len(ref) == 2 * 4096
    assert ours == ref


def test_page_cache_writes_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIQUANT_DIRECT_IO", "0")
    tensors = _every_dtype()
    ref, ours, digest = _both(tmp_path, tensors, {"format": "pt"})
    assert ours == ref and digest == hashlib.sha256(ref).hexdigest()


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path):
    with SafetensorsWriter(chunk=4096) as w:
        w.write(tmp_path / "x.safetensors", {"x": torch.ones(10_000)})
    mode = w.modes["x.safetensors"]
    # tmpfs refuses O_DIRECT; the suite's tmp_path is on it on some machines
    assert mode == "direct" or _refuses_direct(tmp_path)


def _refuses_direct(folder) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return True
    os.close(fd)
    return False


def test_a_write_refused_part_way_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse a write with EINVAL."""
    real_write, calls = os.write, []

    def flaky(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(sf.os, "write", flaky)
    tensors = {f"w{i}": torch.randn(5000, dtype=torch.float32) for i in range(4)}
    ref, ours, digest = _both(tmp_path, tensors, {"format": "pt"}, chunk=4096)
    assert ours == ref and digest == hashlib.sha256(ref).hexdigest()
    assert len(calls) > 2


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(sf.os, "write", lambda fd, data: real_write(fd, data[:1000]))
    monkeypatch.setenv("OMNIQUANT_DIRECT_IO", "0")
    tensors = {"w": torch.randn(7000, dtype=torch.float32)}
    ref, ours, _ = _both(tmp_path, tensors, None, chunk=8192)
    assert ours == ref


def test_a_failed_write_raises_and_waits_for_its_hashes(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sf.os, "write", full)
    with SafetensorsWriter(chunk=4096) as w, pytest.raises(OSError, match="No space"):
        w.write(tmp_path / "x.safetensors", {"x": torch.ones(10_000)})


def test_dtype_outside_the_table_goes_to_save_file(tmp_path, monkeypatch):
    monkeypatch.delitem(sf._DTYPES, torch.float16)
    tensors = {"h": torch.ones(3, dtype=torch.float16), "f": torch.ones(2)}
    ref, ours, digest = _both(tmp_path, tensors, {"format": "pt"})
    assert ours == ref and digest == hashlib.sha256(ref).hexdigest()


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"w": torch.ones(4, 4).t()}, "'w' is not contiguous"),
        ({"__metadata__": torch.ones(1)}, "__metadata__"),
        ({"s": torch.eye(3).to_sparse()}, "'s' is sparse"),
    ],
)
def test_refused_tensors_name_themselves(tmp_path, tensors, match):
    with SafetensorsWriter() as w, pytest.raises(ValueError, match=match):
        w.write(tmp_path / "x.safetensors", tensors)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_the_reader_gives_back_every_tensor_as_stored(tmp_path, monkeypatch, direct):
    """Tensors at every alignment (odd sizes shift each next one), scalars and empties."""
    from omniquant.checkpoint.safetensors_file import DirectTensorReader

    monkeypatch.setenv("OMNIQUANT_DIRECT_IO", direct)
    tensors = _every_dtype()
    tensors.update({f"odd{i}": torch.randn(i * 997 + 3, dtype=torch.float16) for i in range(6)})
    tensors["big"] = torch.randint(0, 255, (3, 5000), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with DirectTensorReader(tmp_path / "x.safetensors") as r:
        r.read("big")
        grown = r._buf
        for name in ["big", *sorted(tensors)]:
            got, want = r.read(name), tensors[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
        assert r._buf is grown  # smaller reads after the largest reuse its buffer


def test_the_reader_refuses_a_file_cut_short(tmp_path):
    from omniquant.checkpoint.safetensors_file import DirectTensorReader

    f = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(10_000)}, str(f))
    os.truncate(f, f.stat().st_size - 100)
    with DirectTensorReader(f) as r, pytest.raises(OSError, match="ends before tensor 'a' does"):
        r.read("a")


def test_the_reader_goes_on_through_the_page_cache_when_a_direct_read_is_refused(tmp_path, monkeypatch):
    from omniquant.checkpoint.safetensors_file import DirectTensorReader

    f = tmp_path / "x.safetensors"
    tensors = {"a": torch.randn(3000), "b": torch.randn(5, 7)}
    save_file(tensors, str(f))
    real, calls = os.preadv, []

    def refuse_first(fd, views, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, views, offset)

    monkeypatch.setattr(sf.os, "preadv", refuse_first)
    with DirectTensorReader(f) as r:
        assert all(torch.equal(r.read(k), v) for k, v in tensors.items())
        assert not r.direct
    assert len(calls) >= 3

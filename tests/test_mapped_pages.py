"""Dropping a load's mapped safetensors pages (omniquant/models/mapped_pages.py) loses no byte."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from omniquant.models.mapped_pages import drop_mapped_pages, private_mappings

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise")


def _rss_file_kib() -> int:
    from pathlib import Path

    text = Path("/proc/self/status").read_text().splitlines()
    line = next(x for x in text if x.startswith("RssFile"))
    return int(line.split()[1])


@linux
def test_unwritten_pages_go_and_written_pages_stay(tmp_path):
    """Pages read from a private file mapping leave the resident set and read back the same;
    a page written in place (copy-on-write: a weight changed by an algorithm) keeps its bytes."""
    path = tmp_path / "shard.bin"
    data = bytes(range(256)) * 4096 * 16  # 16 MiB
    path.write_bytes(data)
    with open(path, "r+b") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE)
    view = torch.frombuffer(mapped, dtype=torch.uint8)
    before = int(view.sum())  # every page resident
    view[5000] = 7  # page 1 is now the process's own copy
    assert private_mappings([path])
    resident = _rss_file_kib()
    advised = drop_mapped_pages([path])
    assert advised >= len(data) - 2 * mmap.PAGESIZE
    assert _rss_file_kib() < resident - 8 * 1024  # most of the 16 MiB left the resident set
    assert int(view[5000]) == 7  # the written page was kept
    assert int(view.sum()) == before - (5000 % 256) + 7  # every other byte reads the same
    assert drop_mapped_pages([tmp_path / "not-mapped.bin"]) == 0
    del view
    mapped.close()


@linux
def test_a_load_with_pages_dropped_has_the_same_tensors(tiny_dir, monkeypatch):
    """The tiny model loaded with the drop after every tensor (the real load drops every
    256 MiB) equals the same load without it, tensor for tensor, bit for bit."""
    import contextlib

    from omniquant.models import load_model, mapped_pages

    def states():
        loaded = load_model(tiny_dir)
        return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}

    monkeypatch.setattr(mapped_pages, "drop_interval", lambda files: 1)
    dropped = states()
    monkeypatch.setattr(
        mapped_pages, "released_while_loading", lambda files, every_bytes=0: contextlib.nullcontext()
    )
    plain = states()
    assert dropped.keys() == plain.keys()
    for k in plain:
        assert dropped[k].dtype == plain[k].dtype and torch.equal(
            dropped[k].view(-1).view(torch.uint8) if dropped[k].dim() else dropped[k],
            plain[k].view(-1).view(torch.uint8) if plain[k].dim() else plain[k],
        ), k

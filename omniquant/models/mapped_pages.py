"""Keep a load's memory at the size of the model: drop safetensors pages it no longer needs.

Why this exists: transformers 5.x (pinned 5.23) reads safetensors through ``mmap``. A tensor
whose dtype already matches stays a view of the mapped file; a fused-experts conversion
(``MergeModulelist``) stacks the per-expert tensors into new memory. The pages it read to do
so stay resident in the process (they count in its RSS, ``VmHWM``) until the load ends,
although no tensor uses them any more: loading the real-width slice (7.31 GB of BF16)
peaked at 1.40x those bytes while the loaded model held 1.05x. Neither transformers nor
accelerate offers a load that gives those pages back, and transformers' ``disable_mmap``
reads every shard whole into memory (worse), so this does it around the loader:

- every ``every_bytes`` of parameters set by the loader (a 16th of the shards' bytes, at
  least 256 MiB; transformers'
  ``core_model_loading.set_param_for_module``, called once per loaded tensor), and once at
  the end, ``madvise(MADV_DONTNEED)`` over the process's private mappings of the shard files.
- A private file mapping whose pages were never written loses nothing: a later access
  faults the page back in from the page cache (or the file) with the same bytes, so a
  parameter that is still a view of the file reads exactly as before (tested). A page
  that was written (copy-on-write: an algorithm that changed a weight in place) would be
  reverted to the file's bytes, so only pages ``/proc/self/pagemap`` shows as not
  present or still file-backed are dropped; written pages stay.
- The export (``omniquant.quantize.export``, ``release``) drops them again as it frees
  the exported layers: a freed tensor's pages stay mapped while any tensor of its shard
  lives.
- Pages of still-mapped parameters come back as soon as a forward pass touches them; the
  pages of the per-expert sources never do.

On a platform without ``/proc/self/maps`` and ``madvise`` (not Linux), or a transformers
without ``set_param_for_module``, the load runs as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

_MADV_DONTNEED = 4
#: Parameter bytes set between two drops, at least; and at least this share of the shards'
#: bytes (a drop reads 8 bytes of ``/proc/self/pagemap`` per mapped page: 128 MiB for the
#: released model's 61.5 GiB, so a drop every 256 MiB would read 30 GiB of it per load).
DROP_EVERY_BYTES = 256 << 20
DROPS_PER_PASS = 16


def drop_interval(files: Iterable[Path]) -> int:
    """Bytes between two drops over ``files``: ``DROP_EVERY_BYTES`` or a
    ``DROPS_PER_PASS``-th of their size, whichever is larger."""
    total = sum(Path(f).stat().st_size for f in files if Path(f).is_file())
    return max(DROP_EVERY_BYTES, total // DROPS_PER_PASS)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def private_mappings(files: Iterable[Path]) -> list[tuple[int, int]]:
    """``(start, end)`` of this process's private mappings of ``files`` (from /proc/self/maps)."""
    wanted = {os.path.realpath(f) for f in files}
    spans = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[1][3] == "p" and parts[5] in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.append((start, end))
    return spans


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PRESENT, _FILE_OR_SHARED = 1 << 63, 1 << 61


def _unwritten_runs(start: int, end: int) -> list[tuple[int, int]]:
    """``(start, end)`` runs of pages in ``[start, end)`` that were never written (not
    present, or present as a file page); empty if ``/proc/self/pagemap`` cannot be read."""
    import numpy as np

    first, count = start // _PAGE, (end - start) // _PAGE
    try:
        with open("/proc/self/pagemap", "rb") as fh:
            fh.seek(first * 8)
            entries = np.frombuffer(fh.read(count * 8), dtype=np.uint64)
    except OSError:
        return []
    if entries.size != count:
        return []
    written = ((entries & np.uint64(_PRESENT)) != 0) & ((entries & np.uint64(_FILE_OR_SHARED)) == 0)
    clean = np.concatenate(([False], ~written, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(clean))
    return [
        (start + int(a) * _PAGE, start + int(b) * _PAGE)
        for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]


def drop_mapped_pages(files: Iterable[Path]) -> int:
    """Drop this process's resident, never-written pages of its private mappings of
    ``files``; returns the bytes advised (0 where unsupported). See the module for why it
    loses nothing."""
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for start, end in private_mappings(files):
        for a, b in _unwritten_runs(start, end):
            if libc.madvise(a, b - a, _MADV_DONTNEED) == 0:
                advised += b - a
    return advised


@contextlib.contextmanager
def released_while_loading(files: Iterable[Path], every_bytes: int | None = None) -> Iterator[None]:
    """Around a ``from_pretrained`` of ``files``: drop their mapped pages as loading goes
    (every ``every_bytes`` of parameters set, ``drop_interval`` by default) and when it
    ends."""
    files = [Path(f) for f in files]
    every_bytes = every_bytes or drop_interval(files)
    try:
        import transformers.core_model_loading as cml
    except ImportError:
        cml = None
    original = getattr(cml, "set_param_for_module", None)
    if _libc() is None or original is None:
        yield
        return
    pending = [0]

    def set_param_for_module(model, target_name, param_value, *args, **kwargs):
        original(model, target_name, param_value, *args, **kwargs)
        if hasattr(param_value, "element_size"):
            pending[0] += param_value.numel() * param_value.element_size()
        if pending[0] >= every_bytes:
            pending[0] = 0
            drop_mapped_pages(files)

    cml.set_param_for_module = set_param_for_module
    try:
        yield
    finally:
        cml.set_param_for_module = original
        drop_mapped_pages(files)

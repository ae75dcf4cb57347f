"""glibc's heap during the export: freed tensor memory is reused, big blocks go back.

Policy: inside ``lean_heap()`` (around modelopt's exporter) glibc's mmap threshold is
fixed at 32 MiB through ``mallopt`` (which also turns its dynamic adjustment off): a
tensor under 32 MiB comes from the heap, and the memory of one freed (a weight's
temporaries, a written shard's tensors) is reused by the next, with no fresh pages; a
tensor of 32 MiB or more is its own mapping and goes back to the OS when freed. On
leaving, the trim threshold is set to 64 MiB (what the dynamic mode keeps at that mmap
threshold) and ``malloc_trim(0)`` returns what the export left free. On other C
libraries (musl, macOS) this does nothing; an explicit ``MALLOC_MMAP_THRESHOLD_`` in the
environment is respected and left alone.

Why 32 MiB, measured (2 cores, this sandbox, where a fresh page costs about 2.4 us):
the threshold used to be 128 KiB, so that modelopt's per-weight transient tensors (fp32
upcasts, codes, packing halves) went back to the OS instead of piling up in the heap
(fp8_omni quantize + export on the ~340M bench model: 1.81x the BF16 bytes at peak with
glibc's default, 0.99x at 128 KiB). The export's packing (``omniquant/quantize/packing.py``)
no longer makes those temporaries: it works in buffers kept across weights. What 128 KiB
still did was make every output tensor a fresh mapping, zero-filled page by page (FP8 on
the real-width slice: 0.7 M page faults per export). At 32 MiB: bench model peak RSS
1.194x / 1.197x the BF16 bytes (fp8_omni / nvfp4_omni) against 1.195x / 1.202x at
128 KiB; slice peak 1.03-1.11x (FP8) and 1.02x (NVFP4), as before; slice FP8 export
faults 0.70 M -> 0.51 M, NVFP4 1.0 M -> 0.28 M; omniquant's FP8 slice run 18.5-18.7 s
(three runs) against 20.1-23.2 s (six runs) at 128 KiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
#: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where its dynamic threshold tops out:
#: fixed during the export, and left in force after it.
MMAP_THRESHOLD = 32 * 1024 * 1024


def _libc():
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def lean_heap() -> Iterator[bool]:
    """Inside: tensors under 32 MiB reuse freed heap memory, larger ones go back to the OS
    when freed (see the module).

    Yields:
        Whether the setting is in force (False without glibc, or when the environment
        sets ``MALLOC_MMAP_THRESHOLD_``, whose value then stays in charge).
    """
    libc = _libc()
    active = libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    try:
        yield active
    finally:
        if active:
            # The mmap threshold stays fixed (glibc cannot go back to dynamic mode). The
            # dynamic mode also keeps the trim threshold at twice the mmap threshold;
            # without it every free at the heap top would shrink the heap again.
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
            libc.malloc_trim(0)

"""Keep freed tensor memory from piling up in glibc's heap during export.

Policy: omniquant's memory goal (peak at most 1.5x the checkpoint's BF16 bytes) is
about live data, but glibc's allocator can hold on to freed memory. Its mmap threshold
(128 KiB) is dynamic: every time a large mmap'ed block is freed, the threshold rises to
that block's size (up to 32 MiB on 64-bit), so later tensors of that size come from the
heap, and a freed heap block is not returned to the OS. modelopt's export allocates and
frees a transient tensor per weight (fp32 upcasts, packed codes, scales); with the
dynamic threshold the process kept 0.77x the BF16 bytes of such freed memory, and
fp8_omni's quantize + export peaked at 1.81x instead of 0.99x
(``benchmarks/bench_quantize.py``; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment
gives the same 0.99x).

``lean_heap()`` is a context around modelopt's exporter: inside it the threshold is
fixed at 128 KiB through ``mallopt`` (which also turns the dynamic adjustment off), so
every tensor of 128 KiB or more is its own mapping and goes back to the OS when freed.
On leaving, glibc cannot be put back into dynamic mode, so the thresholds are set to
the dynamic mode's ceiling (mmap 32 MiB, trim 64 MiB: later work reuses heap memory as
it would after a few large frees) and ``malloc_trim(0)`` returns what the export left
free. Fresh mappings cost page faults: measured on the same model (2 cores) fp8_omni's
quantize + export took the same time either way (8-9 s), nvfp4_omni's about 3 s longer
(12-13 s -> 14-16 s, runs vary by +-2 s). Keeping 128 KiB (and glibc's 128 KiB trim
threshold) for the rest of the process slowed the NVFP4 evaluation in ``omniquant
cliff`` (11.5-11.7 vs 15.6 samples/s in single runs), hence the scope. On other C
libraries (musl, macOS) this does nothing; an explicit ``MALLOC_MMAP_THRESHOLD_`` in the
environment is respected and left alone.
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
LEAN_THRESHOLD = 128 * 1024
#: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the dynamic threshold tops out.
RELAXED_THRESHOLD = 32 * 1024 * 1024


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
    """Inside: tensors of 128 KiB or more go back to the OS when freed (see the module).

    Yields:
        Whether the setting is in force (False without glibc, or when the environment
        sets ``MALLOC_MMAP_THRESHOLD_``, whose value then stays in charge).
    """
    libc = _libc()
    active = libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, LEAN_THRESHOLD) == 1
    try:
        yield active
    finally:
        if active:
            libc.mallopt(_M_MMAP_THRESHOLD, RELAXED_THRESHOLD)
            # The dynamic mode also keeps the trim threshold at twice the mmap threshold;
            # without it every free at the heap top would shrink the heap again.
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * RELAXED_THRESHOLD)
            libc.malloc_trim(0)

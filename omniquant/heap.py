"""Keep freed tensor memory from piling up in glibc's heap during quantize and export.

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

``keep_heap_lean`` fixes the threshold at glibc's default 128 KiB through ``mallopt``,
which also turns its dynamic adjustment off: every tensor of 128 KiB or more is its own
mapping and goes back to the OS when freed. The export calls it just before modelopt's
exporter runs, not earlier: fresh mappings cost page faults, and calibration gains
nothing from it. Measured on the same model (2 cores): fp8_omni quantize + export
took the same time either way (8-9 s); nvfp4_omni's export, which allocates more
temporaries, took about 3 s longer (12-13 s -> 14-16 s, runs vary by +-2 s) for no
memory change (its peak was 1.01x and is 0.98x). A fixed 1 MiB threshold costs the
same; 4 MiB brings fp8_omni's 1.8x back. The setting is process-wide and stays in
force once made. On other C libraries (musl, macOS) this does nothing; an explicit
``MALLOC_MMAP_THRESHOLD_`` in the environment is respected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_THRESHOLD = 128 * 1024
_done = False


def keep_heap_lean() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (once per process).

    Returns:
        True when the setting is in force (set now or before, by this function or by
        ``MALLOC_MMAP_THRESHOLD_``); False where the C library is not glibc.
    """
    global _done
    if _done:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        _done = True
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1
    return _done

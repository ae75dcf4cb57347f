"""glibc keeps freed tensor memory unless its mmap threshold is fixed (omniquant/quantize/heap.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import contextlib, json, re, sys
import torch
from omniquant.quantize.heap import lean_heap

def anon_mib():
    text = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\\s+(\\d+)", text).group(1)) / 1024

def churn():
    # One freed 4 MiB block raises glibc's dynamic threshold to 4 MiB, so these 64 x 4 MiB
    # tensors come from the heap; one more stays alive above them (as the next weight does
    # during export), so freeing them cannot shrink the heap.
    torch.ones(1 << 20).sum()
    base = anon_mib()
    blocks = [torch.ones(1 << 20) for _ in range(64)]
    pin = torch.ones(1 << 20)
    held = anon_mib() - base
    del blocks
    return held, anon_mib() - base, pin

scope = lean_heap() if sys.argv[1] == "lean" else contextlib.nullcontext(None)
with scope as lean:
    held, kept, pin = churn()
del pin
_, after_kept, _ = churn()  # outside the scope: heap reuse again (no fresh page faults)
print(json.dumps({"lean": lean, "held": held, "kept": kept, "after_kept": after_kept}))
"""


def _run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's allocator only",
)
def test_fixed_threshold_returns_freed_tensors_to_the_os():
    default, lean = _run("default"), _run("lean")
    assert lean["lean"] is True
    assert default["held"] > 200 and lean["held"] > 200  # 256 MiB were really allocated
    assert default["kept"] > 200  # glibc's default: the freed blocks stay in the process
    assert lean["kept"] < 32  # fixed threshold: each block was unmapped when freed
    # After the scope, 4 MiB tensors come from the heap again (threshold relaxed to 32 MiB).
    assert lean["after_kept"] > 200

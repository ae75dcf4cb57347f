"""glibc keeps freed tensor memory unless its mmap threshold is fixed (omniquant/heap.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, re, sys
import torch
from omniquant.heap import keep_heap_lean

def anon_mib():
    text = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\\s+(\\d+)", text).group(1)) / 1024

lean = keep_heap_lean() if sys.argv[1] == "lean" else None
# One freed 4 MiB block raises glibc's dynamic threshold to 4 MiB ...
torch.ones(1 << 20).sum()
# ... so these 64 x 4 MiB tensors come from the heap; one more stays alive above them
# (as the next weight does during export), so freeing them cannot shrink the heap.
base = anon_mib()
blocks = [torch.ones(1 << 20) for _ in range(64)]
pin = torch.ones(1 << 20)
held = anon_mib() - base
del blocks
kept = anon_mib() - base
print(json.dumps({"lean": lean, "held": held, "kept": kept}))
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

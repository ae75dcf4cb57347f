"""During the export glibc reuses freed tensor memory under 32 MiB and returns larger
blocks to the OS (omniquant/quantize/heap.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import contextlib, json, re, resource, sys
import torch
from omniquant.quantize.heap import lean_heap

def anon_mib():
    text = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\\s+(\\d+)", text).group(1)) / 1024

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def churn(numel, count):
    # count tensors alive at once, then freed, with one more kept alive above them (as the
    # next weight is during export): the memory they leave (beyond that one), and the
    # pages faulted in.
    base, f0 = anon_mib(), faults()
    blocks = [torch.ones(numel) for _ in range(count)]
    pin = torch.ones(numel)
    del blocks
    return {"kept": anon_mib() - base - numel * 4 / 2**20, "faults": faults() - f0, "pin": pin}

scope = lean_heap() if sys.argv[1] == "lean" else contextlib.nullcontext(None)
with scope as lean:
    torch.ones(1 << 20).sum()
    small = [churn(1 << 20, 64) for _ in range(2)]  # 64 x 4 MiB, twice
    big = churn(12 << 20, 6)  # 6 x 48 MiB
print(json.dumps({"lean": lean, "small_faults": [c["faults"] for c in small],
                  "big_kept": big["kept"]}))
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
def test_export_heap_reuses_small_blocks_and_returns_big_ones():
    lean = _run("lean")
    assert lean["lean"] is True
    first, second = lean["small_faults"]
    assert first > 40_000  # 256 MiB of 4 MiB tensors were really faulted in, once
    assert second < first / 4  # the second round reused the freed heap: few fresh pages
    assert lean["big_kept"] < 32  # the 48 MiB blocks were unmapped when freed (288 MiB)

"""Throughput of endpoint evaluation against ``omniquant serve``: concurrency 1 vs 4.

Run: ``pytest benchmarks/bench_endpoint.py --benchmark-enable -s`` (not part of the
default test command; one run of each setting, reported as a ratio measured in that
run, never asserted).

Setup: the bundled demo model's FP8 export served by ``omniquant serve`` in a separate
process (one torch thread, the CPU emulation), and the report's endpoint backend
(``omniquant.endpoint.evaluate``) asking it, with no cache, everything the report asks:
the greedy prompt request, the fidelity request (top-20 ``prompt_logprobs``) and one
likelihood request per choice, for 3 samples of every ``omni-demo`` task (27 samples,
all four modalities). The server runs model calls one at a time (one model, one lock),
so concurrency can only overlap what is outside that lock: media encoding and JSON on
the client, HTTP, media decoding and processing on the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PER_TASK = 3


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    import torch

    from omniquant.demo import DEMO_CALIB, demo_model_dir
    from omniquant.quantize.pipeline import quantize

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench_endpoint") / "fp8"
    return quantize(demo_model_dir(), "fp8_omni", out, calib=DEMO_CALIB, quiet=True).out


def _serve(path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "omniquant.cli", "serve", str(path), "--port", "0",
           "--served-model-name", "fp8"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    for line in proc.stdout:  # ends with the process
        if line.startswith("listening on "):
            return proc, line.split()[-1]
    proc.kill()
    raise RuntimeError("omniquant serve did not start")


def test_bench_endpoint_concurrency(benchmark, fp8_export):
    from omniquant.demo import DEMO_TASKS
    from omniquant.endpoint.client import EndpointClient
    from omniquant.endpoint.evaluate import evaluate_endpoint
    from omniquant.endpoint.protocol import parse_model_source
    from omniquant.evaluate import validate_task_set

    taken: dict[str, int] = defaultdict(int)
    entries = []
    for entry in validate_task_set(DEMO_TASKS):
        if taken[entry.task] < PER_TASK:
            taken[entry.task] += 1
            entries.append(entry)
    proc, url = _serve(fp8_export)
    try:

        def run():
            out = {}
            for concurrency in (1, 4):
                client = EndpointClient(parse_model_source(url), concurrency=concurrency)
                client.resolve_model()
                start = time.perf_counter()
                ev, missing = evaluate_endpoint(
                    client, entries, keep_spans=True, max_new_tokens=4, concurrency=concurrency
                )
                wall = time.perf_counter() - start
                assert not any(missing.values()), missing
                out[concurrency] = {
                    "samples_per_s": len(ev.samples) / wall,
                    "requests": client.requests_sent,
                    "seconds": wall,
                }
                client.close()
            return out

        result = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        proc.kill()
        proc.wait(30)
    ratio = result[4]["samples_per_s"] / result[1]["samples_per_s"]
    benchmark.extra_info.update(
        samples=len(entries), **{f"c{c}_{k}": v for c, r in result.items() for k, v in r.items()},
        ratio_c4_over_c1=ratio,
    )  # fmt: skip
    print(f"\nendpoint evaluation, demo FP8 via omniquant serve, {len(entries)} samples:")
    for c, r in result.items():
        print(f"  concurrency {c}: {r['samples_per_s']:.2f} samples/s "
              f"({r['requests']} requests in {r['seconds']:.1f} s)")  # fmt: skip
    print(f"  ratio concurrency 4 / 1: {ratio:.2f}")

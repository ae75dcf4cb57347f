"""``omniquant serve`` under load: short chats at concurrency 1 / 4 / 16, a soak, chunked prefill.

Run: ``pytest benchmarks/bench_serve.py --benchmark-enable -s`` (not part of the default
test command; numbers are printed and stored in the benchmark's ``extra_info``; the soak's
invariants are asserted, timings never are).

Setup: the bundled demo model's FP8 export served by ``omniquant serve`` in its own
process (one torch thread, CPU emulation); the server's resident memory is sampled from
``/proc/PID/status`` every 10 ms by this process.
- ``test_bench_serve_concurrency``: short chat requests (a demo text prompt, greedy,
  ``max_tokens`` 4) at 1, 4 and 16 concurrent clients: requests/s, p50 / p99 latency,
  the server's peak RSS.
- ``test_bench_serve_soak``: 300 requests from 8 clients, one in five bad (malformed
  JSON, an unknown field, a ~99k-token prompt, bad base64 media, a client that hangs up
  during a long generation); the server must stay up, answer every well-formed request
  with the task's answer, and end within 10 % of the RSS it had after warm-up.
- ``test_bench_serve_chunked_prefill``: what a short request waits behind a 4k-token
  prompt, with prefill chunks of 256 tokens (the default) and with the prompt prefilled
  whole (``--prefill-chunk 4096``), and what chunking costs the long prompt.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    import torch

    from omniquant.demo import DEMO_CALIB, demo_model_dir
    from omniquant.quantize.pipeline import quantize

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench_serve") / "fp8"
    return quantize(demo_model_dir(), "fp8_omni", out, calib=DEMO_CALIB, quiet=True).out


class Server:
    """``omniquant serve`` in a subprocess, its RSS sampled."""

    def __init__(self, path: Path, *flags: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "omniquant.cli", "serve", str(path), "--port", "0",
               "--served-model-name", "fp8", *flags]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)  # fmt: skip
        self.url = None
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("omniquant serve did not start")
        self.peak = 0
        self._stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self):
        while not self._stop and self.proc.poll() is None:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def reset_peak(self):
        self.peak = self.rss()

    def close(self):
        self._stop = True
        self.proc.kill()
        self.proc.wait(30)


def _entries():
    from omniquant.demo import DEMO_TASKS
    from omniquant.evaluate import validate_task_set

    return [e for e in validate_task_set(DEMO_TASKS) if e.modality == "text"]


def _chat(entry, **extra) -> dict:
    return {"messages": [{"role": "user", "content": entry.prompt}], "temperature": 0,
            "max_tokens": 4, **extra}  # fmt: skip


def _post(http: httpx.Client, url: str, body, **kw) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    if isinstance(body, bytes):
        r = http.post(f"{url}/chat/completions", content=body,
                      headers={"content-type": "application/json"}, **kw)  # fmt: skip
    else:
        r = http.post(f"{url}/chat/completions", json=body, **kw)
    return time.perf_counter() - start, r


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_bench_serve_concurrency(benchmark, fp8_export):
    entries = _entries()
    server = Server(fp8_export)
    try:
        with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=32)) as http:
            for e in entries[:4]:  # warm-up
                _post(http, server.url, _chat(e))

            def run():
                out = {}
                for concurrency in (1, 4, 16):
                    n = 48
                    server.reset_peak()
                    start = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        results = list(pool.map(
                            lambda i: _post(http, server.url, _chat(entries[i % len(entries)])),
                            range(n)))  # fmt: skip
                    wall = time.perf_counter() - start
                    assert all(r.status_code == 200 for _, r in results)
                    answers = [r.json()["choices"][0]["message"]["content"] for _, r in results]
                    assert answers == [entries[i % len(entries)].answer for i in range(n)]
                    lat = [t for t, _ in results]
                    out[concurrency] = {"req_per_s": n / wall, "p50_s": statistics.median(lat),
                                        "p99_s": _pct(lat, 0.99), "peak_rss_mb": server.peak / 2**20,
                                        "requests": n}  # fmt: skip
                return out

            result = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        server.close()
    benchmark.extra_info.update({f"c{c}_{k}": v for c, r in result.items() for k, v in r.items()})
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nomniquant serve, demo FP8 export, short chats (max_tokens 4, greedy); "
          f"load average after: {' '.join(load)}")
    for c, r in result.items():
        print(f"  concurrency {c:2d}: {r['req_per_s']:.2f} req/s, p50 {r['p50_s'] * 1000:.0f} ms, "
              f"p99 {r['p99_s'] * 1000:.0f} ms, server peak RSS {r['peak_rss_mb']:.0f} MiB")  # fmt: skip


def _bad(kind: int, entry) -> tuple[object, dict]:
    """A bad request of one of five kinds: (body, httpx kwargs)."""
    if kind == 0:
        return b'{"messages": [', {}
    if kind == 1:
        return _chat(entry, frobnicate=True), {}
    if kind == 2:
        return _chat(entry, messages=[{"role": "user", "content": " 7" * 99_000}]), {}
    if kind == 3:
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
        return _chat(entry, messages=[{"role": "user", "content": [part]}]), {}
    return _chat(entry, max_tokens=2000, ignore_eos=True), {"timeout": 0.5}  # hangs up


def test_bench_serve_soak(benchmark, fp8_export):
    entries = _entries()
    server = Server(fp8_export)
    try:
        with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=16)) as http:
            for e in entries:  # warm-up: every prompt once
                _, r = _post(http, server.url, _chat(e))
                assert r.json()["choices"][0]["message"]["content"] == e.answer
            time.sleep(0.5)
            rss_start = server.rss()

            def one(i: int):
                entry = entries[i % len(entries)]
                if i % 5 == 4:
                    body, kw = _bad((i // 5) % 5, entry)
                    try:
                        _, r = _post(http, server.url, body, **kw)
                        return ("bad", r.status_code, None)
                    except httpx.TimeoutException:
                        return ("bad", "hung up", None)
                _, r = _post(http, server.url, _chat(entry))
                text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                return ("good", r.status_code, text == entry.answer)

            def run():
                start = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    results = list(pool.map(one, range(300)))
                return results, time.perf_counter() - start

            results, wall = benchmark.pedantic(run, rounds=1, iterations=1)
            for _ in range(600):  # cancelled jobs drain
                health = http.get(server.url.removesuffix("/v1") + "/health").json()
                if health["running"] == 0 and health["waiting"] == 0:
                    break
                time.sleep(0.05)
            time.sleep(0.5)
            rss_end = server.rss()
            alive = http.get(f"{server.url}/models").status_code == 200
    finally:
        server.close()
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] == "bad"]
    statuses: dict = {}
    for _, status, _ in bad:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    growth = rss_end / rss_start - 1
    benchmark.extra_info.update(good=len(good), bad=len(bad), bad_statuses=statuses,
                                seconds=wall, rss_start_mb=rss_start / 2**20,
                                rss_end_mb=rss_end / 2**20, rss_growth=growth)  # fmt: skip
    print(f"\nsoak: 300 requests in {wall:.1f} s, {len(good)} good, {len(bad)} bad {statuses}; "
          f"RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB ({growth:+.1%})")
    assert alive
    assert all(status == 200 and ok for _, status, ok in good), [g for g in good if not g[2]][:5]
    assert statuses.get("200", 0) == 0  # every bad request refused (or hung up)
    assert abs(growth) <= 0.10, growth


def test_bench_serve_chunked_prefill(benchmark, fp8_export):
    entries = _entries()
    long_prompt = " ".join(str(7 + i % 20) for i in range(4000))
    out = {}

    def measure(chunk: int) -> dict:
        server = Server(fp8_export, "--prefill-chunk", str(chunk))
        try:
            with httpx.Client(timeout=600) as http:
                _post(http, server.url, _chat(entries[0]))  # warm-up
                alone, _ = _post(http, server.url, _chat(entries[1]))
                t0 = time.perf_counter()
                done = {}

                def long():
                    r = http.post(f"{server.url}/completions", json={
                        "prompt": long_prompt, "max_tokens": 1, "temperature": 0})  # fmt: skip
                    assert r.status_code == 200, r.text
                    done["long"] = time.perf_counter() - t0

                thread = threading.Thread(target=long)
                thread.start()
                time.sleep(0.3)  # the long prompt is being prefilled
                behind, r = _post(http, server.url, _chat(entries[1]))
                assert r.status_code == 200
                thread.join()
        finally:
            server.close()
        return {"short_alone_s": alone, "short_behind_long_s": behind, "long_s": done["long"]}

    def run():
        for chunk in (256, 4096):
            out[chunk] = measure(chunk)
        return out

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({f"chunk{c}_{k}": v for c, r in out.items() for k, v in r.items()})
    print("\nshort chat sent 0.3 s after a 4000-token prompt (demo FP8):")
    for c, r in out.items():
        print(f"  prefill chunk {c}: short request {r['short_behind_long_s']:.2f} s "
              f"(alone {r['short_alone_s']:.2f} s), long prompt {r['long_s']:.2f} s")
    print(json.dumps(out))

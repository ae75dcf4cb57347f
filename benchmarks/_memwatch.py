"""Run a Python snippet in a fresh process and report its wall time and peak memory.

Peak memory is sampled every 5 ms from /proc/self/status: ``VmRSS`` (everything
resident, including clean safetensors pages mapped by the loader, which the kernel
can drop under pressure) and ``RssAnon`` (anonymous memory only: what cannot be
reclaimed). Both are reported relative to the process's memory just before the
measured code runs (after imports).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_PRELUDE = """
import json, threading, time
def _read():
    vals = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmRSS', 'RssAnon'):
            vals[k] = int(v.split()[0]) * 1024
    return vals
_peak = {'VmRSS': 0, 'RssAnon': 0}
def _sample():
    while True:
        cur = _read()
        for k in _peak:
            _peak[k] = max(_peak[k], cur[k])
        time.sleep(0.005)
"""


def measure(setup: str, body: str) -> dict:
    """Run ``setup`` (imports, not measured) then ``body`` (measured) in a subprocess.

    Returns:
        ``{"seconds", "rss_peak_delta", "anon_peak_delta", "rss_base", "anon_base"}`` (bytes).
    """
    code = (
        _PRELUDE
        + textwrap.dedent(setup)
        + "\n_base = _read()\nthreading.Thread(target=_sample, daemon=True).start()\n_t0 = time.perf_counter()\n"
        + textwrap.dedent(body)
        + "\n_dt = time.perf_counter() - _t0\ntime.sleep(0.02)\n"
        + "print('MEASURE ' + json.dumps({'seconds': _dt, 'rss_peak_delta': _peak['VmRSS'] - _base['VmRSS'],"
        + " 'anon_peak_delta': _peak['RssAnon'] - _base['RssAnon'], 'rss_base': _base['VmRSS'], 'anon_base': _base['RssAnon']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEASURE ")][-1]
    return json.loads(line[len("MEASURE "):])

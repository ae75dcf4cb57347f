"""Progress lines for the long byte-bound phases of a quantize run: export and audit.

Policy: as calibration's progress (``omniquant.quantize.calibrate.iter_progress``), one
line on stderr, redrawn on a terminal at every step (layer, shard, weight) and printed at
each tenth of the bytes otherwise (CI logs stay short), nothing at all with ``quiet``. A line says the phase, where it is
(shard, layer), bytes done of the total, throughput and the time left at that rate.
The stages take a plain ``progress(done_bytes, total_bytes, label)`` callable, so the
library has no terminal code and a caller can route the numbers anywhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

ByteProgress = Callable[[int, int, str], None]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def byte_progress(phase: str, quiet: bool, stream=None) -> ByteProgress | None:
    """A ``progress(done_bytes, total_bytes, label)`` callback for ``phase`` (None if quiet).

    Args:
        phase: What is running (``exporting``, ``auditing``).
        quiet: No output at all.
        stream: Where lines go (default: ``sys.stderr`` at call time).
    """
    if quiet:
        return None
    start = time.perf_counter()
    last_tenth = [-1]

    def cb(done: int, total: int, label: str) -> None:
        out = stream or sys.stderr
        tty = out.isatty() if hasattr(out, "isatty") else False
        finished = total > 0 and done >= total
        tenth = (10 * done) // total if total > 0 else 10
        if not tty and tenth == last_tenth[0]:
            return  # a log gets a line per tenth of the bytes, not per layer
        last_tenth[0] = tenth
        elapsed = max(time.perf_counter() - start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("nan")
        eta_text = "ETA --" if rate <= 0 else f"ETA {eta:.0f} s"
        line = (
            f"{phase} {label}  {_gib(done)}/{_gib(total)}  {rate / 1e6:.0f} MB/s  "
            f"{eta_text if not finished else f'done in {elapsed:.1f} s'}"
        )
        if tty:
            out.write("\r\x1b[2K" + line + ("\n" if finished else ""))
            out.flush()
        else:
            print(line, file=out)

    return cb

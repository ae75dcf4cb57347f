"""Export and audit progress lines (omniquant.quantize.progress): quiet means silent, a log
gets one line per tenth of the bytes with bytes done, throughput and ETA."""

from __future__ import annotations

import io

from omniquant.quantize.progress import byte_progress


def test_quiet_gives_no_callback():
    assert byte_progress("exporting", quiet=True) is None


def test_log_lines_per_tenth_with_bytes_rate_and_eta():
    out = io.StringIO()  # not a terminal
    cb = byte_progress("exporting", quiet=False, stream=out)
    total = 10 * 2**30
    for i in range(1, 101):  # 100 layer steps, 10 tenths
        cb(i * total // 100, total, f"shard 1/1, layer {i}/100")
    cb(total, total, "shard 1/1 written")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # the first step, then one per tenth
    assert lines[0].startswith("exporting shard 1/1, layer 1/100  0.10 GiB/10.00 GiB  ")
    assert lines[1].startswith("exporting shard 1/1, layer 10/100  1.00 GiB/10.00 GiB  ")
    assert "MB/s  ETA " in lines[1]
    assert lines[-1].startswith("exporting shard 1/1, layer 100/100  10.00 GiB/10.00 GiB")
    assert " done in " in lines[-1]

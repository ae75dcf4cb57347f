"""The bad-input corpus: shared inputs and the per-family tally printed after the run.

Every corpus case runs through ``omniquant.cli.main`` in-process and records one row:
its family, whether it ended in a clean error (expected exit code and message), a
traceback, a wrong acceptance (exit 0 for a bad input) or a damaged input (an input
file's bytes changed). ``pytest_terminal_summary`` prints the counts per family.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from corpus_tally import RESULTS


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory):
    """A second tiny model (seed 1): same architecture and tokenizer, other weights."""
    from omniquant.demo.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_seed1") / "model", seed=1)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    by_family: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for family, clean, traceback, accepted, damaged in RESULTS:
        row = by_family[family]
        row[0] += 1
        row[1] += clean
        row[2] += traceback
        row[3] += accepted
        row[4] += damaged
    tr = terminalreporter
    tr.write_sep("-", "bad-input corpus")
    tr.write_line(
        f"{'family':<16}{'cases':>6}{'clean':>7}{'traceback':>10}{'accepted':>9}{'damaged':>8}"
    )
    total = [0, 0, 0, 0, 0]
    for family in sorted(by_family):
        row = by_family[family]
        total = [a + b for a, b in zip(total, row)]
        tr.write_line(f"{family:<16}" + "".join(f"{v:>{w}}" for v, w in zip(row, (6, 7, 10, 9, 8))))
    tr.write_line(f"{'total':<16}" + "".join(f"{v:>{w}}" for v, w in zip(total, (6, 7, 10, 9, 8))))

"""The corpus tally, shared by the corpus tests and their conftest (printed at the end)."""

from __future__ import annotations

#: One row per corpus case: (family, clean error, traceback, wrongly accepted, input damaged).
RESULTS: list[tuple[str, bool, bool, bool, bool]] = []

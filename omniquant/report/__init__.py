"""The quality-cliff report: what each precision cost, on which task and modality.

``build_report`` evaluates a BF16 baseline and quantized candidates from their
exported files (serving numerics, one model in memory at a time) on a task set and
writes ``report.json``, ``report.md`` and a self-contained ``report.html``;
``render`` turns a report dict into Markdown/HTML, ``sensitivity`` ranks module
groups by the KL each adds alone.
"""

from __future__ import annotations

from omniquant.report.build import REPORT_FILES, build_report

__all__ = ["REPORT_FILES", "build_report"]

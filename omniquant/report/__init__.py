"""The quality-cliff report: what each precision cost, on which task and modality.

The report renders results and never loads a model: ``build`` turns the typed
results of a comparison (``omniquant.evaluate.results.Comparison``, made by
``omniquant.experiments.compare``, which also offers ``build_report``) into the report
dict and writes ``report.json``, ``report.md`` and a self-contained ``report.html``;
``stats`` computes per-task and per-modality numbers, intervals and verdicts;
``render`` turns a report dict into Markdown/HTML; ``table`` into the plain-text
tables the CLI prints.
"""

from __future__ import annotations

from omniquant.report.build import REPORT_FILES

__all__ = ["REPORT_FILES"]

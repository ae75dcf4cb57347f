"""Plain-text tables of a report for the terminal: what ``omniquant report`` and ``omniquant cliff`` print.

Policy: like ``omniquant.report.render``, these read only the report dict (so a
``report.json`` can be printed again without any model), and the CLI prints what they
return without formatting numbers of its own. Fixed-width columns, no colour or markup;
a value a served model could not provide is ``n/a`` (or ``-`` for a recovery in the
cliff table), never a number.
"""

from __future__ import annotations


def _cell(value, spec: str, width: int, scale: float = 1.0, suffix: str = "") -> str:
    # Served models may not report size or provide every metric: "n/a", never a number.
    if value is None:
        return f"{'n/a':>{width + len(suffix)}}"
    return f"{format(value * scale, spec):>{width}}{suffix}"


def render_summary_table(report: dict) -> str:
    """One row per model: precision, bits per weight, size, accuracy, worst task
    recovery, mean KL and top-1 agreement (what ``omniquant report`` prints)."""
    header = (
        f"{'model':<22}{'precision':<18}{'bits/w':>8}{'size MB':>10}{'accuracy':>10}"
        f"{'min recov':>10}{'KL mean':>11}{'top-1':>8}"
    )
    lines = [header]
    for m in [report["baseline"], *report["candidates"]]:
        overall = m["overall"]
        recovs = [t["recovery"] for t in m["tasks"].values() if t["recovery"] is not None]
        recov = min(recovs, default=1.0 if not m["tasks"] else None)
        size = None if m["size_bytes"] is None else m["size_bytes"] / 1e6
        lines.append(
            f"{m['name'][:21]:<22}{m['precision'][:17]:<18}{_cell(m['bits_per_weight'], '.3f', 8)}"
            f"{_cell(size, '.3f', 10)}{_cell(overall['accuracy'], '.3f', 10)}"
            f"{_cell(recov, '.1f', 9, 100, '%')}"
            f"{_cell(overall['kl_mean'], '.3g', 11)}{_cell(overall['top1_agreement'], '.1f', 7, 100, '%')}"
        )
    return "\n".join(lines)


def render_cliff_table(report: dict) -> str:
    """Accuracy per task for BF16 and each candidate, with recovery in parentheses."""
    base = report["baseline"]
    cands = report["candidates"]
    names = [base["name"]] + [c["name"] for c in cands]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'task':<22}" + "".join(f"{n:>{width}}" for n in names)]
    for task, b in base["tasks"].items():
        row = f"{task:<22}" + f"{b['accuracy']:>{width}.2f}"
        for c in cands:
            t = c["tasks"][task]
            rec = "-" if t["recovery"] is None else f"{t['recovery']:.2f}"
            row += f"{t['accuracy']:.2f} ({rec})".rjust(width)
        lines.append(row)
    lines.append(
        f"{'bits/weight':<22}"
        + f"{base['bits_per_weight']:>{width}.2f}"
        + "".join(f"{c['bits_per_weight']:>{width}.2f}" for c in cands)
    )
    return "\n".join(lines)

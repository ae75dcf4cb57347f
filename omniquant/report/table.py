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


def _cost_header(report: dict) -> str:
    if "throughput" not in report:
        return ""
    price = report["throughput"].get("gpu_hour_price") is not None
    return f"{'req/s':>9}{'video h/h':>11}{'audio h/h':>11}" + (
        f"{'$/video h':>11}{'$/audio h':>11}" if price else ""
    )


def _cost_cells(report: dict, model: dict) -> str:
    """Throughput and cost at the chart's concurrency (``omniquant.report.cost``)."""
    if "throughput" not in report:
        return ""
    from omniquant.report.cost import headline

    head = headline(report, model)
    hours, cost = head["hours_per_hour"], head["cost"]
    cells = (
        f"{_cell(head['requests_per_s'], '.3f', 9)}{_cell(hours['video'], '.3f', 11)}"
        f"{_cell(hours['audio'], '.3f', 11)}"
    )
    if report["throughput"].get("gpu_hour_price") is not None:
        cells += f"{_cell(cost['video'], '.2f', 11)}{_cell(cost['audio'], '.2f', 11)}"
    return cells


def render_summary_table(report: dict) -> str:
    """One row per model: precision, bits per weight, size, accuracy, worst task
    recovery, mean KL and top-1 agreement (what ``omniquant report`` prints); with a
    load phase, also requests/s, hours of video and audio per hour and (with a price)
    cost per hour of media, at the highest concurrency level. With two or more models
    that have both a size and a KL, a last column marks the Pareto front (less KL, fewer
    bytes) and a legend line follows."""
    from omniquant.report.pareto import pareto_front

    models = [report["baseline"], *report["candidates"]]
    points = [(m["name"], m["size_bytes"], m["overall"]["kl_mean"]) for m in models]
    # A front of one point says nothing: the column shows when two models can be compared.
    front = pareto_front(points) if sum(None not in p for p in points) > 1 else None
    header = (
        (
            f"{'model':<22}{'precision':<18}{'bits/w':>8}{'size MB':>10}{'accuracy':>10}"
            f"{'min recov':>10}{'KL mean':>11}{'top-1':>8}"
        )
        + _cost_header(report)
        + ("  front" if front is not None else "")
    )
    lines = [header]
    for m in models:
        overall = m["overall"]
        recovs = [t["recovery"] for t in m["tasks"].values() if t["recovery"] is not None]
        recov = min(recovs, default=1.0 if not m["tasks"] else None)
        size = None if m["size_bytes"] is None else m["size_bytes"] / 1e6
        lines.append(
            f"{m['name'][:21]:<22}{m['precision'][:17]:<18}{_cell(m['bits_per_weight'], '.3f', 8)}"
            f"{_cell(size, '.3f', 10)}{_cell(overall['accuracy'], '.3f', 10)}"
            f"{_cell(recov, '.1f', 9, 100, '%')}"
            f"{_cell(overall['kl_mean'], '.3g', 11)}{_cell(overall['top1_agreement'], '.1f', 7, 100, '%')}"
            + _cost_cells(report, m)
            + (f"  {'*' if m['name'] in front else '':>5}" if front is not None else "")
        )
    if front is not None:
        lines.append(
            "front: * = on the Pareto front of KL mean vs size (no other model has both less "
            "KL and fewer bytes); report.html plots it"
        )
    return "\n".join(lines)


def render_throughput_lines(report: dict) -> list[str]:
    """The load phase for the terminal: where the figures came from, the workload, the
    concurrency of the summary's columns, and every n/a with its reason."""
    if "throughput" not in report:
        return []
    from omniquant.report.cost import not_available_notes, provenance

    models = [report["baseline"], *report["candidates"]]
    t = report["throughput"]
    wl = t["workload"]
    lines = [
        (
            f"throughput at concurrency {t['chart_concurrency']} (levels {wl['concurrency']}); "
            f"workload: {wl['source']}, max_tokens {wl['max_tokens']}; details in report.html"
        ),
        *provenance(report, models),
        *(f"n/a: {note}" for note in not_available_notes(report, models)),
    ]
    for m in models:
        cap = (m.get("throughput") or {}).get("capacity") or {}
        if cap.get("sequences") is not None:
            lines.append(
                f"{m['name']}: {cap['sequences']:,} concurrent sequences of {cap['tokens']} tokens "
                f"fit in {cap['gpu_bytes'] / 2**30:g} GiB (arithmetic, not measured)"
            )
    return lines


def render_front_line(report: dict) -> str:
    """One line naming the models on the Pareto front of KL mean vs exported size (what
    ``omniquant cliff`` prints under its table; ``report.html`` plots it)."""
    from omniquant.report.pareto import pareto_front

    models = [report["baseline"], *report["candidates"]]
    front = pareto_front([(m["name"], m["size_bytes"], m["overall"]["kl_mean"]) for m in models])
    return (
        "Pareto front, KL mean vs size (no other model has both less KL and fewer bytes): "
        + (", ".join(front) or "none (no model has both a size and a KL)")
    )


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

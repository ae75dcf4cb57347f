"""Render a report dict (``report.json``) as Markdown and as one self-contained HTML page.

Policy: rendering reads only the report dict, so a ``report.json`` can be re-rendered
without any model. The HTML page has inline CSS and inline SVG plots
(``omniquant.report.svg``), no scripts and no external URL: it opens offline.
Markdown carries the same numbers as tables (plots need the HTML). Models appear in
cliff order: the baseline, then candidates by decreasing bits per weight.
"""

from __future__ import annotations

from omniquant.report import svg

MODALITY_ORDER = ("text", "image", "video", "audio")


def _layer_label(module: str) -> str:
    """A short chart label for a module name: its numbered block (``layers.12`` for
    ``...layers.12.mixer``), or the name itself when no component is a number. The
    report knows module names only as text, not the model they come from."""
    parts = module.split(".")
    i = next((k for k, part in enumerate(parts) if part.isdigit()), None)
    return module if i is None else ".".join(parts[max(i - 1, 0) : i + 1])


def cliff_order(report: dict) -> list[dict]:
    """Baseline first, then candidates by decreasing bits per weight (stable)."""
    cands = sorted(report["candidates"], key=_bits_key)
    return [report["baseline"], *cands]


def _bits_key(model: dict) -> tuple[bool, float]:
    """Decreasing bits per weight; served models that do not report it go last."""
    bits = model["bits_per_weight"]
    return bits is None, -(bits or 0.0)


def _fix(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or ``n/a`` for a value a served model could not provide."""
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _mb(nbytes: int | None) -> str:
    if nbytes is None:  # a served model that does not report its size
        return "n/a"
    return f"{nbytes / 1e6:.3f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:.2f} GB"


def _task_rows(report: dict) -> list[tuple[str, str, str]]:
    return [
        (task, meta["metric"], "+".join(meta["modalities"]))
        for task, meta in report["task_set"]["tasks"].items()
    ]


# ------------------------------------------------------------------------ markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# Tables shared by the Markdown and HTML renderers: (header, rows) builders, so the
# two documents always show the same numbers.
def _candidate_table(cand: dict) -> tuple[list[str], list[list[str]]]:
    header = [
        "task",
        "n",
        "accuracy",
        "recovery",
        "delta",
        "delta 95% CI",
        "KL mean",
        "top-1 agree",
    ]
    rows = [
        [
            task,
            str(t["n"]),
            _fix(t["accuracy"], ".3f"),
            _pct(t["recovery"]) + ("" if t.get("recovery_defined", True) or t["recovery"] is None else " (base 0)"),
            _fix(t["accuracy_delta"], "+.3f"),
            _ci(t["accuracy_delta_ci95"]),
            _num(t["kl_mean"]),
            _pct(t["top1_agreement"]),
        ]
        for task, t in cand["tasks"].items()
    ]
    return header, rows


def _evs_table(models: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "rate", "video tokens", "kept", "accuracy", "KL", "top-1"]
    rows = [
        [
            m["name"],
            f"{row['rate']:.2f}",
            str(row["video_tokens"]),
            _pct(row["kept_fraction"]),
            _num(row["accuracy"], 3),
            _num(row["kl_mean"]),
            _pct(row["top1_agreement"]),
        ]
        for m in models
        for row in m.get("evs") or []
    ]
    return header, rows


def _sensitivity_table(sens: dict) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "group", "KL mean", "top-1 agree", "bits/weight"]
    rows = [
        [
            str(g["rank"]),
            g["group"],
            _num(g["kl_mean"]),
            _pct(g["top1_agreement"]),
            f"{g['bits_per_weight']:.3f}",
        ]
        for g in sens["groups"]
    ]
    return header, rows


def write_markdown(report: dict) -> str:
    """The report as Markdown (tables; the plots are in ``report.html``)."""
    models = cliff_order(report)
    ts = report["task_set"]
    out = [
        "# Quality-cliff report",
        "",
        f"Task set `{ts['name']}` ({ts['samples']} samples; "
        + ", ".join(f"{m} {n}" for m, n in ts["modalities"].items())
        + f"). Baseline `{report['baseline']['name']}`. Plots: `report.html`.",
        "",
        "## Verdicts",
        "",
    ]
    out += [f"- {v}" for v in report["verdicts"]] + [""]
    out += ["## Size", ""]
    out.append(
        _md_table(
            ["model", "precision", "bits/weight", "size", "KV cache", "samples/s"],
            [
                [
                    m["name"],
                    m["precision"],
                    _fix(m["bits_per_weight"], ".3f"),
                    _mb(m["size_bytes"]),
                    m.get("kv_cache") or "-",
                    f"{m['evaluation']['samples_per_s']:.2f}",
                ]
                for m in models
            ],
        )
    )
    out += _md_cost(report, models)
    out += ["", "## The cliff: accuracy per task", ""]
    header = ["task", "metric", "modality", *[m["name"] for m in models]]
    rows = []
    for task, metric, modality in _task_rows(report):
        rows.append(
            [task, metric, modality, *[_fix(m["tasks"][task]["accuracy"], ".3f") for m in models]]
        )
    out.append(_md_table(header, rows))
    out += ["", "## Accuracy per modality", ""]
    mods = [m for m in MODALITY_ORDER if m in report["baseline"]["modalities"]]
    out.append(
        _md_table(
            ["modality", *[m["name"] for m in models]],
            [[mod, *[_fix(m["modalities"][mod]["accuracy"], ".3f") for m in models]] for mod in mods],
        )
    )
    for cand in report["candidates"]:
        out += ["", f"## {cand['name']} vs baseline", ""]
        out.append(_md_table(*_candidate_table(cand)))
        out += [
            "",
            "KL by modality: "
            + ", ".join(f"{k} {_num(v)}" for k, v in cand["kl_by_modality"].items()),
        ]
    if "harness" in report:
        from omniquant.report.harness import markdown_lines

        out += markdown_lines(report["harness"])
    out += ["", "## EVS: video tokens vs quality", ""]
    if report["evs"]["video_samples"] and report["evs"]["rates"]:
        out.append(_md_table(*_evs_table(models)))
        out += ["", f"KL reference: {report['evs']['reference']}."]
    else:
        out.append("No video samples in the task set (or no rates): no sweep.")
    out += ["", "## Calibration coverage", ""]
    for cand in report["candidates"]:
        cal = cand.get("calibration")
        if not cal:
            out.append(f"- {cand['name']}: no `omniquant.json` calibration block.")
            continue
        toks = ", ".join(f"{k} {v}" for k, v in (cal.get("tokens_by_modality") or {}).items())
        out.append(
            f"- {cand['name']}: {cal.get('samples')} samples from `{cal.get('set')}` ({toks} tokens); "
            f"{_coverage_text(cal)}."
        )
    sens = report.get("sensitivity")
    if sens:
        out += ["", f"## Sensitivity ({sens['format']}, one group at a time)", ""]
        out.append(_md_table(*_sensitivity_table(sens)))
        for skip in sens["skipped"]:
            out.append(f"\nSkipped {skip['group']}: {skip['reason']}")
        out += ["", sens["suggestion"]["text"], ""]
        if sens["suggestion"]["recipe_yaml"]:
            out += ["```yaml", sens["suggestion"]["recipe_yaml"].rstrip(), "```"]
    return "\n".join(out) + "\n"


def _md_cost(report: dict, models: list[dict]) -> list[str]:
    """The load phase as Markdown: measured figures, then the capacity arithmetic."""
    if "throughput" not in report:
        return []
    from omniquant.report import cost

    conc = report["throughput"]["chart_concurrency"]
    out = ["", "## Throughput and cost (measured)", ""]
    out.append(_md_table(*cost.throughput_table(report, models)))
    workload = report["throughput"]["workload"]["source"]
    out += ["", f"Summary columns and the chart use concurrency {conc}. Workload: {workload}."]
    out += [f"- {line}" for line in cost.provenance(report, models)]
    out += [f"- n/a: {note}" for note in cost.not_available_notes(report, models)]
    if any((m.get("throughput") or {}).get("emulation") for m in models):
        out += ["", cost.EMULATION_CAPTION]
    out += ["", "## Capacity from memory (arithmetic, not measured)", ""]
    out.append(_md_table(*cost.capacity_table(report, models)))
    out += ["", cost.CAPACITY_NOTE]
    return out


# ------------------------------------------------------------------------ html

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.verdict{padding:6px 10px;margin:4px 0;border-left:4px solid #55a868;background:#f4fbf6}
.verdict.bad{border-left-color:#c44e52;background:#fcf2f2}
.muted{color:#777;font-size:12px} pre{background:#f6f6f6;padding:8px;font-size:12px}
figure{margin:12px 0}
"""


def _cliff_context(report: dict, models: list[dict], colors: list[str]) -> dict:
    tasks = [t for t, _, _ in _task_rows(report)]
    mods = [m for m in MODALITY_ORDER if m in report["baseline"]["modalities"]]
    figures = [
        svg.bar_chart(
            tasks,
            [(m["name"], [m["tasks"][t]["accuracy"] for t in tasks]) for m in models],
            "Accuracy per task", "accuracy", y_max=1.0, colors=colors,
        ),
        svg.bar_chart(
            mods,
            [(m["name"], [m["modalities"][mod]["accuracy"] for mod in mods]) for m in models],
            "Accuracy per modality", "accuracy", y_max=1.0, colors=colors,
        ),
    ]  # fmt: skip
    rows = [
        [t, report["task_set"]["tasks"][t]["metric"],
         *[_fix(m["tasks"][t]["accuracy"], ".3f") for m in models]]
        for t in tasks
    ]  # fmt: skip
    return {
        "figures": [f for f in figures],
        "table": (["task", "metric", *[m["name"] for m in models]], rows),
        "candidates": [
            {"name": c["name"], "table": _candidate_table(c)} for c in report["candidates"]
        ],
    }


def _size_context(models: list[dict]) -> dict:
    names = [m["name"] for m in models]
    figure = svg.bar_chart(
        names, [("bits/weight", [m["bits_per_weight"] for m in models])], "Bits per weight", "bits"
    )
    header = ["model", "precision", "bits/weight", "size", "KV cache", "emulated formats",
              "samples/s"]  # fmt: skip
    rows = [
        [m["name"], m["precision"], _fix(m["bits_per_weight"], ".3f"), _mb(m["size_bytes"]),
         m.get("kv_cache") or "-",
         ", ".join((m.get("emulation") or {}).get("formats") or []) or "bf16",
         f"{m['evaluation']['samples_per_s']:.2f}"]
        for m in models
    ]  # fmt: skip
    return {"figure": figure, "table": (header, rows)}


def _pareto_context(models: list[dict], colors: list[str]) -> dict:
    """Measured KL (and mean accuracy) against exported GiB for every model, with the
    Pareto front (``omniquant.report.pareto``)."""
    from omniquant.report.pareto import pareto_front

    def gib(m: dict) -> float | None:
        return None if m["size_bytes"] is None else m["size_bytes"] / 2**30

    kl = [(m["name"], gib(m), m["overall"]["kl_mean"]) for m in models]
    acc = [(m["name"], gib(m), m["overall"]["accuracy"]) for m in models]
    kl_front = pareto_front(kl)
    acc_front = pareto_front([(n, x, None if y is None else -y) for n, x, y in acc])
    figures = [
        svg.pareto_chart(kl, kl_front, "Quality vs size: mean KL to the baseline",
                         "exported GiB", "KL mean (nats)", "Pareto front (less KL, fewer bytes)",
                         colors=colors),
        svg.pareto_chart(acc, acc_front, "Quality vs size: mean accuracy", "exported GiB",
                         "accuracy", "Pareto front (more accuracy, fewer bytes)", y_max=1.0,
                         colors=colors),
    ]  # fmt: skip
    note = (
        "One dot per model of this report (built-in, fitted and algorithm-variant recipes "
        "alike); ringed and joined: the Pareto front, the models no other model beats on "
        "both size and quality. KL front: " + (", ".join(kl_front) or "none") + "; accuracy "
        "front: " + (", ".join(acc_front) or "none") + "."
    )
    return {"figures": figures, "note": note}


def _fidelity_context(report: dict, models: list[dict], colors: list[str]) -> dict:
    mods = [m for m in MODALITY_ORDER if m in report["baseline"]["modalities"]]
    cands = models[1:]
    figures = [
        svg.bar_chart(
            mods,
            [(c["name"], [c["kl_by_modality"].get(mod) for mod in mods]) for c in cands],
            "Mean KL(baseline || candidate) per modality", "KL (nats)", colors=colors[1:],
        ),
        svg.bar_chart(
            mods,
            [(c["name"], [c["modalities"][mod]["top1_agreement"] for mod in mods]) for c in cands],
            "Top-1 agreement with the baseline per modality", "agreement", y_max=1.0,
            colors=colors[1:],
        ),
    ]  # fmt: skip
    fid = report["settings"]["fidelity"]
    return {"figures": [f for f in figures], "note": f"{fid['kl']}; {fid['distribution']}."}


def _evs_context(report: dict, models: list[dict], colors: list[str]) -> dict | None:
    if not (report["evs"]["video_samples"] and report["evs"]["rates"]):
        return None
    acc_series, kl_series = [], []
    for m in models:
        evs = m.get("evs") or []
        acc_series.append(
            (m["name"], [(r["video_tokens"], r["accuracy"], f"q={r['rate']:g}") for r in evs])
        )
        kl_series.append(
            (m["name"], [(r["video_tokens"], r["kl_mean"], f"q={r['rate']:g}") for r in evs])
        )
    x_label = "video tokens (summed over video samples)"
    figures = [
        svg.line_chart(acc_series, "Video accuracy vs video tokens reaching the backbone",
                       x_label, "accuracy", y_max=1.0, colors=colors),
        svg.line_chart(kl_series, f"KL vs video tokens (reference: {report['evs']['reference']})",
                       x_label, "KL (nats)", colors=colors),
    ]  # fmt: skip
    return {"figures": [f for f in figures], "table": _evs_table(models)}


def _expert_heatmap(name: str, cal: dict) -> str | None:
    experts = cal.get("expert_tokens") or {}
    if not experts:
        return None
    layers = list(experts)
    width = max(len(v) for v in experts.values())
    matrix = [
        [float(x) for x in experts[layer]] + [0.0] * (width - len(experts[layer]))
        for layer in layers
    ]
    return svg.heatmap(
        [_layer_label(layer) for layer in layers],
        [str(i) for i in range(width)],
        matrix,
        f"Expert calibration tokens (routed): {name}",
        zero_note=(
            "routed no token, calibrated anyway (force_all_experts)"
            if cal.get("force_all_experts")
            else "expert that received no calibration token"
        ),
    )


def _calibration_context(report: dict) -> list[dict]:
    out = []
    for cand in report["candidates"]:
        cal = cand.get("calibration")
        if not cal:
            out.append({"name": cand["name"], "missing": True})
            continue
        heatmap = _expert_heatmap(cand["name"], cal)
        out.append({
            "name": cand["name"], "missing": False, "samples": cal.get("samples"),
            "set": str(cal.get("set")),
            "tokens": ", ".join(f"{k} {v}" for k, v in (cal.get("tokens_by_modality") or {}).items()),
            "coverage": _coverage_text(cal), "heatmap": heatmap if heatmap else None,
        })  # fmt: skip
    return out


def _sensitivity_context(report: dict) -> dict | None:
    sens = report.get("sensitivity")
    if not sens:
        return None
    figure = svg.hbar_chart(
        [g["group"] for g in sens["groups"]], [g["kl_mean"] for g in sens["groups"]],
        "Mean KL added per module group (ranked)", "KL (nats)",
    )  # fmt: skip
    return {
        "format": sens["format"], "figure": figure, "table": _sensitivity_table(sens),
        "skipped": sens["skipped"], "suggestion": sens["suggestion"]["text"],
        "recipe_yaml": sens["suggestion"]["recipe_yaml"],
    }  # fmt: skip


def _samples_context(models: list[dict]) -> list[dict]:
    header = ["id", "task", "modality", "prediction", "score", "KL", "top-1"]
    return [
        {"name": m["name"], "table": (header, [
            [s["id"], s["task"], s["modality"], (s["prediction"] or "")[:80],
             _num(s["score"], 3), _num(s["kl"]), _num(s["top1"], 3)]
            for s in m["samples"]
        ])}
        for m in models
    ]  # fmt: skip


def _workload_table(report: dict) -> tuple[list[str], list[list[str]]]:
    t = report["throughput"]
    wl = t["workload"]
    media = wl["media_seconds_per_cycle"]
    per_level = (f"{wl['requests_per_level']} requests" if wl["requests_per_level"] is not None
                 else f"{wl['duration_s_per_level']} s")  # fmt: skip
    price = t.get("gpu_hour_price")
    rows = [
        ["samples", wl["source"]],
        ["media per cycle of samples", f"video {media['video']:g} s, audio {media['audio']:g} s"],
        ["concurrency levels", ", ".join(str(c) for c in wl["concurrency"])],
        ["warm-up", f"{wl['warmup_requests']} requests, not counted"],
        ["per level", per_level],
        ["max_tokens", str(wl["max_tokens"])],
        ["price", "not given" if price is None else f"{price:g} $ per GPU-hour x {t['gpus_per_model']} GPU"],
        ["order", t["order"]],
    ]  # fmt: skip
    return ["setting", "value"], rows


def _cost_context(report: dict, models: list[dict], colors: list[str]) -> dict | None:
    if "throughput" not in report:
        return None
    from omniquant.report import cost

    points, x_label, y_label, size_label = cost.chart_points(report, models)
    conc = report["throughput"]["chart_concurrency"]
    figure = svg.bubble_chart(
        points, f"Quality vs {'cost' if report['throughput'].get('gpu_hour_price') is not None else 'throughput'} "
        f"(concurrency {conc})", x_label, y_label, size_label, y_max=1.0, colors=colors,
    )  # fmt: skip
    emulated = any((m.get("throughput") or {}).get("emulation") for m in models)
    caption = (f"One bubble per model at concurrency {conc}; x: {x_label}; y: {y_label}; bubble "
               f"area: {size_label}. Measured, see the table below.")  # fmt: skip
    if emulated:
        caption += f" {cost.EMULATION_CAPTION}"
    return {
        "figure": figure, "caption": caption,
        "provenance": cost.provenance(report, models),
        "measured": cost.throughput_table(report, models),
        "notes": cost.not_available_notes(report, models),
        "capacity": cost.capacity_table(report, models),
        "capacity_note": cost.CAPACITY_NOTE,
        "workload": _workload_table(report),
    }  # fmt: skip


def _harness_context(report: dict) -> dict | None:
    """The harness section (``omniquant.report.harness``): one row per task."""
    block = report.get("harness")
    if not block:
        return None
    models = block["models"]
    rows = []
    for task, meta in block["tasks"].items():
        cells = []
        for i, m in enumerate(models):
            s = m["tasks"][task]
            cell = f"{s['value']:.3f}"
            if i:
                cell += f" ({100 * s['recovery']:.0f}%)"
            cells.append(cell)
        rows.append({"task": task, "metric": meta["metric"]
                     + (" (higher is better)" if meta["higher_is_better"] else " (lower is better)")
                     + (", corpus ratio" if meta.get("corpus") else ""),
                     "cells": cells})  # fmt: skip
    return {"name": block["harness"], "models": [m["name"] for m in models], "rows": rows,
            "verdicts": [m["verdict"] for m in models[1:]]}  # fmt: skip


def write_html(report: dict) -> str:
    """The report as one self-contained HTML page with inline SVG plots (the page is
    ``templates/report.html.j2``; each section's numbers and plots are built here)."""
    import jinja2

    models = cliff_order(report)
    colors = [svg.PALETTE[i % len(svg.PALETTE)] for i in range(len(models))]
    ts = report["task_set"]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("omniquant.report", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    context = {
        "css": _CSS,
        "task_set": ts["name"],
        "samples": ts["samples"],
        "modalities": ", ".join(f"{m} {n}" for m, n in ts["modalities"].items()),
        "baseline": report["baseline"]["name"],
        "verdicts": [
            {
                "cls": "verdict bad" if c.get("tasks_below_threshold") else "verdict",
                "text": c["verdict"],
            }
            for c in report["candidates"]
        ],
        "cliff": _cliff_context(report, models, colors),
        "harness": _harness_context(report),
        "size": _size_context(models),
        "cost": _cost_context(report, models, colors),
        "pareto": _pareto_context(models, colors),
        "fidelity": _fidelity_context(report, models, colors),
        "evs": _evs_context(report, models, colors),
        "calibration": _calibration_context(report),
        "sensitivity": _sensitivity_context(report),
        "sample_tables": _samples_context(models),
        "versions": report["versions"],
    }
    return env.get_template("report.html.j2").render(context)


def _coverage_text(cal: dict) -> str:
    """How many experts the router sent no calibration token, and what that means here."""
    experts = cal.get("expert_tokens") or {}
    starved = sum(1 for counts in experts.values() for c in counts if c == 0)
    total = sum(len(c) for c in experts.values())
    text = f"{starved} of {total} experts were routed no token"
    silent = cal.get("experts_without_activations")
    if cal.get("force_all_experts"):
        text += " (force_all_experts ran every token through every expert"
        text += f"; {silent} expert GEMMs saw no input)" if silent is not None else ")"
    elif starved:
        text += " (their input scale comes from the other experts' traffic)"
    return text

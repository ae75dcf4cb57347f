"""Render a report dict (``report.json``) as Markdown and as one self-contained HTML page.

Policy: rendering reads only the report dict, so a ``report.json`` can be re-rendered
without any model. The HTML page has inline CSS and inline SVG plots
(``omniquant.report.svg``), no scripts and no external URL: it opens offline.
Markdown carries the same numbers as tables (plots need the HTML). Models appear in
cliff order: the baseline, then candidates by decreasing bits per weight.
"""

from __future__ import annotations

from html import escape

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


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fig(svg_text: str) -> str:
    return f"<figure>{svg_text}</figure>"


def write_html(report: dict) -> str:
    """The report as one self-contained HTML page with inline SVG plots."""
    models = cliff_order(report)
    names = [m["name"] for m in models]
    colors = [svg.PALETTE[i % len(svg.PALETTE)] for i in range(len(models))]
    ts = report["task_set"]
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>Quality-cliff report: {escape(ts['name'])}</title><style>{_CSS}</style></head><body>",
        "<h1>Quality-cliff report</h1>",
        f"<p>Task set <b>{escape(ts['name'])}</b>: {ts['samples']} samples ("
        + escape(", ".join(f"{m} {n}" for m, n in ts["modalities"].items()))
        + f"). Baseline <b>{escape(report['baseline']['name'])}</b>; every model evaluated from its "
        "exported files with serving numerics.</p>",
        "<h2>Verdicts</h2>",
    ]
    for cand in report["candidates"]:
        cls = "verdict bad" if cand.get("tasks_below_threshold") else "verdict"
        parts.append(f'<div class="{cls}">{escape(cand["verdict"])}</div>')

    # The cliff
    tasks = [t for t, _, _ in _task_rows(report)]
    parts.append("<h2>The cliff</h2>")
    parts.append(
        _fig(
            svg.bar_chart(
                tasks,
                [(m["name"], [m["tasks"][t]["accuracy"] for t in tasks]) for m in models],
                "Accuracy per task",
                "accuracy",
                y_max=1.0,
                colors=colors,
            )
        )
    )
    mods = [m for m in MODALITY_ORDER if m in report["baseline"]["modalities"]]
    parts.append(
        _fig(
            svg.bar_chart(
                mods,
                [(m["name"], [m["modalities"][mod]["accuracy"] for mod in mods]) for m in models],
                "Accuracy per modality",
                "accuracy",
                y_max=1.0,
                colors=colors,
            )
        )
    )
    rows = [
        [
            t,
            report["task_set"]["tasks"][t]["metric"],
            *[_fix(m["tasks"][t]["accuracy"], ".3f") for m in models],
        ]
        for t in tasks
    ]
    parts.append(_html_table(["task", "metric", *names], rows))
    for cand in report["candidates"]:
        parts.append(f"<h3>{escape(cand['name'])} vs baseline</h3>")
        parts.append(_html_table(*_candidate_table(cand)))

    # Size
    parts.append("<h2>Size and bits per weight</h2>")
    parts.append(
        _fig(
            svg.bar_chart(
                names,
                [("bits/weight", [m["bits_per_weight"] for m in models])],
                "Bits per weight",
                "bits",
            )
        )
    )
    parts.append(
        _html_table(
            [
                "model",
                "precision",
                "bits/weight",
                "size",
                "KV cache",
                "emulated formats",
                "samples/s",
            ],
            [
                [
                    m["name"],
                    m["precision"],
                    _fix(m["bits_per_weight"], ".3f"),
                    _mb(m["size_bytes"]),
                    m.get("kv_cache") or "-",
                    ", ".join((m.get("emulation") or {}).get("formats") or []) or "bf16",
                    f"{m['evaluation']['samples_per_s']:.2f}",
                ]
                for m in models
            ],
        )
    )

    # Fidelity
    parts.append("<h2>Fidelity: KL to the baseline by modality</h2>")
    cands = models[1:]
    parts.append(
        _fig(
            svg.bar_chart(
                mods,
                [(c["name"], [c["kl_by_modality"].get(mod) for mod in mods]) for c in cands],
                "Mean KL(baseline || candidate) per modality",
                "KL (nats)",
                colors=colors[1:],
            )
        )
    )
    parts.append(
        _fig(
            svg.bar_chart(
                mods,
                [
                    (c["name"], [c["modalities"][mod]["top1_agreement"] for mod in mods])
                    for c in cands
                ],
                "Top-1 agreement with the baseline per modality",
                "agreement",
                y_max=1.0,
                colors=colors[1:],
            )
        )
    )
    parts.append(
        f'<p class="muted">{escape(report["settings"]["fidelity"]["kl"])}; '
        f"{escape(report['settings']['fidelity']['distribution'])}.</p>"
    )

    # EVS
    parts.append("<h2>EVS: video tokens vs quality</h2>")
    if report["evs"]["video_samples"] and report["evs"]["rates"]:
        acc_series, kl_series = [], []
        for m in models:
            evs = m.get("evs") or []
            acc_series.append(
                (m["name"], [(r["video_tokens"], r["accuracy"], f"q={r['rate']:g}") for r in evs])
            )
            kl_series.append(
                (m["name"], [(r["video_tokens"], r["kl_mean"], f"q={r['rate']:g}") for r in evs])
            )
        parts.append(
            _fig(
                svg.line_chart(
                    acc_series,
                    "Video accuracy vs video tokens reaching the backbone",
                    "video tokens (summed over video samples)",
                    "accuracy",
                    y_max=1.0,
                    colors=colors,
                )
            )
        )
        parts.append(
            _fig(
                svg.line_chart(
                    kl_series,
                    f"KL vs video tokens (reference: {report['evs']['reference']})",
                    "video tokens (summed over video samples)",
                    "KL (nats)",
                    colors=colors,
                )
            )
        )
        parts.append(_html_table(*_evs_table(models)))
    else:
        parts.append("<p>No video samples in the task set (or no rates): no sweep.</p>")

    # Calibration coverage
    parts.append("<h2>Calibration coverage</h2>")
    for cand in report["candidates"]:
        cal = cand.get("calibration")
        if not cal:
            parts.append(
                f"<p>{escape(cand['name'])}: no <code>omniquant.json</code> calibration block.</p>"
            )
            continue
        experts = cal.get("expert_tokens") or {}
        toks = ", ".join(f"{k} {v}" for k, v in (cal.get("tokens_by_modality") or {}).items())
        parts.append(
            f"<p>{escape(cand['name'])}: {cal.get('samples')} samples from "
            f"<code>{escape(str(cal.get('set')))}</code> ({escape(toks)} tokens); "
            f"{escape(_coverage_text(cal))}.</p>"
        )
        if experts:
            layers = list(experts)
            width = max(len(v) for v in experts.values())
            matrix = [
                [float(x) for x in experts[layer]] + [0.0] * (width - len(experts[layer]))
                for layer in layers
            ]
            labels = [_layer_label(layer) for layer in layers]
            parts.append(
                _fig(
                    svg.heatmap(
                        labels,
                        [str(i) for i in range(width)],
                        matrix,
                        f"Expert calibration tokens (routed): {cand['name']}",
                        zero_note=(
                            "routed no token, calibrated anyway (force_all_experts)"
                            if cal.get("force_all_experts")
                            else "expert that received no calibration token"
                        ),
                    )
                )
            )

    # Sensitivity
    sens = report.get("sensitivity")
    if sens:
        parts.append(f"<h2>Sensitivity: one group at a time in {escape(sens['format'])}</h2>")
        parts.append(
            _fig(
                svg.hbar_chart(
                    [g["group"] for g in sens["groups"]],
                    [g["kl_mean"] for g in sens["groups"]],
                    "Mean KL added per module group (ranked)",
                    "KL (nats)",
                )
            )
        )
        parts.append(_html_table(*_sensitivity_table(sens)))
        for skip in sens["skipped"]:
            parts.append(
                f'<p class="muted">Skipped {escape(skip["group"])}: {escape(skip["reason"])}</p>'
            )
        parts.append(f"<p><b>Suggestion.</b> {escape(sens['suggestion']['text'])}</p>")
        if sens["suggestion"]["recipe_yaml"]:
            parts.append(f"<pre>{escape(sens['suggestion']['recipe_yaml'])}</pre>")

    # Per-sample detail
    parts.append("<h2>Samples</h2><details><summary>Per-sample predictions and fidelity</summary>")
    for m in models:
        parts.append(f"<h3>{escape(m['name'])}</h3>")
        parts.append(
            _html_table(
                ["id", "task", "modality", "prediction", "score", "KL", "top-1"],
                [
                    [
                        s["id"],
                        s["task"],
                        s["modality"],
                        (s["prediction"] or "")[:80],
                        _num(s["score"], 3),
                        _num(s["kl"]),
                        _num(s["top1"], 3),
                    ]
                    for s in m["samples"]
                ],
            )
        )
    parts.append("</details>")
    parts.append(
        f'<p class="muted">omniquant {escape(report["versions"]["omniquant"])}, torch '
        f"{escape(report['versions']['torch'])}, transformers {escape(report['versions']['transformers'])}."
        "</p></body></html>"
    )
    return "\n".join(parts) + "\n"


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

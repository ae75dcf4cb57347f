"""The cost side of the report: throughput, latency, hours of media per hour, cost, capacity.

Policy: reads only the report dict (``report["throughput"]`` and each model's
``throughput`` block, written by ``omniquant.experiments.throughput``); the Markdown,
HTML and terminal renderers take their rows from here, so all three show the same
numbers. A figure that was not measured is ``n/a`` with its reason nearby, never a
number. Measured figures and the capacity arithmetic are separate tables, each
labelled. The chart plots quality (mean accuracy) against cost per hour of media (or
hours of media per hour when no price was given) at the highest concurrency level,
bubble area = requests/s; every figure carries its server and machine.
"""

from __future__ import annotations


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _fix(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def media_kind(report: dict) -> str:
    """The modality the headline figures use: video when the workload sends any, else audio."""
    per_cycle = report["throughput"]["workload"]["media_seconds_per_cycle"]
    return "video" if per_cycle.get("video") else "audio"


def level_of(model: dict, concurrency: int) -> dict | None:
    """A model's figures at one concurrency level (``None``: not measured)."""
    block = model.get("throughput") or {}
    return next((lv for lv in block.get("levels", []) if lv["concurrency"] == concurrency), None)


def _rate(level: dict | None, key: str, kind: str):
    values = (level or {}).get(key) or {}
    return values.get(kind)


def _why(model: dict, level: dict | None) -> str:
    block = model.get("throughput") or {}
    if level is None:
        return block.get("error") or "not measured"
    na = level.get("not_available")
    if level.get("requests_per_s") is None:
        return str(na)
    return "; ".join(f"{k}: {v}" for k, v in na.items()) if isinstance(na, dict) else ""


def headline(report: dict, model: dict) -> dict:
    """The figures the summary table and the chart show for ``model``."""
    kind = media_kind(report)
    level = level_of(model, report["throughput"]["chart_concurrency"])
    return {
        "requests_per_s": (level or {}).get("requests_per_s"),
        "hours_per_hour": {k: _rate(level, "media_hours_per_hour", k) for k in ("video", "audio")},
        "cost": {k: _rate(level, "cost_per_media_hour", k) for k in ("video", "audio")},
        "kind": kind,
        "why": _why(model, level),
    }


def _where(block: dict) -> str:
    """Server and machine, short (the full words are in ``provenance``)."""
    server = str(block.get("server", "-")).split(" (")[0]
    if block.get("emulation"):
        server += ", CPU emulation"
    return f"{server} @ {str(block.get('machine', '-')).split(',')[0]}"


def throughput_table(report: dict, models: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Measured figures, one row per model and level."""
    header = ["model", "concurrency", "requests", "errors", "req/s", "in tok/s", "out tok/s",
              "TTFT p50/p99 s", "latency p50/p99 s", "video h/h", "audio h/h",
              "$/video h", "$/audio h", "server @ machine"]  # fmt: skip
    rows = []
    for m in models:
        block = m.get("throughput") or {}
        levels = block.get("levels") or []
        if not levels:
            rows.append([m["name"], "-", "-", "-", *["n/a"] * 9, _where(block)])
            continue
        for lv in levels:
            ttft, lat = lv.get("ttft_s"), lv.get("latency_s")
            rows.append([
                m["name"], str(lv["concurrency"]), str(lv["requests"]), str(lv["errors"]),
                _fix(lv.get("requests_per_s"), ".3f"),
                _fix(lv.get("input_tokens_per_s"), ".1f"), _fix(lv.get("output_tokens_per_s"), ".1f"),
                "n/a" if ttft is None else f"{ttft['p50']:.3f} / {ttft['p99']:.3f}",
                "n/a" if lat is None else f"{lat['p50']:.3f} / {lat['p99']:.3f}",
                _fix(_rate(lv, "media_hours_per_hour", "video"), ".3f"),
                _fix(_rate(lv, "media_hours_per_hour", "audio"), ".3f"),
                _fix(_rate(lv, "cost_per_media_hour", "video"), ".2f"),
                _fix(_rate(lv, "cost_per_media_hour", "audio"), ".2f"),
                _where(block),
            ])  # fmt: skip
    return header, rows


def not_available_notes(report: dict, models: list[dict]) -> list[str]:
    """Why a figure is n/a: one line per reason, naming the models and levels it covers."""
    where: dict[str, list[str]] = {}
    for m in models:
        block = m.get("throughput") or {}
        if block.get("error"):
            where.setdefault(block["error"], []).append(m["name"])
        for lv in block.get("levels") or []:
            why = _why(m, lv)
            if why:
                where.setdefault(why, []).append(f"{m['name']} at concurrency {lv['concurrency']}")
    return [f"{', '.join(names)}: {why}" for why, names in where.items()]


def capacity_table(report: dict, models: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Arithmetic, not measured: concurrent sequences of the workload's length that fit."""
    gib = report["throughput"]["gpu_memory_bytes"] / 2**30
    header = ["model", "precision", f"sequences in {gib:g} GiB (arithmetic)", "tokens/sequence",
              "state/sequence", "KV bytes", "weights"]  # fmt: skip
    rows = []
    for m in models:
        cap = (m.get("throughput") or {}).get("capacity") or {}
        if cap.get("sequences") is None:
            rows.append([m["name"], m["precision"], "n/a", "-", "-", "-",
                         cap.get("not_available", "not computed")])  # fmt: skip
            continue
        rows.append([
            m["name"], m["precision"], f"{cap['sequences']:,}", str(cap["tokens"]),
            f"{cap['bytes_per_sequence'] / 2**20:.3f} MiB", str(cap["kv_bytes"]),
            _size(cap["weight_bytes"]),
        ])  # fmt: skip
    return header, rows


def chart_points(report: dict, models: list[dict]) -> tuple[list, str, str, str]:
    """``(points, x label, y label, size label)`` of the quality-versus-cost chart."""
    kind = media_kind(report)
    price = report["throughput"].get("gpu_hour_price") is not None
    points = []
    for m in models:
        head = headline(report, m)
        x = head["cost"][kind] if price else head["hours_per_hour"][kind]
        points.append((m["name"], x, m["overall"]["accuracy"], head["requests_per_s"]))
    x_label = (
        f"cost per hour of {kind} ($, at {report['throughput']['gpu_hour_price']:g} $/GPU-hour)"
        if price
        else f"hours of {kind} processed per wall-clock hour"
    )
    return points, x_label, "mean accuracy", "requests/s"


def provenance(report: dict, models: list[dict]) -> list[str]:
    """Where the figures came from, one line per model (server and machine)."""
    lines = []
    for m in models:
        block = m.get("throughput") or {}
        line = f"{m['name']}: {block.get('server', '-')}; machine: {block.get('machine', '-')}"
        if block.get("load_generator"):
            line += f"; load generator: {block['load_generator']}"
        lines.append(line)
    return lines


EMULATION_CAPTION = (
    "Figures from omniquant serve are CPU emulation of the serving numerics on the machine "
    "named above, not serving performance: they show the measurement, not what a GPU "
    "server achieves."
)
CAPACITY_NOTE = (
    "floor((GPU memory - weights on disk) / (K/V of the attention layers at the workload's "
    "longest prompt + max_tokens, plus the Mamba SSM (float32) and conv states)); activations, "
    "CUDA graphs, allocator overhead and the engine's memory fraction are not counted. "
    "Arithmetic over config.json, not a measurement."
)

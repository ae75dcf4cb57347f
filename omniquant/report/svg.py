"""Inline SVG charts for the HTML report: grouped bars, horizontal bars, lines, bubbles, heatmaps.

Policy: plots are plain SVG strings written by hand, embedded inline in
``report.html``. No plotting dependency, no fonts or scripts to fetch: the report
opens offline in any browser and its bytes are deterministic (same numbers, same
file). Every text node is escaped. Values that are ``None`` are drawn as a small
"n/a" mark, never as zero, so a missing number cannot pass for a measured one.
"""

from __future__ import annotations

import itertools
import math
from html import escape

#: Colour per series index; the first is used for the baseline.
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
_FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * 10**exp
        if top >= value * (1 - 1e-9):
            return float(top)
    return float(10 ** (exp + 1))


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        ),
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        (
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14" '
            f'font-weight="bold" {_FONT}>{escape(title)}</text>'
        ),
    ]


def _legend(names: list[str], x: float, y: float, colors: list[str]) -> list[str]:
    out = []
    for i, (name, color) in enumerate(zip(names, colors)):
        yy = y + 16 * i
        out.append(f'<rect x="{x:.1f}" y="{yy - 9:.1f}" width="10" height="10" fill="{color}"/>')
        out.append(
            f'<text x="{x + 14:.1f}" y="{yy:.1f}" font-size="11" {_FONT}>{escape(name)}</text>'
        )
    return out


def _y_axis(
    left: float, top: float, plot_h: float, plot_w: float, y_max: float, label: str
) -> list[str]:
    out = []
    for k in range(5):
        value = y_max * k / 4
        y = top + plot_h - plot_h * k / 4
        out.append(
            f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + plot_w:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
        )
        out.append(
            f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end" font-size="10" {_FONT}>'
            f"{_fmt(value)}</text>"
        )
    out.append(
        f'<line x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" y2="{top + plot_h:.1f}" stroke="#333"/>'
    )
    out.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})" {_FONT}>{escape(label)}</text>'
    )
    return out


def _xy_layout(
    n_series: int, colors: list[str] | None, width: int, height: int, bottom: int
) -> tuple[list[str], int, int, int, int, int]:
    """Series colours and the plot box of an x/y chart with a legend on the right.

    Returns ``(colors, legend_w, left, top, plot_w, plot_h)``; ``bottom`` is the room
    left under the plot for the category or x-axis labels.
    """
    colors = colors or [PALETTE[i % len(PALETTE)] for i in range(n_series)]
    legend_w, left, top = 150, 56, 34
    return colors, legend_w, left, top, width - left - legend_w - 10, height - top - bottom


def bar_chart(
    categories: list[str],
    series: list[tuple[str, list[float | None]]],
    title: str,
    y_label: str,
    y_max: float | None = None,
    width: int = 760,
    height: int = 320,
    colors: list[str] | None = None,
) -> str:
    """Grouped vertical bars: one group per category, one bar per series.

    ``colors`` gives each series its colour (default: the palette in order), so one
    model keeps its colour across charts.
    """
    colors, legend_w, left, top, plot_w, plot_h = _xy_layout(len(series), colors, width, height, 70)
    values = [v for _, vals in series for v in vals if v is not None]
    y_max = y_max if y_max is not None else nice_max(max(values, default=0.0))
    out = _open(width, height, title) + _y_axis(left, top, plot_h, plot_w, y_max, y_label)
    n_cat, n_ser = max(len(categories), 1), max(len(series), 1)
    group_w = plot_w / n_cat
    bar_w = max(2.0, min(28.0, group_w * 0.8 / n_ser))
    for ci, cat in enumerate(categories):
        gx = left + group_w * ci + (group_w - bar_w * n_ser) / 2
        for si, (_, vals) in enumerate(series):
            x = gx + si * bar_w
            value = vals[ci] if ci < len(vals) else None
            if value is None:
                out.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 3:.1f}" font-size="8" '
                    f'text-anchor="middle" fill="#999" {_FONT}>n/a</text>'
                )
                continue
            h = plot_h * min(max(value, 0.0), y_max) / y_max
            out.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                f'height="{max(h, 0.0):.1f}" fill="{colors[si]}"><title>{escape(series[si][0])} '
                f"{escape(cat)}: {_fmt(value)}</title></rect>"
            )
            # A zero-height bar stays visible as a coloured baseline tick.
            out.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - 2:.1f}" width="{bar_w - 1:.1f}" height="2" '
                f'fill="{colors[si]}"/>'
            )
        out.append(
            f'<text x="{left + group_w * (ci + 0.5):.1f}" y="{top + plot_h + 14:.1f}" font-size="10" '
            f'text-anchor="end" transform="rotate(-25 {left + group_w * (ci + 0.5):.1f} '
            f'{top + plot_h + 14:.1f})" {_FONT}>{escape(cat)}</text>'
        )
    out.append(
        f'<line x1="{left:.1f}" y1="{top + plot_h:.1f}" x2="{left + plot_w:.1f}" '
        f'y2="{top + plot_h:.1f}" stroke="#333"/>'
    )
    out += _legend([name for name, _ in series], width - legend_w + 4, top + 10, colors)
    return "\n".join(out + ["</svg>"])


def hbar_chart(
    labels: list[str], values: list[float | None], title: str, x_label: str, width: int = 760
) -> str:
    """Horizontal bars, one per label, in the given order (e.g. a ranking)."""
    row_h, left, top = 22, 150, 34
    height = top + row_h * max(len(labels), 1) + 40
    plot_w = width - left - 80
    x_max = nice_max(max((v for v in values if v is not None), default=0.0))
    out = _open(width, height, title)
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row_h
        out.append(
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="11" {_FONT}>{escape(label)}</text>'
        )
        if value is None:
            out.append(
                f'<text x="{left + 4}" y="{y + 15}" font-size="10" fill="#999" {_FONT}>n/a</text>'
            )
            continue
        w = plot_w * max(value, 0.0) / x_max
        color = PALETTE[3] if i == 0 and value > 0 else PALETTE[0]
        out.append(
            f'<rect x="{left}" y="{y + 3}" width="{max(w, 2.0):.1f}" height="{row_h - 6}" fill="{color}">'
            f"<title>{escape(label)}: {_fmt(value)}</title></rect>"
        )
        out.append(
            f'<text x="{left + max(w, 2.0) + 4:.1f}" y="{y + 15}" font-size="10" {_FONT}>{_fmt(value)}</text>'
        )
    axis_y = top + row_h * max(len(labels), 1) + 4
    out.append(
        f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>'
    )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 26}" text-anchor="middle" font-size="11" '
        f"{_FONT}>{escape(x_label)} (axis 0 to {_fmt(x_max)})</text>"
    )
    return "\n".join(out + ["</svg>"])


def line_chart(
    series: list[tuple[str, list[tuple[float, float | None, str]]]],
    title: str,
    x_label: str,
    y_label: str,
    y_max: float | None = None,
    width: int = 760,
    height: int = 320,
    colors: list[str] | None = None,
) -> str:
    """Lines with labelled points: ``series`` is ``[(name, [(x, y, point label), ...])]``."""
    colors, legend_w, left, top, plot_w, plot_h = _xy_layout(len(series), colors, width, height, 50)
    xs = [x for _, pts in series for x, _, _ in pts]
    ys = [y for _, pts in series for _, y, _ in pts if y is not None]
    x_max = nice_max(max(xs, default=0.0))
    y_max = y_max if y_max is not None else nice_max(max(ys, default=0.0))
    out = _open(width, height, title) + _y_axis(left, top, plot_h, plot_w, y_max, y_label)
    for k in range(5):
        value = x_max * k / 4
        x = left + plot_w * k / 4
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 14:.1f}" text-anchor="middle" font-size="10" '
            f"{_FONT}>{_fmt(value)}</text>"
        )
    out.append(
        f'<line x1="{left}" y1="{top + plot_h:.1f}" x2="{left + plot_w:.1f}" y2="{top + plot_h:.1f}" stroke="#333"/>'
    )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="11" '
        f"{_FONT}>{escape(x_label)}</text>"
    )
    for si, (name, pts) in enumerate(series):
        coords = [
            (
                left + plot_w * x / x_max,
                top + plot_h - plot_h * min(max(y, 0.0), y_max) / y_max,
                label,
            )
            for x, y, label in pts
            if y is not None
        ]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in coords)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{colors[si]}" stroke-width="2"/>'
            )
        for x, y, label in coords:
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colors[si]}">'
                f"<title>{escape(name)} {escape(label)}</title></circle>"
            )
            if si == 0:
                out.append(
                    f'<text x="{x + 5:.1f}" y="{y - 6:.1f}" font-size="9" fill="#555" {_FONT}>{escape(label)}</text>'
                )
    out += _legend([name for name, _ in series], width - legend_w + 4, top + 10, colors)
    return "\n".join(out + ["</svg>"])


def _y_range(ys: list[float], y_max: float | None) -> tuple[float, float]:
    """A y range around the data: from a round value below the lowest point to one above
    the highest (capped at ``y_max``), so close qualities stay apart."""
    if not ys:
        return 0.0, y_max or 1.0
    lo, hi = min(ys), max(ys)
    span = max(hi - lo, 0.02 * max(abs(hi), 1e-9), 1e-6)
    step = nice_max(span / 2)
    y_lo = max(0.0, math.floor((lo - span / 2) / step) * step)
    y_hi = math.ceil((hi + span / 2) / step) * step
    if y_max is not None:
        y_hi = min(y_hi, y_max)
    return y_lo, max(y_hi, y_lo + step)


def _xy_frame(width: int, height: int, title: str, box, px, py, span, x_label: str,
              y_label: str) -> list[str]:  # fmt: skip
    """An x-y chart's opening, grid lines, five ticks per axis, plot frame and axis labels.

    ``box`` is ``(left, top, plot_w, plot_h)``, ``span`` ``(x_lo, x_hi, y_lo, y_hi)``;
    ``px``/``py`` map data to pixels."""
    left, top, plot_w, plot_h = box
    x_lo, x_hi, y_lo, y_hi = span
    out = _open(width, height, title)
    for k in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * k / 4, y_lo + (y_hi - y_lo) * k / 4
        out.append(f'<line x1="{left:.1f}" y1="{py(yv):.1f}" x2="{left + plot_w:.1f}" '
                   f'y2="{py(yv):.1f}" stroke="#e5e5e5"/>')  # fmt: skip
        out.append(f'<text x="{left - 6:.1f}" y="{py(yv) + 4:.1f}" text-anchor="end" '
                   f'font-size="10" {_FONT}>{_fmt(yv)}</text>')  # fmt: skip
        out.append(f'<text x="{px(xv):.1f}" y="{top + plot_h + 14:.1f}" text-anchor="middle" '
                   f'font-size="10" {_FONT}>{_fmt(xv)}</text>')  # fmt: skip
    return out + [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>',
        (
            f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" '
            f'font-size="11" {_FONT}>{escape(x_label)}</text>'
        ),
        (
            f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 14 {top + plot_h / 2:.1f})" {_FONT}>{escape(y_label)}</text>'
        ),
    ]


def bubble_chart(
    points: list[tuple[str, float | None, float | None, float | None]],
    title: str,
    x_label: str,
    y_label: str,
    size_label: str,
    y_max: float | None = None,
    width: int = 760,
    height: int = 360,
    colors: list[str] | None = None,
) -> str:
    """One bubble per ``(name, x, y, size)``; bubble area is proportional to ``size``.

    The x axis starts at 0; the y axis spans the data (its ticks say where), with room
    for the largest bubble inside the plot. A point with ``x``, ``y`` or ``size`` ``None``
    is not drawn: its legend entry says "n/a" (no position is invented for a figure
    that was not measured).
    """
    colors, legend_w, left, top, plot_w, plot_h = _xy_layout(len(points), colors, width, height, 50)
    top += 10
    plot_h -= 10
    pad = 32  # the largest radius: bubbles stay inside the plot box
    drawn = [(x, y, s) for _, x, y, s in points if None not in (x, y, s)]
    x_max = nice_max(max((x for x, _, _ in drawn), default=0.0))
    y_lo, y_hi = _y_range([y for _, y, _ in drawn], y_max)
    s_max = max((s for _, _, s in drawn), default=0.0) or 1.0

    def px(x: float) -> float:
        return left + pad + (plot_w - 2 * pad) * x / x_max

    def py(y: float) -> float:
        return top + plot_h - pad - (plot_h - 2 * pad) * (y - y_lo) / (y_hi - y_lo)

    out = _xy_frame(width, height, title, (left, top, plot_w, plot_h), px, py,
                    (0.0, x_max, y_lo, y_hi), x_label, y_label)  # fmt: skip
    names = []
    for i, (name, x, y, size) in enumerate(points):
        if None in (x, y, size):
            names.append(f"{name} (n/a)")
            continue
        names.append(name)
        r = 6 + (pad - 6) * math.sqrt(size / s_max)  # area ~ size, at least visible
        out.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{r:.1f}" fill="{colors[i]}" '
            f'fill-opacity="0.55" stroke="{colors[i]}"><title>{escape(name)}: {escape(x_label)} '
            f"{_fmt(x)}, {escape(y_label)} {_fmt(y)}, {escape(size_label)} {_fmt(size)}</title>"
            "</circle>"
        )
        out.append(
            f'<text x="{px(x):.1f}" y="{py(y) + 4:.1f}" text-anchor="middle" font-size="10" '
            f"{_FONT}>{escape(name)}</text>"
        )
    out += _legend(names, width - legend_w + 4, top + 10, colors)
    out.append(
        f'<text x="{width - legend_w + 4:.1f}" y="{top + 20 + 16 * len(points):.1f}" '
        f'font-size="10" fill="#555" {_FONT}>bubble area: {escape(size_label)}</text>'
    )
    return "\n".join(out + ["</svg>"])


def heatmap(
    row_labels: list[str],
    col_labels: list[str],
    matrix: list[list[float]],
    title: str,
    width: int = 760,
    zero_note: str = "expert that received no calibration token",
) -> str:
    """Cells shaded from white (0) to dark blue (the largest value of the map).

    Zero cells get a red outline, explained in the legend by ``zero_note``.
    """
    left, top = 150, 40
    n_rows, n_cols = max(len(row_labels), 1), max(len(col_labels), 1)
    cell_w = max(4.0, min(40.0, (width - left - 20) / n_cols))
    cell_h = 20
    height = top + cell_h * n_rows + 36
    peak = max((v for row in matrix for v in row), default=0.0) or 1.0
    out = _open(width, height, title)
    for ci, label in enumerate(col_labels):
        if n_cols <= 40 or ci % max(1, n_cols // 20) == 0:
            out.append(
                f'<text x="{left + cell_w * (ci + 0.5):.1f}" y="{top - 6}" text-anchor="middle" '
                f'font-size="9" {_FONT}>{escape(label)}</text>'
            )
    for ri, label in enumerate(row_labels):
        y = top + ri * cell_h
        out.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" font-size="10" {_FONT}>{escape(label)}</text>'
        )
        for ci, value in enumerate(matrix[ri]):
            shade = max(0.0, min(1.0, value / peak))
            r, g, b = (int(255 - shade * (255 - c)) for c in (8, 48, 107))
            stroke = ' stroke="#d62728" stroke-width="2"' if value == 0 else ' stroke="#ffffff"'
            out.append(
                f'<rect x="{left + ci * cell_w:.1f}" y="{y}" width="{cell_w:.1f}" height="{cell_h}" '
                f'fill="rgb({r},{g},{b})"{stroke}><title>{escape(label)} expert {escape(col_labels[ci])}: '
                f"{_fmt(value)}</title></rect>"
            )
    out.append(
        f'<text x="{left}" y="{height - 10}" font-size="10" {_FONT}>white = 0, dark = {_fmt(peak)} tokens; '
        f"red outline = {escape(zero_note)}</text>"
    )
    return "\n".join(out + ["</svg>"])


def pareto_chart(
    points: list[tuple[str, float | None, float | None]],
    front: list[str],
    title: str,
    x_label: str,
    y_label: str,
    front_label: str,
    y_max: float | None = None,
    width: int = 760,
    height: int = 360,
    colors: list[str] | None = None,
) -> str:
    """One dot per ``(name, x, y)``, the members of ``front`` (names, by increasing x)
    ringed and joined by a dashed staircase: what no other point beats on both axes.

    Both axes span the data (their ticks say where). A point with ``x`` or ``y`` ``None``
    is not drawn; its legend entry says "n/a".
    """
    colors, legend_w, left, top, plot_w, plot_h = _xy_layout(len(points), colors, width, height, 50)
    pad = 14
    drawn = [(x, y) for _, x, y in points if x is not None and y is not None]
    x_lo, x_hi = _y_range([x for x, _ in drawn], None)
    y_lo, y_hi = _y_range([y for _, y in drawn], y_max)

    def px(x: float) -> float:
        return left + pad + (plot_w - 2 * pad) * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h - pad - (plot_h - 2 * pad) * (y - y_lo) / (y_hi - y_lo)

    out = _xy_frame(width, height, title, (left, top, plot_w, plot_h), px, py,
                    (x_lo, x_hi, y_lo, y_hi), x_label, y_label)  # fmt: skip
    where = {n: (x, y) for n, x, y in points if x is not None and y is not None}
    stairs = [where[n] for n in front if n in where]
    if stairs:
        path = [f"M{px(stairs[0][0]):.1f},{py(stairs[0][1]):.1f}"]
        for (_, y0), (x1, y1) in itertools.pairwise(stairs):
            path.append(f"L{px(x1):.1f},{py(y0):.1f} L{px(x1):.1f},{py(y1):.1f}")
        out.append(f'<path d="{" ".join(path)}" fill="none" stroke="#333" '
                   'stroke-dasharray="5,3" stroke-width="1.5"/>')  # fmt: skip
    names, placed = [], []
    for i, (name, x, y) in enumerate(points):
        if x is None or y is None:
            names.append(f"{name} (n/a)")
            continue
        on = name in front
        names.append(f"{name}{' *' if on else ''}")
        if on:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="9" fill="none" '
                       'stroke="#333" stroke-width="1.5"/>')  # fmt: skip
        out.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colors[i]}" '
            f'stroke="{colors[i]}"><title>{escape(name)}: {escape(x_label)} {_fmt(x)}, '
            f"{escape(y_label)} {_fmt(y)}{' (Pareto front)' if on else ''}</title></circle>"
        )
        lx, base = px(x) + 11, py(y) - 6
        # Points of equal size sit on one vertical: the label takes the nearest line, up
        # or down, inside the plot, clear of the labels already placed (about 6 px per
        # character, 11 px per line).
        for k in range(40):
            ly = base + 11 * ((k + 1) // 2) * (1 if k % 2 else -1)
            inside = top + 10 <= ly <= top + plot_h - 3
            if inside and not any(
                abs(ly - y2) < 11 and lx < x2 + 6 * n2 and x2 < lx + 6 * len(name)
                for x2, y2, n2 in placed
            ):
                break
        placed.append((lx, ly, len(name)))
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10" {_FONT}>{escape(name)}</text>')
    out += _legend(names, width - legend_w + 4, top + 10, colors)
    words, lines = f"* ringed, dashed line: {front_label}".split(), [""]
    for word in words:  # wrapped to the legend's width (~26 characters)
        if lines[-1] and len(lines[-1]) + 1 + len(word) > 26:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    for k, line in enumerate(lines):
        out.append(
            f'<text x="{width - legend_w + 4:.1f}" y="{top + 20 + 16 * len(points) + 12 * k:.1f}" '
            f'font-size="10" fill="#555" {_FONT}>{escape(line)}</text>'
        )
    return "\n".join(out + ["</svg>"])

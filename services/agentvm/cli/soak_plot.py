"""A soak report as an SVG: service memory and operation latency over time, faults marked.

Plain SVG written here (no plotting library in the installation): two
panels sharing the time axis, one polyline per service or percentile, a
dashed line at each fault. `agent-vm soak --plot FILE` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["render_svg"]

WIDTH, PANEL_H, LEFT, RIGHT, TOP, GAP = 900, 260, 70, 170, 30, 60
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _panel(
    title: str,
    unit: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    top: float,
    t_max: float,
    faults: Sequence[dict[str, Any]],
) -> list[str]:
    plot_w = WIDTH - LEFT - RIGHT
    values = [v for pts in series.values() for _, v in pts]
    v_max = max(values, default=1.0) * 1.1 or 1.0

    def x(t: float) -> float:
        return LEFT + plot_w * t / t_max

    def y(v: float) -> float:
        return top + PANEL_H - PANEL_H * v / v_max

    out = [
        f'<text x="{LEFT}" y="{top - 10}" font-size="14">{escape(title)}</text>',
        f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" '
        'fill="none" stroke="#888"/>',
    ]
    for i in range(5):
        v = v_max * i / 4
        out.append(
            f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{v:.1f} {escape(unit)}</text>'
        )
    for f in faults:
        fx = x(float(f["at_s"]) / 60)
        out.append(
            f'<line x1="{fx:.1f}" y1="{top}" x2="{fx:.1f}" y2="{top + PANEL_H}" '
            'stroke="#aaa" stroke-dasharray="3,3"><title>'
            f"{escape(str(f['kind']))} at {f['at_s']} s</title></line>"
        )
    for n, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[n % len(COLOURS)]
        if pts:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            out.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}">'
                f"<title>{escape(name)}</title></polyline>"
            )
        ly = top + 16 * n + 10
        out.append(
            f'<rect x="{WIDTH - RIGHT + 12}" y="{ly - 8}" width="10" height="10" '
            f'fill="{colour}"/><text x="{WIDTH - RIGHT + 28}" y="{ly + 1}" '
            f'font-size="12">{escape(name)}</text>'
        )
    return out


def render_svg(report: dict[str, Any]) -> str:
    """The report's ``rss_over_time`` and ``latency_per_minute`` drawn against minutes."""
    rss: dict[str, list[tuple[float, float]]] = {
        svc: [(float(t) / 60, float(mib)) for t, mib, _pid in pts]
        for svc, pts in report.get("rss_over_time", {}).items()
    }
    minutes = report.get("latency_per_minute", [])
    lat = {
        "p50": [(m["minute"] + 0.5, m["p50_s"]) for m in minutes if m["p50_s"] is not None],
        "p99": [(m["minute"] + 0.5, m["p99_s"]) for m in minutes if m["p99_s"] is not None],
    }
    t_max = max(float(report.get("minutes", 1)), 1.0)
    faults = report.get("faults", [])
    height = TOP + 2 * PANEL_H + GAP + 40
    body = _panel("service resident memory", "MiB", rss, TOP, t_max, faults)
    body += _panel("operation latency per minute", "s", lat, TOP + PANEL_H + GAP, t_max, faults)
    axis_y = TOP + 2 * PANEL_H + GAP + 20
    body.append(
        f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2}" y="{axis_y}" font-size="12" '
        f'text-anchor="middle">minutes (0 to {t_max:g}); dashed: faults; seed '
        f"{escape(str(report.get('seed', '')))}</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif">\n' + "\n".join(body) + "\n</svg>\n"
    )

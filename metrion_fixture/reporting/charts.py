"""Small charts as inline SVG text: no script, no external file, so they show in a notebook and an email alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .reports import plural

HIT_COLOR = "#1a7f37"
MISS_COLOR = "#8c959f"
OTHER_COLOR = "#d0d7de"  # bypassed and refused calls


def daily_calls_svg(days: Sequence[Mapping[str, Any]], *, width: int = 480, height: int = 150) -> str:
    """Stacked bars per day: hits, misses, the rest; each bar's title says its counts and the dollars saved.

    ``days`` are the Savings card's (:func:`~metrion_fixture.reporting.dashboard.savings`): ``day``,
    ``hits``, ``misses``, ``other`` and ``saved_usd_text``.
    """
    left, right, top, bottom = 30, 6, 16, 20
    plot_width, plot_height = width - left - right, height - top - bottom
    peak = max([day["hits"] + day["misses"] + day["other"] for day in days] + [1])
    slot = plot_width / max(len(days), 1)
    bar = max(1.0, slot * 0.7)
    base = top + plot_height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="metrion-cache-chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="calls per day: hits and misses" '
        'style="font-family:sans-serif;font-size:10px">',
        f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#d0d7de"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" fill="#57606a">{peak}</text>',
        f'<text x="{left - 4}" y="{base}" text-anchor="end" fill="#57606a">0</text>',
        f'<text x="{left}" y="10" fill="{HIT_COLOR}">■ hits</text>',
        f'<text x="{left + 44}" y="10" fill="{MISS_COLOR}">■ misses</text>',
    ]
    for index, day in enumerate(days):
        x = left + index * slot + (slot - bar) / 2
        title = (
            f"{day['day']}: {plural(day['hits'], 'hit')}, {plural(day['misses'], 'miss')}"
            + (f", {day['other']} other" if day["other"] else "")
            + f", {day['saved_usd_text']} saved"
        )
        parts.append(f'<g data-day="{escape(day["day"])}"><title>{escape(title)}</title>')
        y = float(base)
        for kind, count, color in (
            ("hits", day["hits"], HIT_COLOR),
            ("misses", day["misses"], MISS_COLOR),
            ("other", day["other"], OTHER_COLOR),
        ):
            if not count:
                continue
            size = plot_height * count / peak
            y -= size
            parts.append(
                f'<rect class="{kind}" data-count="{count}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                f'height="{size:.1f}" fill="{color}"/>'
            )
        parts.append("</g>")
    if days:
        parts.append(f'<text x="{left}" y="{height - 6}" fill="#57606a">{escape(days[0]["day"])}</text>')
        if len(days) > 1:
            parts.append(
                f'<text x="{width - right}" y="{height - 6}" text-anchor="end" fill="#57606a">'
                f"{escape(days[-1]['day'])}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)

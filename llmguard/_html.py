"""The report as one self-contained HTML file: inline SVG charts, no network, no CDN."""

from __future__ import annotations

import html
from decimal import Decimal

from ._money import format_usd
from ._report import Report

_PALETTE = ("#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d")
_W, _H, _PAD = 760, 260, 48
_LEFT = 96  # room for the y axis' dollar labels


def _esc(value: object) -> str:
    return html.escape(str(value))


def _bars(
    title: str, days: list[str], series: dict[str, list[Decimal]], *, stacked: bool, chart_id: str
) -> str:
    """A bar chart over ``days``: stacked (one bar per day) or grouped (one bar per series)."""
    names = list(series)
    if not days or not names:
        return f'<figure id="{chart_id}"><figcaption>{_esc(title)}</figcaption><p>No data.</p></figure>'
    if stacked:
        top = max(sum((series[n][i] for n in names), Decimal(0)) for i in range(len(days)))
    else:
        top = max(max(values) for values in series.values())
    top = top or Decimal(1)
    plot_w, plot_h = _W - _LEFT - _PAD, _H - 2 * _PAD
    slot = plot_w / len(days)
    bar_w = slot * (0.7 if stacked else 0.7 / len(names))
    parts = [
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_esc(title)}">',
        f'<line x1="{_LEFT}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<line x1="{_LEFT}" y1="{_PAD}" x2="{_LEFT}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<text x="{_LEFT - 6}" y="{_PAD + 4}" text-anchor="end" font-size="11">{format_usd(top)}</text>',
        f'<text x="{_LEFT - 6}" y="{_H - _PAD}" text-anchor="end" font-size="11">{format_usd(0)}</text>',
    ]
    for i, day in enumerate(days):
        x0 = _LEFT + i * slot + slot * 0.15
        base = 0.0
        for j, name in enumerate(names):
            value = series[name][i]
            height = float(value / top) * plot_h
            x = x0 if stacked else x0 + j * bar_w
            y = _H - _PAD - height - (base if stacked else 0)
            colour = _PALETTE[j % len(_PALETTE)]
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{colour}"><title>{_esc(day)} {_esc(name)}: {format_usd(value)}</title></rect>'
            )
            if stacked:
                base += height
        parts.append(
            f'<text x="{x0 + slot * 0.35:.1f}" y="{_H - _PAD + 16}" text-anchor="middle" font-size="11">{_esc(day)}</text>'
        )
    legend_x = _LEFT
    for j, name in enumerate(names):
        colour = _PALETTE[j % len(_PALETTE)]
        parts.append(f'<rect x="{legend_x}" y="12" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 16}" y="22" font-size="12">{_esc(name)}</text>')
        legend_x += 24 + 8 * len(name)
    parts.append("</svg>")
    return (
        f'<figure id="{chart_id}"><figcaption>{_esc(title)}</figcaption>{"".join(parts)}</figure>'
    )


def render_html(report: Report) -> str:
    days = sorted(report.cost_by_day_model)
    models = sorted({m for per_day in report.cost_by_day_model.values() for m in per_day})
    cost_series = {
        m: [report.cost_by_day_model[d].get(m, Decimal(0)) for d in days] for m in models
    }
    saving_days = sorted(report.savings_by_day)
    saving_series = {
        kind: [report.savings_by_day[d][kind] for d in saving_days] for kind in ("cache", "routing")
    }
    t = report.totals
    cards = [
        ("Calls", t.calls),
        ("Spent", format_usd(t.cost_usd)),
        ("Saved by cache", format_usd(t.saved_cache_usd)),
        ("Saved by routing", format_usd(t.saved_routing_usd)),
        ("Cache hit rate", f"{report.cache_hit_rate:.1%}"),
        ("Retries", report.retries),
        ("Rate-limit queueing, summed over calls", f"{report.rate_wait_s}s"),
        ("Errors", t.errors),
        ("Budget alerts", len(report.budget_alerts)),
    ]
    rows = "".join(
        f"<tr><td>{_esc(name)}</td><td>{r.calls}</td><td>{format_usd(r.cost_usd)}</td>"
        f"<td>{format_usd(r.saved_cache_usd)}</td><td>{format_usd(r.saved_routing_usd)}</td>"
        f"<td>{r.cache_hits}</td><td>{r.errors}</td></tr>"
        for name, r in sorted(report.groups.items(), key=lambda item: -item[1].cost_usd)
    )
    errors = "".join(
        f"<tr><td>{_esc(k)}</td><td>{v}</td></tr>" for k, v in sorted(report.errors_by_type.items())
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmguard report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #111; background: #fff; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .75rem; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: .6rem 1rem; min-width: 9rem; }}
.card b {{ display: block; font-size: 1.3rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
</style></head><body>
<h1>llmguard report</h1>
<div class="cards">{"".join(f'<div class="card">{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in cards)}</div>
{_bars("Cost per day, by model", days, cost_series, stacked=True, chart_id="cost-chart")}
{_bars("Saved per day: cache and routing", saving_days, saving_series, stacked=False, chart_id="savings-chart")}
<h2>By {_esc(report.by)}</h2>
<table><tr><th>{_esc(report.by)}</th><th>calls</th><th>spent</th><th>saved (cache)</th><th>saved (routing)</th><th>cache hits</th><th>errors</th></tr>{rows}</table>
<h2>Errors by type</h2>
<table><tr><th>error</th><th>calls</th></tr>{errors or '<tr><td colspan="2">none</td></tr>'}</table>
</body></html>
"""

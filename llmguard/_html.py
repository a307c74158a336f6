"""The report as one self-contained HTML file: inline SVG charts, no network, no CDN.

Time charts use the report's buckets (sized to the log's span: seconds for a demo, hours
for a day, days for a month). Every bar and point has a ``<title>`` with its exact value.
"""

from __future__ import annotations

import html
import math
from array import array
from collections.abc import Callable, Sequence
from decimal import Decimal

from ._money import format_usd
from ._report import Bucket, Report, Row, percentiles

_PALETTE = ("#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d")
CALLS_COLOUR = "#0f766e"  # the calls chart's bars: a colour no other chart uses
LIMIT_COLOUR = "#b91c1c"
_W, _H, _PAD = 760, 260, 48
_LEFT = 96  # room for the y axis' labels
_MAX_LABELS = 10  # x-axis labels per chart, at most
_MAX_ROWS = 30  # rows per table, the most expensive first
_MAX_KEYS = 6  # keys drawn per budget chart, the biggest spenders
_BINS = 20
_MARKS = ("#1d4ed8", "#7c3aed", "#c2410c")  # p50, p95, p99 lines


def _esc(value: object) -> str:
    return html.escape(str(value))


def _empty(chart_id: str, title: str, why: str = "No data.") -> str:
    return (
        f'<figure id="{chart_id}"><figcaption>{_esc(title)}</figcaption><p>{_esc(why)}</p></figure>'
    )


def _frame(title: str, top_text: str, labels: Sequence[str], slot: float) -> list[str]:
    """The axes, the top value and the x labels (every n-th, so that they do not overlap)."""
    parts = [
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_esc(title)}">',
        f'<line x1="{_LEFT}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<line x1="{_LEFT}" y1="{_PAD}" x2="{_LEFT}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<text x="{_LEFT - 6}" y="{_PAD + 4}" text-anchor="end" font-size="11">{_esc(top_text)}</text>',
        f'<text x="{_LEFT - 6}" y="{_H - _PAD}" text-anchor="end" font-size="11">0</text>',
    ]
    every = max(math.ceil(len(labels) / _MAX_LABELS), 1)
    for i, label in enumerate(labels):
        if i % every == 0:
            x = _LEFT + (i + 0.5) * slot
            parts.append(
                f'<text x="{x:.1f}" y="{_H - _PAD + 16}" text-anchor="middle" font-size="11">{_esc(label)}</text>'
            )
    return parts


def _legend(names: Sequence[str], colours: Sequence[str]) -> list[str]:
    parts, x = [], _LEFT
    for name, colour in zip(names, colours, strict=True):
        parts.append(f'<rect x="{x}" y="12" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{x + 16}" y="22" font-size="12">{_esc(name)}</text>')
        x += 24 + 8 * len(name)
    return parts


def _bars(
    title: str,
    labels: Sequence[str],
    series: dict[str, list[Decimal]],
    *,
    stacked: bool,
    chart_id: str,
    show: Callable[[Decimal], str] = format_usd,
    colours: Sequence[str] = _PALETTE,
    legend: bool = True,
    attrs: str = "",
) -> str:
    """A bar chart, one slot per label: stacked (one bar per slot) or grouped (one bar per
    series). A zero draws nothing; any other value at least 2 pixels."""
    names = list(series)
    if not labels or not names:
        return _empty(chart_id, title)
    if stacked:
        top = max(sum((series[n][i] for n in names), Decimal(0)) for i in range(len(labels)))
    else:
        top = max(max(values) for values in series.values())
    top = top or Decimal(1)
    plot_w, plot_h = _W - _LEFT - _PAD, _H - 2 * _PAD
    slot = plot_w / len(labels)
    bar_w = slot * (0.7 if stacked else 0.7 / len(names))
    parts = _frame(title, show(top), labels, slot)
    palette = [colours[j % len(colours)] for j in range(len(names))]
    for i, label in enumerate(labels):
        x0 = _LEFT + i * slot + slot * 0.15
        base = 0.0
        for j, name in enumerate(names):
            value = series[name][i]
            if not value:
                continue
            height = max(float(value / top) * plot_h, 2.0)
            x = x0 if stacked else x0 + j * bar_w
            y = _H - _PAD - height - (base if stacked else 0)
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{palette[j]}"><title>{_esc(label)} {_esc(name)}: {_esc(show(value))}</title></rect>'
            )
            if stacked:
                base += height
    if legend:
        parts += _legend(names, palette)
    parts.append("</svg>")
    return f'<figure id="{chart_id}"{attrs}><figcaption>{_esc(title)}</figcaption>{"".join(parts)}</figure>'


def _budget_chart(
    title: str,
    labels: Sequence[str],
    series: dict[str, list[Decimal | None]],
    limit: Decimal | None,
    chart_id: str,
) -> str:
    """Spend in the budget's window over time, one line per key, against the limit."""
    values = [v for points in series.values() for v in points if v is not None]
    if not labels or not values:
        return _empty(chart_id, title)
    top = max([*values, limit or Decimal(0)]) * Decimal("1.1") or Decimal(1)
    plot_w, plot_h = _W - _LEFT - _PAD, _H - 2 * _PAD
    slot = plot_w / len(labels)
    parts = _frame(title, format_usd(top.quantize(Decimal("0.0001"))), labels, slot)

    def y_of(value: Decimal) -> float:
        return _H - _PAD - float(value / top) * plot_h

    if limit is not None:
        y = y_of(limit)
        parts.append(
            f'<line class="limit" x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _PAD}" y2="{y:.1f}" '
            f'stroke="{LIMIT_COLOUR}" stroke-width="2" stroke-dasharray="6 4"/>'
            f'<text x="{_W - _PAD}" y="{y - 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="{LIMIT_COLOUR}">limit {_esc(format_usd(limit))}</text>'
        )
    names = list(series)
    palette = [_PALETTE[j % len(_PALETTE)] for j in range(len(names))]
    for name, colour in zip(names, palette, strict=True):
        points = [
            (_LEFT + (i + 0.5) * slot, y_of(v), labels[i], v)
            for i, v in enumerate(series[name])
            if v is not None
        ]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
        parts.append(
            f'<polyline class="spend" points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        parts += [
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>{_esc(label)} '
            f"{_esc(name)}: {_esc(format_usd(v))} spent in its window</title></circle>"
            for x, y, label, v in points
        ]
    parts += _legend(names, palette)
    parts.append("</svg>")
    return f'<figure id="{chart_id}" class="budget-chart"><figcaption>{_esc(title)}</figcaption>{"".join(parts)}</figure>'


def _histogram(
    title: str, values: array[float], chart_id: str, show: Callable[[float], str]
) -> str:
    """How many calls fall in each of _BINS bins from 0 to p99 (the rest in a last "more"
    bin), with the p50, p95 and p99 marked."""
    spread = percentiles(values)
    if not values:
        return _empty(chart_id, title)
    marks = {p: float(spread[p]) for p in ("p50", "p95", "p99")}
    edge = marks["p99"] or max(values) or 1.0
    counts = [0] * (_BINS + 1)
    for value in values:
        counts[min(int(value / edge * _BINS), _BINS - 1) if value <= edge else _BINS] += 1
    labels = [show(float(f"{edge * (i + 1) / _BINS:.3g}")) for i in range(_BINS)] + ["more"]
    top = max(counts) or 1
    plot_w, plot_h = _W - _LEFT - _PAD, _H - 2 * _PAD
    slot = plot_w / len(labels)
    parts = _frame(title, f"{top} calls", labels, slot)
    for i, count in enumerate(counts):
        if not count:
            continue
        height = max(count / top * plot_h, 2.0)
        low = show(float(f"{edge * i / _BINS:.3g}"))
        high = show(float(f"{edge * (i + 1) / _BINS:.3g}")) if i < _BINS else "more"
        parts.append(
            f'<rect class="hist" x="{_LEFT + i * slot + 1:.1f}" y="{_H - _PAD - height:.1f}" '
            f'width="{slot - 2:.1f}" height="{height:.1f}" fill="#94a3b8"><title>{_esc(low)} to '
            f"{_esc(high)}: {count} calls</title></rect>"
        )
    for j, (point, value) in enumerate(marks.items()):
        x = _LEFT + min(value / edge, 1.0) * _BINS * slot
        parts.append(
            f'<line x1="{x:.1f}" y1="{_PAD}" x2="{x:.1f}" y2="{_H - _PAD}" stroke="{_MARKS[j]}" '
            f'stroke-width="2"/><text x="{x + 3:.1f}" y="{_PAD + 12 + 12 * j}" font-size="11" '
            f'fill="{_MARKS[j]}">{point} {_esc(show(value))}</text>'
        )
    parts.append("</svg>")
    return (
        f'<figure id="{chart_id}"><figcaption>{_esc(title)}</figcaption>{"".join(parts)}</figure>'
    )


def _table(title: str, column: str, groups: dict[str, Row], table_id: str) -> str:
    ordered = sorted(groups.items(), key=lambda item: (-item[1].cost_usd, item[0]))
    rows = "".join(
        f"<tr><td>{_esc(name)}</td><td>{r.calls}</td><td>{format_usd(r.cost_usd)}</td>"
        f"<td>{format_usd(r.saved_cache_usd)}</td><td>{format_usd(r.saved_routing_usd)}</td>"
        f"<td>{r.cache_hits}</td><td>{r.errors}</td></tr>"
        for name, r in ordered[:_MAX_ROWS]
    )
    if len(ordered) > _MAX_ROWS:
        rest = ordered[_MAX_ROWS:]
        rows += (
            f'<tr class="more"><td>{len(rest)} more</td><td>{sum(r.calls for _, r in rest)}</td>'
            f"<td>{format_usd(sum((r.cost_usd for _, r in rest), Decimal(0)))}</td>"
            '<td colspan="4">(llmguard report --format csv lists them all)</td></tr>'
        )
    return (
        f'<h2>{_esc(title)}</h2><table id="{table_id}"><tr><th>{_esc(column)}</th><th>calls</th>'
        "<th>spent</th><th>saved (cache)</th><th>saved (routing)</th><th>cache hits</th>"
        f"<th>errors</th></tr>{rows}</table>"
    )


def _ms(value: float) -> str:
    return f"{value:.4g} ms"


def _usd(value: float) -> str:
    return format_usd(Decimal(repr(value)))


def render_html(report: Report) -> str:
    timeline = report.timeline
    slots = timeline.slots()
    labels = [timeline.label(start) for start, _ in slots]
    buckets = [bucket or Bucket() for _, bucket in slots]
    step = timeline.step_text()
    models = sorted({m for b in buckets for m in b.cost_by_model})
    cost_series = {m: [b.cost_by_model.get(m, Decimal(0)) for b in buckets] for m in models}
    calls_series = {"calls": [Decimal(b.calls) for b in buckets]}
    saving_series = {
        "cache": [b.saved_cache_usd for b in buckets],
        "routing": [b.saved_routing_usd for b in buckets],
    }
    t = report.totals
    spread = report.distribution()
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
        ("Spend-rate alerts", len(report.burn_alerts)),
    ]
    span = (
        f"{len(slots)} buckets of {step} from {slots[0][0].isoformat()} (UTC)"
        if slots
        else "no timestamped calls"
    )
    if report.untimed_calls:
        span += f"; {report.untimed_calls} calls without a timestamp are in the totals only"
    attrs = (
        f' data-step-s="{timeline.step}" data-buckets="{len(slots)}"'
        f' data-first="{slots[0][0].isoformat() if slots else ""}"'
    )
    charts = [
        _bars(
            f"Cost per {step}, by model",
            labels,
            cost_series,
            stacked=True,
            chart_id="cost-chart",
            attrs=attrs,
        ),
        _bars(
            f"Calls per {step}",
            labels,
            calls_series,
            stacked=False,
            chart_id="calls-chart",
            show=lambda v: f"{v} calls",
            colours=(CALLS_COLOUR,),
            legend=False,
            attrs=attrs,
        ),
        _bars(
            f"Saved per {step}: cache and routing",
            labels,
            saving_series,
            stacked=False,
            chart_id="savings-chart",
            attrs=attrs,
        ),
    ]
    budget_parts = []
    names = sorted({name for name, _ in report.budgets})
    for number, name in enumerate(names):
        keys = sorted(
            (key for n, key in report.budgets if n == name),
            key=lambda k: (-report.budgets[(name, k)].max_spent_usd, k or ""),
        )
        limits = [report.budgets[(name, k)].limit_usd for k in keys]
        limit = next((x for x in limits if x is not None), None)
        shown = keys[:_MAX_KEYS]
        series = {
            ("(no key)" if key is None else key): [
                (b.budget_spent.get((name, key)) or (None, None))[1] for b in buckets
            ]
            for key in shown
        }
        more = (
            f" ({len(keys) - len(shown)} smaller keys not drawn)" if len(keys) > len(shown) else ""
        )
        title = f"Budget {name}: spend in its window vs its limit" + (
            f" {format_usd(limit)}" if limit is not None else " (limit not in the log)"
        )
        budget_parts.append(
            _budget_chart(title + more, labels, series, limit, f"budget-chart-{number}")
        )
        budget_rows = "".join(
            f"<tr><td>{_esc('-' if key is None else key)}</td>"
            f"<td>{format_usd(report.budgets[(name, key)].spent_usd)}</td>"
            f"<td>{'?' if report.budgets[(name, key)].limit_usd is None else format_usd(report.budgets[(name, key)].limit_usd)}</td>"
            f"<td>{report.budgets[(name, key)].alerts}</td><td>{report.budgets[(name, key)].burn_alerts}</td></tr>"
            for key in keys[:_MAX_ROWS]
        )
        budget_parts.append(
            f'<table class="budget-table"><tr><th>key</th><th>spent (latest)</th><th>limit</th>'
            f"<th>alerts</th><th>spend-rate alerts</th></tr>{budget_rows}</table>"
        )
    spread_rows = "".join(
        f"<tr><td>{what}</td><td>{values['calls']}</td>"
        + "".join(
            f"<td>{_esc(show(float(values[p]))) if p in values else '-'}</td>"
            for p in ("p50", "p95", "p99", "max")
        )
        + "</tr>"
        for what, values, show in (
            ("cost per call", spread["cost_usd"], _usd),
            ("latency", spread["latency_ms"], _ms),
        )
    )
    tables = [_table(f"By {report.by}", report.by, report.groups, "by-table")]
    if report.by_key and report.by != "key":
        tables.append(_table("By tenant (budget key)", "key", report.by_key, "by-key-table"))
    for tag, groups in sorted(report.by_tag.items()):
        if report.by != f"tag:{tag}":
            tables.append(_table(f"By tag {tag}", tag, groups, f"by-tag-{tag}-table"))
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
.span {{ color: #555; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
</style></head><body>
<h1>llmguard report</h1>
<p class="span">{_esc(span)}</p>
<div class="cards">{"".join(f'<div class="card">{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in cards)}</div>
{"".join(charts)}
<h2>Budgets</h2>
{"".join(budget_parts) or "<p>No budgeted calls in this log.</p>"}
<h2>Cost and latency per call</h2>
<table id="spread-table"><tr><th></th><th>calls</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>{spread_rows}</table>
{_histogram("Cost per call", report.costs, "cost-histogram", _usd)}
{_histogram("Latency per call", report.latencies, "latency-histogram", _ms)}
{"".join(tables)}
<h2>Errors by type</h2>
<table><tr><th>error</th><th>calls</th></tr>{errors or '<tr><td colspan="2">none</td></tr>'}</table>
</body></html>
"""

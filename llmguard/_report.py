"""``llmguard report``: the bill, read back from llmguard's own events.

Reads JSON lines (plain or gzipped, one file or several); lines that are not llmguard
events are skipped and counted, never a crash. Every number is a sum over the events it
came from, in exact decimals.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from ._money import decimal_text, format_usd
from ._prices import calc_cost

DIMENSIONS = ("function", "model", "day", "budget", "route")
_ZERO = Decimal(0)


def _money(value: Any) -> Decimal:
    if value is None or isinstance(value, bool):
        return _ZERO
    try:
        return Decimal(str(value))
    except Exception:
        return _ZERO


@dataclass
class Row:
    """Totals for one group of calls."""

    calls: int = 0
    cost_usd: Decimal = _ZERO
    saved_cache_usd: Decimal = _ZERO
    saved_routing_usd: Decimal = _ZERO
    cache_hits: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, event: dict[str, Any], routing_saving: Decimal) -> None:
        self.calls += 1
        self.cost_usd += _money(event.get("cost_usd"))
        if event.get("cache") in ("hit", "stale"):
            self.cache_hits += 1
            self.saved_cache_usd += _money(event.get("saved_usd"))
        self.saved_routing_usd += routing_saving
        if event.get("outcome") == "error":
            self.errors += 1
        self.input_tokens += int(event.get("input_tokens") or 0)
        self.output_tokens += int(event.get("output_tokens") or 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "cost_usd": decimal_text(self.cost_usd),
            "saved_cache_usd": decimal_text(self.saved_cache_usd),
            "saved_routing_usd": decimal_text(self.saved_routing_usd),
            "cache_hits": self.cache_hits,
            "errors": self.errors,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass
class Report:
    """What a set of event logs adds up to."""

    by: str
    totals: Row = field(default_factory=Row)
    groups: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    cost_by_day_model: dict[str, dict[str, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Decimal))
    )
    savings_by_day: dict[str, dict[str, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: {"cache": _ZERO, "routing": _ZERO})
    )
    cache_lookups: int = 0
    retries: int = 0
    rate_wait_s: Decimal = _ZERO
    retry_wait_s: Decimal = _ZERO
    errors_by_type: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    budget_alerts: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.totals.cache_hits / self.cache_lookups if self.cache_lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "totals": {
                **self.totals.as_dict(),
                "cache_hit_rate": round(self.cache_hit_rate, 4),
                "retries": self.retries,
                "retry_wait_s": str(self.retry_wait_s),
                "rate_wait_s": str(self.rate_wait_s),
                "errors_by_type": dict(self.errors_by_type),
                "budget_alerts": len(self.budget_alerts),
                "skipped_lines": self.skipped_lines,
            },
            "by": self.by,
            "groups": {name: row.as_dict() for name, row in sorted(self.groups.items())},
        }


def _open(path: str) -> tuple[TextIO, Any, int]:
    """(text stream, underlying binary file or None, size in bytes or 0)."""
    if path == "-":
        return sys.stdin, None, 0
    raw = Path(path).open("rb")  # noqa: SIM115 - closed by read_events
    size = os.fstat(raw.fileno()).st_size
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return (
            io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", errors="replace"),
            raw,
            size,
        )
    raw.seek(0)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), raw, size


def read_events(
    paths: Iterable[str],
    counter: list[int] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """llmguard's events from JSON-line files; ``counter[0]`` counts the other lines;
    ``progress(path, fraction)`` is told how far into a file reading is."""
    for path in paths:
        stream, raw, size = _open(path)
        try:
            for number, line in enumerate(stream):
                if progress is not None and raw is not None and size and number % 20000 == 0:
                    progress(path, min(raw.tell() / size, 1.0))
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict) and event.get("event") in (
                    "llm_call",
                    "llm_retry",
                    "budget_alert",
                ):
                    yield event
                elif counter is not None:
                    counter[0] += 1
            if progress is not None and raw is not None and size:
                progress(path, 1.0)
        finally:
            if stream is not sys.stdin:
                stream.close()
            if raw is not None:
                raw.close()  # a GzipFile does not close the file it reads


def _timestamp(event: dict[str, Any]) -> datetime | None:
    value = event.get("timestamp")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def routing_saving(event: dict[str, Any]) -> Decimal:
    """What a routed call would have cost on the default model, minus what it cost."""
    default = event.get("route_default")
    if not default or event.get("cost_usd") is None or event.get("input_tokens") is None:
        return _ZERO
    would = calc_cost(
        default,
        int(event.get("input_tokens") or 0),
        int(event.get("output_tokens") or 0),
        int(event.get("cached_input_tokens") or 0),
        int(event.get("cache_write_tokens") or 0),
    )
    return max((would or _ZERO) - _money(event.get("cost_usd")), _ZERO)


def build(
    events: Iterable[dict[str, Any]], *, by: str = "function", since: timedelta | None = None
) -> Report:
    """Aggregate events into a report, grouped ``by`` one of :data:`DIMENSIONS`."""
    report = Report(by=by)
    cutoff = None if since is None else datetime.now(timezone.utc) - since
    for event in events:
        at = _timestamp(event)
        if cutoff is not None and (at is None or at < cutoff):
            continue
        kind = event.get("event")
        if kind == "llm_retry":
            report.retries += 1
            continue
        if kind == "budget_alert":
            report.budget_alerts.append(event)
            continue
        day = at.date().isoformat() if at else "unknown"
        saving = routing_saving(event)
        report.totals.add(event, saving)
        if event.get("cache"):
            report.cache_lookups += 1
        if event.get("outcome") == "error":
            report.errors_by_type[str(event.get("error"))] += 1
        report.rate_wait_s += _money(event.get("rate_wait_s"))
        report.retry_wait_s += _money(event.get("retry_wait_s"))
        group = day if by == "day" else str(event.get(by) or "-")
        report.groups[group].add(event, saving)
        report.cost_by_day_model[day][str(event.get("model") or "-")] += _money(
            event.get("cost_usd")
        )
        if event.get("cache") in ("hit", "stale"):
            report.savings_by_day[day]["cache"] += _money(event.get("saved_usd"))
        report.savings_by_day[day]["routing"] += saving
    return report


def render_table(report: Report) -> str:
    t = report.totals
    lines = [
        f"calls            {t.calls}",
        f"spent            {format_usd(t.cost_usd)}",
        f"saved by cache   {format_usd(t.saved_cache_usd)}  (hit rate {report.cache_hit_rate:.1%})",
        f"saved by routing {format_usd(t.saved_routing_usd)}",
        f"retries          {report.retries}  ({report.retry_wait_s}s waiting)",
        f"rate-limit queue {report.rate_wait_s}s  (summed over calls: concurrent waits add up)",
        f"errors           {t.errors}"
        + (
            ""
            if not report.errors_by_type
            else f"  ({', '.join(f'{k}: {v}' for k, v in sorted(report.errors_by_type.items()))})"
        ),
        f"budget alerts    {len(report.budget_alerts)}",
    ]
    if report.skipped_lines:
        lines.append(f"skipped lines    {report.skipped_lines} (not llmguard events)")
    header = (report.by, "calls", "spent", "saved (cache)", "saved (routing)", "hits", "errors")
    rows = [header] + [
        (
            name,
            str(r.calls),
            format_usd(r.cost_usd),
            format_usd(r.saved_cache_usd),
            format_usd(r.saved_routing_usd),
            str(r.cache_hits),
            str(r.errors),
        )
        for name, r in sorted(report.groups.items(), key=lambda item: -item[1].cost_usd)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def render_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    fields = list(Row().as_dict())
    writer.writerow([report.by, *fields])
    for name, row in sorted(report.groups.items()):
        values = row.as_dict()
        writer.writerow([name, *(values[f] for f in fields)])
    return out.getvalue()

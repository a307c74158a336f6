"""``llmguard report``: the bill, read back from llmguard's own events.

Reads JSON lines (plain or gzipped, one file or several); lines that are not llmguard
events, and events with a malformed field (a count that is not a whole number >= 0, a cost
that is not a finite amount, a list where a name belongs...), are skipped and counted, never
a crash. A file that ends early (a truncated gzip) gives what was read before, and says
where it stopped. Every number is a sum over the events it came from, in exact decimals.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from ._money import decimal_text, format_usd
from ._prices import calc_cost

DIMENSIONS = ("function", "model", "day", "budget", "route")
_ZERO = Decimal(0)
_TEXT_FIELDS = ("function", "model", "budget", "route", "route_default", "cache", "outcome")
_COUNT_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens")
_AMOUNT_FIELDS = ("cost_usd", "saved_usd", "rate_wait_s", "retry_wait_s")
_MAX_COUNT = 10**15  # tokens in one call: far beyond any model
_MAX_AMOUNT = Decimal(10**12)  # USD or seconds for one call


class Malformed(ValueError):
    """An event with a field of the wrong kind: skipped and counted, never summed."""


def _count(value: Any) -> int:
    count: int
    if value is None:
        return 0
    if isinstance(value, bool):
        raise Malformed("a count that is a bool")
    if isinstance(value, float):
        if not value.is_integer():
            raise Malformed("a count that is not whole")
        count = int(value)
    elif isinstance(value, (str, int)):
        count = int(value)  # ValueError for "abc"
    else:
        raise Malformed(f"a count that is a {type(value).__name__}")
    if not 0 <= count <= _MAX_COUNT:
        raise Malformed("a count out of range")
    return count


def _amount(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Malformed(f"an amount that is a {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Malformed("an amount that is not finite")
    amount = Decimal(str(value))  # InvalidOperation (an ArithmeticError) for "abc"
    if not amount.is_finite() or not 0 <= amount <= _MAX_AMOUNT:
        raise Malformed("an amount out of range")
    return amount


def clean(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its counts as ints and its amounts as Decimals; Malformed (a
    ValueError) if a field is not what llmguard writes there."""
    out = dict(event)
    for name in _TEXT_FIELDS:
        if out.get(name) is not None and not isinstance(out[name], str):
            raise Malformed(f"{name} is a {type(out[name]).__name__}")
    for name in _COUNT_FIELDS:
        if name in out:
            out[name] = _count(out[name])
    for name in _AMOUNT_FIELDS:
        if name in out:
            out[name] = _amount(out[name])
    if out.get("error") is not None and not isinstance(out["error"], str):
        out["error"] = str(out["error"])[:200]
    return out


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
    stopped: list[str] = field(default_factory=list)  # files that could not be read to the end

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
                "incomplete_files": list(self.stopped),
            },
            "by": self.by,
            "groups": {name: row.as_dict() for name, row in sorted(self.groups.items())},
        }


def _open(path: str) -> tuple[Any, Any, int]:
    """(stream of lines as bytes, or as text for a text-only standard input; underlying
    binary file or None; size in bytes or 0)."""
    if path == "-":
        return getattr(sys.stdin, "buffer", sys.stdin), None, 0
    raw = Path(path).open("rb")  # noqa: SIM115 - closed by read_events
    size = os.fstat(raw.fileno()).st_size
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw), raw, size
    raw.seek(0)
    return raw, raw, size


_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def read_events(
    paths: Iterable[str],
    counter: list[int] | None = None,
    progress: Callable[[str, float], None] | None = None,
    stopped: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """llmguard's events from JSON-line files; ``counter[0]`` counts the other lines;
    ``progress(path, fraction)`` is told how far into a file reading is. A file that cannot
    be read to its end (truncated gzip, unreadable) gives the events read before, and a
    line in ``stopped`` saying where it stopped (an OSError if ``stopped`` is None)."""
    for path in paths:
        number = 0
        stream = raw = None
        try:
            stream, raw, size = _open(path)
            for number, line in enumerate(stream, 1):
                if progress is not None and raw is not None and size and number % 20000 == 1:
                    progress(path, min(raw.tell() / size, 1.0))
                if isinstance(line, bytes):
                    line = line.decode("utf-8", "replace")
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
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
        except _READ_ERRORS as exc:
            if stopped is None:
                raise
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = f"after line {number}" if number else "before its first line"
            stopped.append(f"{path}: stopped {where}: {reason or type(exc).__name__}")
        finally:
            if stream is not None and stream is not raw and path != "-":
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
    for found in events:
        try:
            event = clean(found)
        except (ValueError, ArithmeticError):  # Malformed, int("abc"), Decimal("abc")
            report.skipped_lines += 1
            continue
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
        lines.append(f"skipped lines    {report.skipped_lines} (not llmguard events, or malformed)")
    lines += [f"incomplete       {note}" for note in report.stopped]
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

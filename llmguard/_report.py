"""``llmguard report``: the bill, read back from llmguard's own events.

Reads JSON lines (plain or gzipped, one file or several); lines that are not llmguard
events, and events with a malformed field (a count that is not a whole number >= 0, a cost
that is not a finite amount, a list where a name belongs...), are skipped and counted, never
a crash. A file that ends early (a truncated gzip) gives what was read before, and says
where it stopped. Every number is a sum over the events it came from, in exact decimals,
except the percentiles, each of which is one event's value (nearest rank).

Breakdowns: by function, model, day, budget, route, budget key (``key``: the tenant) or a
tag (``tag:feature``). Over time, calls are put in buckets sized to the log's span (seconds
for a demo, minutes or hours for a day, days for a month): at most ``MAX_BUCKETS`` of them.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import sys
import zlib
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from ._money import decimal_text, format_usd
from ._prices import calc_cost

DIMENSIONS = ("function", "model", "day", "budget", "route", "key")
"""The fixed breakdowns; ``tag:<name>`` (any tag name) is one too."""
EVENTS = ("llm_call", "llm_retry", "budget_alert", "budget_burn_alert")
MAX_BUCKETS = 40
# Bucket sizes in seconds, each a multiple of the one before (so buckets merge exactly into
# the next size up): 1s 5s 10s 30s, 1m 5m 10m 30m, 1h 3h 6h 12h, 1d, 7d, 28d, 364d, 1820d.
STEPS = (
    *(1, 5, 10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200, 86400),
    *(7 * 86400, 28 * 86400, 364 * 86400, 1820 * 86400),
)
_TAG_DIMENSION = re.compile(r"tag:([A-Za-z_][A-Za-z0-9_]*)")
_ZERO = Decimal(0)
_TEXT_FIELDS = (
    "function",
    "model",
    "budget",
    "budget_key",
    "route",
    "route_default",
    "cache",
    "outcome",
)
_COUNT_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens")
_AMOUNT_FIELDS = (
    "cost_usd",
    "saved_usd",
    "rate_wait_s",
    "retry_wait_s",
    "latency_ms",
    "budget_spent_usd",
    "budget_limit_usd",
    "limit_usd",
)
_MAX_COUNT = 10**15  # tokens in one call: far beyond any model
_MAX_AMOUNT = Decimal(10**12)  # USD or seconds for one call


class Malformed(ValueError):
    """An event with a field of the wrong kind: skipped and counted, never summed."""


def check_dimension(by: str) -> str:
    """``by`` if it is a breakdown (one of :data:`DIMENSIONS`, or ``tag:<name>``), else
    ValueError saying which are."""
    if by in DIMENSIONS or _TAG_DIMENSION.fullmatch(by):
        return by
    raise ValueError(
        f"cannot break down by {by!r}: use one of {', '.join(DIMENSIONS)} or tag:<name> "
        "(e.g. tag:feature)"
    )


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
    tags = out.get("tags")
    if tags is not None and not (
        isinstance(tags, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    ):
        raise Malformed("tags is not a dict of names to text")
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


class Timeline:
    """Calls over time in buckets of :attr:`step` seconds (UTC, aligned on the epoch), made
    coarser as the span of the events grows so that there are never more than
    :data:`MAX_BUCKETS`: one pass, whatever the log's length."""

    def __init__(self, max_buckets: int = MAX_BUCKETS) -> None:
        self.max_buckets = max_buckets
        self.level = 0
        self.buckets: dict[int, Bucket] = {}
        self.first: int | None = None
        self.last: int | None = None

    @property
    def step(self) -> int:
        return STEPS[self.level]

    def bucket(self, at: datetime) -> Bucket:
        """The bucket ``at`` falls in (made coarser first if it widens the span too far)."""
        second = math.floor(at.timestamp())
        while True:
            index = second // self.step
            first = index if self.first is None else min(self.first, index)
            last = index if self.last is None else max(self.last, index)
            if last - first < self.max_buckets or self.level == len(STEPS) - 1:
                break
            self._coarsen()
        self.first, self.last = first, last
        found = self.buckets.get(index)
        if found is None:
            found = self.buckets[index] = Bucket()
        return found

    def _coarsen(self) -> None:
        old = self.step
        self.level += 1
        factor = self.step // old
        merged: dict[int, Bucket] = {}
        for index, bucket in self.buckets.items():
            target = merged.get(index // factor)
            if target is None:
                merged[index // factor] = bucket
            else:
                target.merge(bucket)
        self.buckets = merged
        if self.first is not None and self.last is not None:
            self.first, self.last = self.first // factor, self.last // factor

    def slots(self) -> list[tuple[datetime, Bucket | None]]:
        """Every bucket from the first event's to the last one's, empty ones as None."""
        if self.first is None or self.last is None:
            return []
        return [
            (datetime.fromtimestamp(i * self.step, timezone.utc), self.buckets.get(i))
            for i in range(self.first, self.last + 1)
        ]

    def label(self, start: datetime) -> str:
        """A bucket's start as short as its size allows (UTC)."""
        step = self.step
        if step >= 86400:
            return start.strftime("%Y-%m-%d")
        several_days = (
            self.first is not None
            and self.last is not None
            and (self.last - self.first + 1) * step > 86400
        )
        if step < 60:
            return start.strftime("%m-%d %H:%M:%S" if several_days else "%H:%M:%S")
        return start.strftime("%m-%d %H:%M" if several_days else "%H:%M")

    def step_text(self) -> str:
        step = self.step
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if step >= seconds:
                return f"{step // seconds}{unit}"
        return f"{step}s"


@dataclass
class Bucket:
    """What the calls of one time bucket add up to."""

    calls: int = 0
    errors: int = 0
    cost_usd: Decimal = _ZERO
    cost_by_model: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    saved_cache_usd: Decimal = _ZERO
    saved_routing_usd: Decimal = _ZERO
    # the latest budget_spent_usd seen per (budget, key), with when
    budget_spent: dict[tuple[str, str | None], tuple[datetime, Decimal]] = field(
        default_factory=dict
    )

    def merge(self, other: Bucket) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.cost_usd += other.cost_usd
        for model, cost in other.cost_by_model.items():
            self.cost_by_model[model] += cost
        self.saved_cache_usd += other.saved_cache_usd
        self.saved_routing_usd += other.saved_routing_usd
        for budget, seen in other.budget_spent.items():
            mine = self.budget_spent.get(budget)
            if mine is None or seen[0] >= mine[0]:
                self.budget_spent[budget] = seen


@dataclass
class BudgetSeen:
    """One budget (and key) as its events show it."""

    limit_usd: Decimal | None = None
    spent_usd: Decimal = _ZERO  # the latest budget_spent_usd (its window's spend then)
    max_spent_usd: Decimal = _ZERO
    last_at: datetime | None = None
    calls: int = 0
    alerts: int = 0
    burn_alerts: int = 0


def percentiles(values: array[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, Any]:
    """``{"calls": n, "p50": v, ..., "max": v}``, each value one of ``values`` (nearest rank:
    the smallest value with at least p% of the values at or below it); Decimals as decimal
    text of the value as logged."""
    ordered = sorted(values)
    out: dict[str, Any] = {"calls": len(ordered)}
    if not ordered:
        return out
    for point in points:
        rank = max(math.ceil(point / 100 * len(ordered)), 1)
        out[f"p{point}"] = decimal_text(repr(ordered[rank - 1]))
    out["max"] = decimal_text(repr(ordered[-1]))
    return out


@dataclass
class Report:
    """What a set of event logs adds up to."""

    by: str
    totals: Row = field(default_factory=Row)
    groups: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    by_key: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    by_tag: dict[str, dict[str, Row]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Row))
    )
    timeline: Timeline = field(default_factory=Timeline)
    untimed_calls: int = 0  # events without a timestamp: in the totals, not over time
    costs: array[float] = field(default_factory=lambda: array("d"))
    latencies: array[float] = field(default_factory=lambda: array("d"))
    budgets: dict[tuple[str, str | None], BudgetSeen] = field(default_factory=dict)
    cache_lookups: int = 0
    retries: int = 0
    rate_limited: int = 0  # 429s seen: retried, or ending a call
    rate_wait_s: Decimal = _ZERO
    retry_wait_s: Decimal = _ZERO
    errors_by_type: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    budget_alerts: list[dict[str, Any]] = field(default_factory=list)
    burn_alerts: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0
    stopped: list[str] = field(default_factory=list)  # files that could not be read to the end

    @property
    def cache_hit_rate(self) -> float:
        return self.totals.cache_hits / self.cache_lookups if self.cache_lookups else 0.0

    def budget(self, name: str, key: str | None) -> BudgetSeen:
        seen = self.budgets.get((name, key))
        if seen is None:
            seen = self.budgets[(name, key)] = BudgetSeen()
        return seen

    def distribution(self) -> dict[str, dict[str, Any]]:
        """Cost (USD) and latency (ms) per call: p50, p95, p99 and max."""
        return {"cost_usd": percentiles(self.costs), "latency_ms": percentiles(self.latencies)}

    def as_dict(self) -> dict[str, Any]:
        timeline = self.timeline
        return {
            "totals": {
                **self.totals.as_dict(),
                "cache_hit_rate": round(self.cache_hit_rate, 4),
                "retries": self.retries,
                "rate_limited": self.rate_limited,
                "retry_wait_s": str(self.retry_wait_s),
                "rate_wait_s": str(self.rate_wait_s),
                "errors_by_type": dict(self.errors_by_type),
                "budget_alerts": len(self.budget_alerts),
                "budget_burn_alerts": len(self.burn_alerts),
                "skipped_lines": self.skipped_lines,
                "incomplete_files": list(self.stopped),
            },
            "by": self.by,
            "groups": {name: row.as_dict() for name, row in sorted(self.groups.items())},
            "by_key": {name: row.as_dict() for name, row in sorted(self.by_key.items())},
            "by_tag": {
                tag: {value: row.as_dict() for value, row in sorted(rows.items())}
                for tag, rows in sorted(self.by_tag.items())
            },
            "distribution": self.distribution(),
            "budgets": [
                {
                    "budget": name,
                    "key": key,
                    "limit_usd": None if b.limit_usd is None else decimal_text(b.limit_usd),
                    "spent_usd": decimal_text(b.spent_usd),
                    "max_spent_usd": decimal_text(b.max_spent_usd),
                    "last_at": None if b.last_at is None else b.last_at.isoformat(),
                    "calls": b.calls,
                    "alerts": b.alerts,
                    "burn_alerts": b.burn_alerts,
                }
                for (name, key), b in sorted(self.budgets.items(), key=_budget_order)
            ],
            "timeline": {
                "step_s": timeline.step,
                "untimed_calls": self.untimed_calls,
                "buckets": [
                    {
                        "start": start.isoformat(),
                        "calls": bucket.calls,
                        "errors": bucket.errors,
                        "cost_usd": decimal_text(bucket.cost_usd),
                    }
                    for start, bucket in timeline.slots()
                    if bucket is not None
                ],
            },
        }


def _budget_order(item: tuple[tuple[str, str | None], BudgetSeen]) -> tuple[str, str]:
    (name, key), _ = item
    return name, "" if key is None else "=" + key


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
                if isinstance(event, dict) and event.get("event") in EVENTS:
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


def event_time(event: dict[str, Any]) -> datetime | None:
    """When ``event`` was logged (its ISO ``timestamp``, UTC if it names no zone), or None."""
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


def group_of(event: dict[str, Any], by: str, day: str) -> str:
    """The group ``event`` falls in when broken down ``by`` (see :func:`check_dimension`)."""
    if by == "day":
        return day
    if by == "key":
        return str(event.get("budget_key") or "-")
    if by.startswith("tag:"):
        return str((event.get("tags") or {}).get(by[4:]) or "-")
    return str(event.get(by) or "-")


def _alert(report: Report, event: dict[str, Any], at: datetime | None) -> None:
    name = event.get("budget")
    if not isinstance(name, str):
        return
    key = event.get("key")
    seen = report.budget(name, key if isinstance(key, str) else None)
    limit = event.get("limit_usd")
    if isinstance(limit, Decimal) and (seen.last_at is None or at is None or at >= seen.last_at):
        seen.limit_usd = limit
    if event.get("event") == "budget_burn_alert":
        report.burn_alerts.append(event)
        seen.burn_alerts += 1
    else:
        report.budget_alerts.append(event)
        seen.alerts += 1


def _budget_call(report: Report, event: dict[str, Any], at: datetime | None) -> None:
    name = event.get("budget")
    if not isinstance(name, str):
        return
    key = event.get("budget_key")
    seen = report.budget(name, key)
    seen.calls += 1
    spent = event.get("budget_spent_usd")
    limit = event.get("budget_limit_usd")
    latest = seen.last_at is None or (at is not None and at >= seen.last_at)
    if latest and isinstance(limit, Decimal):
        seen.limit_usd = limit
    if isinstance(spent, Decimal):
        seen.max_spent_usd = max(seen.max_spent_usd, spent)
        if latest:
            seen.spent_usd, seen.last_at = spent, at


def build(
    events: Iterable[dict[str, Any]], *, by: str = "function", since: timedelta | None = None
) -> Report:
    """Aggregate events into a report, grouped ``by`` one of :data:`DIMENSIONS` or
    ``tag:<name>``."""
    check_dimension(by)
    report = Report(by=by)
    cutoff = None if since is None else datetime.now(timezone.utc) - since
    for found in events:
        try:
            event = clean(found)
        except (ValueError, ArithmeticError):  # Malformed, int("abc"), Decimal("abc")
            report.skipped_lines += 1
            continue
        at = event_time(event)
        if cutoff is not None and (at is None or at < cutoff):
            continue
        kind = event.get("event")
        if kind == "llm_retry":
            report.retries += 1
            if event.get("status") == 429:
                report.rate_limited += 1
            continue
        if kind in ("budget_alert", "budget_burn_alert"):
            _alert(report, event, at)
            continue
        day = at.date().isoformat() if at else "unknown"
        saving = routing_saving(event)
        report.totals.add(event, saving)
        cost = event.get("cost_usd")
        if event.get("cache"):
            report.cache_lookups += 1
        if event.get("outcome") == "error":
            report.errors_by_type[str(event.get("error"))] += 1
            if event.get("error") == "RateLimitError":
                report.rate_limited += 1
        report.rate_wait_s += _money(event.get("rate_wait_s"))
        report.retry_wait_s += _money(event.get("retry_wait_s"))
        report.groups[group_of(event, by, day)].add(event, saving)
        if event.get("budget_key") is not None:
            report.by_key[event["budget_key"]].add(event, saving)
        for tag, value in (event.get("tags") or {}).items():
            report.by_tag[tag][value].add(event, saving)
        if isinstance(cost, Decimal):
            report.costs.append(float(cost))
        if isinstance(event.get("latency_ms"), Decimal):
            report.latencies.append(float(event["latency_ms"]))
        if event.get("budget") is not None:
            _budget_call(report, event, at)
        if at is None:
            report.untimed_calls += 1
            continue
        bucket = report.timeline.bucket(at)
        bucket.calls += 1
        bucket.errors += event.get("outcome") == "error"
        bucket.cost_usd += _money(cost)
        bucket.cost_by_model[str(event.get("model") or "-")] += _money(cost)
        if event.get("cache") in ("hit", "stale"):
            bucket.saved_cache_usd += _money(event.get("saved_usd"))
        bucket.saved_routing_usd += saving
        spent = event.get("budget_spent_usd")
        if event.get("budget") is not None and isinstance(spent, Decimal):
            budget_id = (str(event["budget"]), event.get("budget_key"))
            before = bucket.budget_spent.get(budget_id)
            if before is None or at >= before[0]:
                bucket.budget_spent[budget_id] = (at, spent)
    return report


def _rows_text(by: str, groups: dict[str, Row]) -> list[str]:
    header = (by, "calls", "spent", "saved (cache)", "saved (routing)", "hits", "errors")
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
        for name, r in sorted(groups.items(), key=lambda item: (-item[1].cost_usd, item[0]))
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _spread(values: dict[str, Any], money: bool) -> str:
    if not values.get("calls"):
        return "-"
    shown = [
        f"{point} {format_usd(values[point]) if money else values[point] + ' ms'}"
        for point in ("p50", "p95", "p99", "max")
    ]
    return "  ".join(shown)


def render_table(report: Report) -> str:
    t = report.totals
    spread = report.distribution()
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
        f"budget alerts    {len(report.budget_alerts)}"
        + (f"  (+ {len(report.burn_alerts)} spend-rate)" if report.burn_alerts else ""),
        f"cost per call    {_spread(spread['cost_usd'], money=True)}",
        f"latency          {_spread(spread['latency_ms'], money=False)}",
    ]
    if report.skipped_lines:
        lines.append(f"skipped lines    {report.skipped_lines} (not llmguard events, or malformed)")
    lines += [f"incomplete       {note}" for note in report.stopped]
    for (name, key), seen in sorted(report.budgets.items(), key=_budget_order):
        limit = "?" if seen.limit_usd is None else format_usd(seen.limit_usd)
        who = name if key is None else f"{name} [{key}]"
        lines.append(f"budget           {who}: {format_usd(seen.spent_usd)} of {limit} (latest)")
    lines.append("")
    lines += _rows_text(report.by, report.groups)
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

"""``@budget``: a hard spend cap that holds under concurrency.

LiteLLM-style budgets check spend before a call and add it after, so concurrent calls walk
past the limit together. llmguard *reserves* first: before the call, its worst case (prompt
tokens x input price + output budget x output price, on the model the call will use) is
atomically reserved only if spent + reserved + estimate fits the limit; after the call the
reservation is released and the real cost added. Reservations expire, so a killed process
cannot hold budget forever. Windows are calendar-aligned in ``tz``.

A budget's definition (limit, window, time zone, keyed or not) is stored next to its ledger on
its first call, so any process can read it (``budget_status``, ``budget_keys``, the CLI). A
function whose real cost turns out above what its arguments showed teaches the budget a
floor: its later calls reserve the largest such cost seen (see ``_learn``).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any, ParamSpec, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import _validate as validate
from ._config import UNSET, Unset, settings_generation
from ._errors import (
    BudgetExceeded,
    BudgetUnavailable,
    CallTooExpensive,
    ConfigurationError,
    PriceUnknown,
    StorageError,
)
from ._events import emit, warn_once, warn_outage
from ._ledger import (
    PICO,
    Ledger,
    alert_key,
    burn_flag_key,
    burn_key,
    floor_field,
    ledger_for,
    ledger_key,
    ledger_prefix,
    parse_ledger_key,
    read_config,
    usd_of,
    write_config,
)
from ._money import format_usd
from ._pipeline import (
    PROCEED,
    Blocking,
    CallRecord,
    GuardedFunction,
    PromptFn,
    Sleep,
    UserFunction,
    check_options,
    full_name,
    guard,
    original,
)
from ._prices import get_price
from ._storage import open_storage, validate_uri
from ._stream import StreamTally, is_stream
from ._stream import wrap as wrap_stream
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


_PERIODS = ("hour", "day", "week", "month", "total")
_ON_EXCEED = ("raise", "warn", "wait")
_FIRST_POLL, _MAX_POLL = 0.01, 0.2  # seconds between looks at the ledger while waiting
_UNDERESTIMATE = 2  # a call costing more than this many times its reservation teaches a floor
_registry: dict[str, _BudgetLayer] = {}
_registry_lock = threading.Lock()


@dataclass(frozen=True)
class BudgetStatus:
    """A budget window's state: what is spent, reserved by calls in flight, and left."""

    name: str
    key: str | None
    limit_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal
    window_start: datetime | None
    resets_at: datetime | None

    def __repr__(self) -> str:
        money = ", ".join(
            f"{field}={format_usd(getattr(self, field))}"
            for field in ("limit_usd", "spent_usd", "reserved_usd", "remaining_usd")
        )
        times = ", ".join(
            f"{field}={'None' if at is None else at.isoformat()}"
            for field, at in (("window_start", self.window_start), ("resets_at", self.resets_at))
        )
        return f"BudgetStatus(name={self.name!r}, key={self.key!r}, {money}, {times})"


class BudgetedFunction(GuardedFunction[P, R_co], Protocol[P, R_co]):
    """A function decorated with ``@budget``: a :class:`GuardedFunction` that also reads its
    budget's state."""

    def budget_status(self, key: str | None = None) -> BudgetStatus:
        """The state of this function's budget (of ``key``'s window for a keyed budget)."""
        ...


@dataclass(frozen=True, repr=False)
class BudgetAlert(BudgetStatus):
    """What ``on_alert`` receives: the budget's state (a :class:`BudgetStatus`) and why it
    alerts. ``kind`` is ``"threshold"`` (spend reached ``threshold`` of the limit: the
    ``budget_alert`` event) or ``"burn"`` (at the spend rate of the last ``window_s``
    seconds, ``rate_usd_per_hour``, the limit runs out at ``exhausts_at``, before the window
    resets: the ``budget_burn_alert`` event)."""

    kind: str = "threshold"
    threshold: float | None = None
    window_s: float | None = None
    window_spent_usd: Decimal | None = None
    rate_usd_per_hour: Decimal | None = None
    projected_usd: Decimal | None = None
    exhausts_at: datetime | None = None

    @property
    def event(self) -> str:
        """The name of the event this alert logged."""
        return "budget_burn_alert" if self.kind == "burn" else "budget_alert"

    def __repr__(self) -> str:
        why = (
            f"threshold={self.threshold!r}"
            if self.kind == "threshold"
            else f"rate_usd_per_hour={self.rate_usd_per_hour}, exhausts_at="
            f"{None if self.exhausts_at is None else self.exhausts_at.isoformat()}"
        )
        return f"BudgetAlert(kind={self.kind!r}, {why}, {super().__repr__()})"


@dataclass(frozen=True)
class BurnAlert:
    """``@budget(burn_alert=BurnAlert(window="1h"))``: alert when the spend of the last
    ``window`` (seconds, a timedelta or ``"15m"``/``"1h"``), kept up, would exhaust the
    budget before its window resets. One ``budget_burn_alert`` per episode, across
    processes; re-armed once that projection falls below ``rearm`` x the limit (0.9: some
    room, so that a rate hovering at the edge does not alert on every call).
    ``burn_alert="1h"`` is ``BurnAlert(window="1h")``."""

    window: str | float | timedelta = "1h"
    rearm: float = 0.9

    @property
    def seconds(self) -> float:
        from ._cache import parse_duration

        return float(parse_duration(self.window, "burn_alert window") or 0)


_BURN_SLICES = 12  # a burn window is measured in this many slices (plus the one in progress)
_BURN_FIRED_MAX = 10_000  # flags this process remembers having seen set


def burn_rate(slices: dict[int, int], now: float, window: float) -> float:
    """Pico-USD per second spent over the last ``window`` seconds, from spend per slice of
    ``window / _BURN_SLICES`` seconds (the oldest slice counted for the part of it still
    inside the window)."""
    width = window / _BURN_SLICES
    position = now / width
    current = int(position)
    total = 0.0
    for slice_id, amount in slices.items():
        age = current - slice_id
        if 0 <= age < _BURN_SLICES:
            total += amount
        elif age == _BURN_SLICES:
            total += amount * (1 - (position - current))
    return total / window


def _pico(usd: Decimal) -> int:
    """Whole pico-dollars, rounded up; never negative (nothing takes spend off a ledger)."""
    return max(int((usd * PICO).to_integral_value(rounding=ROUND_CEILING)), 0)


_MAX_CHARGE = Decimal(10_000)
"""The most one call is charged: no real LLM call costs $10,000, and a provider (or proxy)
reporting absurd usage (10**20 tokens) must not overflow a ledger's 64-bit counter, which
would lose the charge altogether."""


def _charge_pico(usd: Decimal, name: str) -> int:
    """What a settled call adds to a ledger, in pico-dollars: at most :data:`_MAX_CHARGE`."""
    if usd > _MAX_CHARGE:
        warn_once(
            f"absurd_charge:{name}",
            "impossible_usage",
            budget=name,
            cost_usd=float(usd),
            hint=f"a call reported costing more than ${_MAX_CHARGE:,}: charged ${_MAX_CHARGE:,}",
        )
        usd = _MAX_CHARGE
    return _pico(usd)


def window_of(period: str | timedelta, now: datetime) -> tuple[datetime | None, datetime | None]:
    """(start, reset) of the window holding ``now`` (timezone-aware), calendar-aligned."""
    if period == "total":
        return None, None
    if isinstance(period, timedelta):
        step = period.total_seconds()
        start_ts = (now.timestamp() // step) * step
        start = datetime.fromtimestamp(start_ts, now.tzinfo)
        return start, datetime.fromtimestamp(start_ts + step, now.tzinfo)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start, end = midnight, midnight + timedelta(days=1)
    elif period == "week":
        start = midnight - timedelta(days=midnight.weekday())
        end = start + timedelta(days=7)
    else:  # month
        start = midnight.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # Wall-clock arithmetic across a DST change: normalise through UTC.
    return start, end.replace(tzinfo=None).replace(tzinfo=now.tzinfo)


@dataclass(frozen=True)
class BudgetDefinition:
    """What makes a budget one ledger: its limit, window, time zone and whether it is kept
    per key. Stored with the ledger, so other processes read the budget as declared."""

    limit: Decimal
    period: str | timedelta
    tz: ZoneInfo
    keyed: bool

    def record(self) -> dict[str, Any]:
        """This definition as stored (JSON)."""
        period: Any = self.period
        if isinstance(period, timedelta):
            period = {"microseconds": period // timedelta(microseconds=1)}
        return {
            "usd": f"{self.limit.normalize():f}",
            "per": period,
            "tz": self.tz.key,
            "keyed": self.keyed,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BudgetDefinition | None:
        """The definition a stored record describes, or None if it is not one."""
        try:
            period = record["per"]
            if isinstance(period, dict):
                period = timedelta(microseconds=int(period["microseconds"]))
                if period <= timedelta(0):
                    return None
            elif period not in _PERIODS:
                return None
            limit = Decimal(str(record["usd"]))
            if not limit.is_finite() or limit < 0:
                return None
            return cls(limit, period, ZoneInfo(str(record["tz"])), bool(record["keyed"]))
        except (KeyError, TypeError, ValueError, ArithmeticError, ZoneInfoNotFoundError):
            return None

    def describe(self) -> str:
        per = (
            repr(self.period)
            if isinstance(self.period, str)
            else f"timedelta(seconds={self.period.total_seconds():g})"
        )
        keyed = ", per key" if self.keyed else ""
        return f"usd={self.limit}, per={per}, tz={self.tz.key!r}{keyed}"

    def window(
        self, timestamp: float
    ) -> tuple[str, datetime | None, datetime | None, float | None]:
        """(window id, start, reset, ledger ttl in seconds) of the window holding
        ``timestamp``."""
        now = datetime.fromtimestamp(timestamp, self.tz)
        start, end = window_of(self.period, now)
        window_id = (
            "total" if start is None else start.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S")
        )
        ttl = None if end is None else max((end - now).total_seconds(), 1.0) + 86400
        return window_id, start, end, ttl

    def status(
        self,
        name: str,
        key: str | None,
        spent: int,
        reserved: int,
        start: datetime | None,
        end: datetime | None,
    ) -> BudgetStatus:
        limit_pico = _pico(self.limit)
        return BudgetStatus(
            name=name,
            key=key,
            limit_usd=self.limit,
            spent_usd=usd_of(spent),
            reserved_usd=usd_of(reserved),
            remaining_usd=max(usd_of(limit_pico - spent - reserved), Decimal(0)),
            window_start=start,
            resets_at=end,
        )

    def check_key(self, name: str, key: str | None) -> None:
        """Refuse to read or reset a keyed budget without a key, or the converse."""
        if self.keyed and key is None:
            raise ConfigurationError(
                f"budget {name!r} is kept per key (it has key=): pass key=... to read or reset "
                f"one key's; llmguard.budget_keys({name!r}) lists every key with its spend"
            )
        if not self.keyed and key is not None:
            raise ConfigurationError(
                f"budget {name!r} has no key=: it has one ledger, read it without key="
            )


class _BudgetLayer:
    def __init__(
        self,
        *,
        name: str | None,
        limit: Decimal,
        period: str | timedelta,
        key: Callable[..., Any] | None,
        on_exceed: Any,
        alert_at: tuple[float, ...],
        on_alert: Callable[[BudgetStatus], Any] | None,
        max_call_usd: Decimal | None,
        storage: str | None,
        tz: ZoneInfo,
        reservation_ttl: float,
        unknown_price: str,
        default_output_tokens: int,
        fail_open: bool,
        clock: Callable[[], float],
        max_wait: float = 30.0,
        sleep: Callable[[float], None] | None = None,
        async_sleep: Callable[[float], Awaitable[None]] | None = None,
        burn: BurnAlert | None = None,
    ) -> None:
        self.name = name
        self.limit = limit
        self.limit_pico = _pico(limit)
        self.period = period
        self.key_fn = None if key is None else UserFunction(key, "budget", "key")
        self.on_exceed = on_exceed
        self.alert_at = alert_at
        self.on_alert = on_alert
        self.max_call = max_call_usd
        self.storage_uri = storage
        self.tz = tz
        self.reservation_ttl = reservation_ttl
        self.unknown_price = unknown_price
        self.default_output_tokens = default_output_tokens
        self.fail_open = fail_open
        self.clock = clock
        self.max_wait = max_wait
        self.sleep = sleep
        self.async_sleep = async_sleep
        self.definition = BudgetDefinition(limit, period, tz, key is not None)
        self._ledger: Ledger | None = None
        self._generation = -1  # the settings the ledger's storage was resolved under
        self._remote = False
        self._published: set[str] = set()  # budget names whose definition is stored
        # The learned floors, per (budget, function, model): see _learn.
        self._floors: dict[tuple[str, str, str | None], int] = {}
        self._probes: dict[tuple[str, str, str | None], CallRecord] = {}
        self._floors_read: set[tuple[str, str, str | None]] = set()
        self._floor_lock = threading.Lock()
        self.burn = burn
        self._burning: set[str] = set()  # burn flags this process saw set (see _check_burn)
        self._burn_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------
    def ledger(self, storage: str | None = None) -> Ledger:
        """The ledger on this budget's storage (or on ``storage``, for the operator API)."""
        if storage is not None and storage != self.storage_uri:
            validate_uri(storage)
            return ledger_for(open_storage(storage))
        if self._ledger is None or self._generation != settings_generation():
            generation = settings_generation()  # configure() may have moved the storage
            opened = open_storage(self.storage_uri)
            if self._ledger is None or self._ledger.storage is not opened:
                self._ledger = ledger_for(opened)
                self._remote = opened.remote
                self._published.clear()  # a storage that has not seen the definitions yet
            self._generation = generation
        return self._ledger

    def _unavailable(self, name: str, error: StorageError) -> None:
        """One ``budget_unavailable`` warning per outage of the ledger's storage."""
        warn_outage(
            error.uri,
            "budget_unavailable",
            budget=name,
            error=str(error)[:300],
            hint="calls run unmetered (fail_open=True) until the ledger answers again"
            if self.fail_open
            else "calls are refused (BudgetUnavailable) until the ledger answers again",
        )

    def _window(self) -> tuple[str, datetime | None, datetime | None, float | None]:
        return self.definition.window(self.clock())

    def _ledger_key(self, name: str, key: str | None, window_id: str) -> str:
        return ledger_key(name, key, window_id)

    def status(self, name: str, key: str | None, storage: str | None = None) -> BudgetStatus:
        return _read_status(self.definition, self.clock, self.ledger(storage), name, key)

    def _status(
        self,
        name: str,
        key: str | None,
        spent: int,
        reserved: int,
        start: datetime | None,
        end: datetime | None,
    ) -> BudgetStatus:
        return self.definition.status(name, key, spent, reserved, start, end)

    def reset(self, name: str, key: str | None, storage: str | None = None) -> None:
        _reset_window(self.definition, self.clock, self.ledger(storage), name, key)

    def key_of(self, call: CallRecord) -> str | None:
        """The budget key (tenant) of ``call``: ``key=`` given its arguments by name."""
        return None if self.key_fn is None else str(self.key_fn(call))

    # -- the worst case of a call ----------------------------------------------------------
    def estimate(self, call: CallRecord) -> tuple[str | None, Decimal | None]:
        model = call.requested_model()
        price = get_price(model) if model else None
        if price is None:
            return model, None
        prompt = call.prompt_tokens(model)
        return model, price.cost(prompt, call.output_budget(self.default_output_tokens))

    # -- the policy ----------------------------------------------------------------------
    def run(self, call: CallRecord) -> Generator[Any, Any, Any]:
        name = self.name or call.spec.name
        try:
            key = self.key_of(call)
        except TypeError:  # the arguments do not fit the signature: the function raises
            return (yield PROCEED)
        model, estimate = self.estimate(call)
        call.fields["budget"] = name
        call.fields["budget_limit_usd"] = float(self.limit)
        if key is not None:
            call.fields["budget_key"] = key  # the tenant: llmguard report --by key
        if estimate is None:
            if self.unknown_price == "refuse" and model is None:
                raise PriceUnknown(
                    f"budget {name!r} cannot be enforced on {call.spec.name}: it names no "
                    "model (no model argument, no default, no @budget(model=...)), so its "
                    "worst case cannot be priced. Pass @budget(model=...) with the model its "
                    "calls use, or unknown_price='allow' to reserve only the largest cost seen "
                    "(a function whose nested calls do the spending: they are charged too)"
                )
            if self.unknown_price == "refuse":
                raise PriceUnknown(
                    f"budget {name!r} cannot be enforced: no price for model {model!r}. Add one "
                    f"with llmguard.set_price({model!r}, input_per_mtok=..., output_per_mtok=...)"
                )
            estimate = Decimal(0)
        if self.max_call is not None and estimate > self.max_call:
            raise CallTooExpensive(
                f"{call.spec.name}: this call could cost up to {format_usd(estimate)} on {model}, "
                f"above budget {name!r}'s max_call_usd {format_usd(self.max_call)}: shorten the "
                "prompt or lower max_tokens",
                budget=name,
                key=key,
                limit_usd=self.limit,
                spent_usd=Decimal(0),
                reserved_usd=Decimal(0),
                estimate_usd=estimate,
                resets_at=None,
            )
        floor, probe = yield from self._floor(call, name, model)  # may wait for a first call
        handoff = [False]  # set when a returned stream takes over ending the probe
        try:
            return (
                yield from self._reserve_and_call(
                    call, name, key, model, estimate, floor, probe, handoff
                )
            )
        finally:
            if probe is not None and not handoff[0]:
                self._end_probe(probe)

    def _reserve_and_call(
        self,
        call: CallRecord,
        name: str,
        key: str | None,
        model: str | None,
        estimate: Decimal,
        floor: int,
        probe: tuple[str, str, str | None] | None,
        handoff: list[bool],
    ) -> Generator[Any, Any, Any]:
        rid = os.urandom(8).hex()
        amount = max(_pico(estimate), floor)
        waited = 0.0
        pause = _FIRST_POLL
        while True:  # more than once only with on_exceed="wait"
            window_id, start, end, ttl = self._window()
            ledger_key = self._ledger_key(name, key, window_id)
            now_ms = int(self.clock() * 1000)
            try:
                ledger = self.ledger()
                if name not in self._published:
                    publish = functools.partial(self._publish, ledger, name)
                    (yield Blocking(publish)) if self._remote else publish()
                reserve = functools.partial(
                    ledger.reserve,
                    ledger_key,
                    self.limit_pico,
                    amount,
                    rid,
                    now_ms + int(self.reservation_ttl * 1000),
                    now_ms,
                    ttl,
                )
                ok, spent, reserved = (yield Blocking(reserve)) if self._remote else reserve()
            except StorageError as exc:
                self._unavailable(name, exc)
                if not self.fail_open:
                    raise BudgetUnavailable(
                        f"budget {name!r}: its ledger cannot be reached ({exc}); calls are "
                        "refused rather than run unmetered. @budget(fail_open=True) lets them "
                        "through."
                    ) from exc
                return (yield PROCEED)
            if ok or not self._may_wait(spent, amount, waited):
                break
            step = min(pause, self.max_wait - waited)
            yield Sleep(step, sleep=self.sleep, async_sleep=self.async_sleep)
            waited += step
            pause = min(pause * 2, _MAX_POLL)
        if not ok:
            status = self._status(name, key, spent, reserved, start, end)
            call.fields["budget_remaining_usd"] = float(status.remaining_usd)
            if self.on_exceed in ("raise", "wait"):
                raise BudgetExceeded(
                    self._refusal(call, name, key, spent, reserved, estimate, amount, end),
                    budget=name,
                    key=key,
                    limit_usd=self.limit,
                    spent_usd=status.spent_usd,
                    reserved_usd=status.reserved_usd,
                    estimate_usd=usd_of(amount),
                    resets_at=end,
                )
            if callable(self.on_exceed):
                call.fields["budget_exceeded"] = True
                return self.on_exceed(status)
            emit(
                "warning",
                "budget_exceeded",
                {"budget": name, "key": key, "estimate_usd": float(estimate)},
            )
            rid = ""  # "warn": proceed unreserved, and record what it spends
        reported_before = len(call.usages)  # an outer layer may run this call again
        ledger_id = (name, key)
        children = call.children_mark(ledger_id)  # nested decorated calls spend too
        settle = functools.partial(
            self._settle_and_learn, call, name, key, ledger_key, rid or None, model, amount
        )

        def charge(known: Decimal | None) -> Decimal:
            """What to charge: this attempt's own cost (``known``, else the worst case
            reserved) and what its nested calls spent that no budget on this ledger
            charged; recorded, so that a budget on it over an enclosing call does not
            charge it again."""
            nested = call.children_unsettled(children, ledger_id)
            call.add_settled(ledger_id, (known or Decimal(0)) + nested)
            charged = (known if known is not None else estimate) + nested
            if call.fields.get("budget_charged_unanswered"):
                call.fields["budget_charged_usd"] = float(charged)  # not in cost_usd: unknown
            return charged

        try:
            result = yield PROCEED
        except BaseException as exc:  # interrupts and cancellations release it too
            cost = charge(self._attempt_cost(call, None, exc, reported_before))
            yield from settle(_charge_pico(cost, name), ttl, start, end, learn=cost > 0)
            raise
        if is_stream(result):  # hold the reservation until the stream has been consumed

            def at_end(tally: StreamTally, error: BaseException | None) -> None:
                try:
                    cost = charge(call.streamed_cost(tally, error, reported_before))
                    _run_inline(settle(_charge_pico(cost, name), ttl, start, end))
                finally:
                    if probe is not None:
                        self._end_probe(probe)

            handoff[0] = True
            return wrap_stream(result, at_end)
        cost = charge(self._attempt_cost(call, result, None, reported_before))
        yield from settle(_charge_pico(cost, name), ttl, start, end)
        return result

    @staticmethod
    def _attempt_cost(
        call: CallRecord, result: Any, error: BaseException | None, reported_before: int
    ) -> Decimal | None:
        """What this attempt cost itself: the usage it reported; else, if it failed, nothing
        (the provider answered with an error) or, if a request it sent was never answered (a
        timeout, a dropped connection, an interrupt), None: unknown, the worst case reserved
        is charged, since the provider may have done the work; else the call's metering (an
        estimate; nothing if nested decorated calls made its provider calls); None if
        unknown (a model without a price)."""
        metering = call.meter(result, error)  # also takes in the result's own usage
        if len(call.usages) > reported_before:
            return call.usage_totals(since=reported_before)[1]
        if error is not None:
            if call.unanswered > 0:
                call.fields["budget_charged_unanswered"] = True  # see charge(): the amount
                return None
            return Decimal(0)  # nothing was billed: release the reservation
        return metering.cost

    def _settle(
        self,
        call: CallRecord,
        name: str,
        key: str | None,
        ledger_key: str,
        rid: str | None,
        actual: int,
        ttl: float | None,
        start: datetime | None,
        end: datetime | None,
    ) -> Generator[Any, Any, None]:
        ledger = self.ledger()
        now_ms = int(self.clock() * 1000)
        settle = functools.partial(ledger.settle, ledger_key, rid, actual, now_ms, ttl)
        try:
            spent, reserved = (yield Blocking(settle)) if self._remote else settle()
        except StorageError as exc:
            self._unavailable(name, exc)
            return
        status = self._status(name, key, spent, reserved, start, end)
        call.fields["budget_spent_usd"] = float(status.spent_usd)
        call.fields["budget_remaining_usd"] = float(status.remaining_usd)
        if self.alert_at and self.limit_pico:
            fraction = spent / self.limit_pico
            for threshold in self.alert_at:
                if fraction >= threshold:
                    yield from self._alert(ledger_key, threshold, status, ttl)
        if self.burn is not None:
            yield from self._check_burn(name, key, ledger_key, actual, spent, status, ttl)

    def _alert(
        self, ledger_key: str, threshold: float, status: BudgetStatus, ttl: float | None
    ) -> Generator[Any, Any, None]:
        storage = open_storage(self.storage_uri)
        flag = functools.partial(storage.add, alert_key(ledger_key, threshold), b"1", ttl)
        try:
            first = (yield Blocking(flag)) if self._remote else flag()
        except StorageError:
            return
        if not first:
            return  # this threshold already alerted in this window, in some process
        emit(
            "warning",
            "budget_alert",
            {
                "budget": status.name,
                "key": status.key,
                "threshold": threshold,
                "limit_usd": float(status.limit_usd),
                "spent_usd": float(status.spent_usd),
                "remaining_usd": float(status.remaining_usd),
                "window_start": None
                if status.window_start is None
                else status.window_start.isoformat(),
                "resets_at": None if status.resets_at is None else status.resets_at.isoformat(),
            },
        )
        self._notify(BudgetAlert(**vars(status), kind="threshold", threshold=threshold))

    def _notify(self, alert: BudgetAlert) -> None:
        """Call ``on_alert``: the call that crossed the line is settled and goes on whatever
        the callback does (one ``alert_callback_failed`` warning per budget if it raises)."""
        if self.on_alert is None:
            return
        try:
            self.on_alert(alert)
        except Exception as exc:
            warn_once(
                f"alert_callback_failed:{alert.name}",
                "alert_callback_failed",
                budget=alert.name,
                error=f"{type(exc).__name__}: {exc}"[:300],
                hint="on_alert raised; the call that triggered the alert was not affected",
            )

    # -- spend-rate (burn) alerts ------------------------------------------------------------
    # Every settled call adds its cost to the budget key's spend per time slice (one atomic
    # ledger operation, shared by every process), which gives the spend rate over the last
    # burn window. When that rate, kept up until the window resets, would take the spend to
    # the limit, a `budget_burn_alert` fires: once per episode across processes (an atomic
    # `add` of a flag, as threshold alerts do). A process that saw the flag set deletes it
    # when the projection falls under `rearm` x the limit: the next episode alerts again.
    def _check_burn(
        self,
        name: str,
        key: str | None,
        ledger_key: str,
        actual: int,
        spent: int,
        status: BudgetStatus,
        ttl: float | None,
    ) -> Generator[Any, Any, None]:
        burn = self.burn
        if burn is None or status.resets_at is None or not self.limit_pico:
            return
        window = burn.seconds
        width = window / _BURN_SLICES
        now = self.clock()
        slice_id = int(now / width)
        record = functools.partial(
            self.ledger().burn,
            burn_key(name, key),
            slice_id,
            actual,
            slice_id - _BURN_SLICES,
            window + 2 * width,
        )
        try:
            slices = (yield Blocking(record)) if self._remote else record()
        except StorageError:
            return
        rate = burn_rate(slices, now, window)  # pico-USD per second: a forecast, not money
        left = max(status.resets_at.timestamp() - now, 0.0)
        projected = spent + rate * left
        flag = burn_flag_key(ledger_key)
        if spent < self.limit_pico and rate > 0 and projected >= self.limit_pico:
            yield from self._burn_fired(flag, status, window, rate, projected, now, ttl)
        elif projected < burn.rearm * self.limit_pico:
            yield from self._burn_rearm(flag)

    def _burn_fired(
        self,
        flag: str,
        status: BudgetStatus,
        window: float,
        rate: float,
        projected: float,
        now: float,
        ttl: float | None,
    ) -> Generator[Any, Any, None]:
        """The spend rate would exhaust the budget: alert, unless this episode did."""
        with self._burn_lock:
            if flag in self._burning:
                return  # this process saw the flag set, and nobody re-armed it since
        storage = open_storage(self.storage_uri)
        add = functools.partial(storage.add, flag, b"1", ttl)
        try:
            first = (yield Blocking(add)) if self._remote else add()
        except StorageError:
            return
        with self._burn_lock:
            if len(self._burning) >= _BURN_FIRED_MAX:
                self._burning.clear()
            self._burning.add(flag)
        if not first:
            return  # another process alerted this episode
        limit = self.limit_pico
        exhausts = now + (limit - _pico(status.spent_usd)) / rate
        alert = BudgetAlert(
            **vars(status),
            kind="burn",
            window_s=window,
            window_spent_usd=usd_of(round(rate * window)),
            rate_usd_per_hour=usd_of(round(rate * 3600)),
            projected_usd=usd_of(round(projected)),
            exhausts_at=datetime.fromtimestamp(exhausts, self.tz),
        )
        emit(
            "warning",
            "budget_burn_alert",
            {
                "budget": alert.name,
                "key": alert.key,
                "window_s": window,
                "window_spent_usd": float(alert.window_spent_usd or 0),
                "rate_usd_per_hour": float(alert.rate_usd_per_hour or 0),
                "limit_usd": float(alert.limit_usd),
                "spent_usd": float(alert.spent_usd),
                "remaining_usd": float(alert.remaining_usd),
                "projected_usd": float(alert.projected_usd or 0),
                "exhausts_at": None if alert.exhausts_at is None else alert.exhausts_at.isoformat(),
                "resets_at": None if alert.resets_at is None else alert.resets_at.isoformat(),
            },
        )
        self._notify(alert)

    def _burn_rearm(self, flag: str) -> Generator[Any, Any, None]:
        """The spend rate fell back: the next episode alerts again."""
        with self._burn_lock:
            if flag not in self._burning:
                return  # not set, as far as this process knows: nothing to write
            self._burning.discard(flag)
        storage = open_storage(self.storage_uri)
        delete = functools.partial(storage.delete, flag)
        try:
            (yield Blocking(delete)) if self._remote else delete()
        except StorageError:
            with self._burn_lock:
                self._burning.add(flag)  # try again on a later call

    # -- the stored definition ---------------------------------------------------------------
    def _publish(self, ledger: Ledger, name: str) -> None:
        """Store this budget's definition with its ledger (once per process and name), so
        other processes can read the budget; warn if a different one was stored."""
        replaced = write_config(ledger.storage, name, self.definition.record())
        self._published.add(name)
        if replaced is not None:
            before = BudgetDefinition.from_record(replaced)
            emit(
                "warning",
                "budget_redefined",
                {
                    "budget": name,
                    "stored": before.describe() if before is not None else str(replaced)[:300],
                    "declared": self.definition.describe(),
                },
            )

    # -- waiting for calls in flight (on_exceed="wait") ------------------------------------
    def _may_wait(self, spent: int, amount: int, waited: float) -> bool:
        """Whether a refused reservation is worth waiting for: only calls in flight stand in
        its way (it fits next to what is spent) and max_wait is not used up."""
        return (
            self.on_exceed == "wait"
            and spent + amount <= self.limit_pico
            and waited < self.max_wait
        )

    def _refusal(
        self,
        call: CallRecord,
        name: str,
        key: str | None,
        spent: int,
        reserved: int,
        estimate: Decimal,
        amount: int,
        end: datetime | None,
    ) -> str:
        """Why a call is refused, telling settled spend from reservations of calls in flight."""
        text = (
            f"budget {name!r}{'' if key is None else f' (key {key!r})'} would be exceeded: "
            f"limit {format_usd(self.limit)}, spent {format_usd(usd_of(spent))} (settled), "
            f"{format_usd(usd_of(reserved))} reserved by calls in flight, this call up to "
            f"{format_usd(usd_of(amount))}"
        )
        if amount > _pico(estimate):
            text += (
                f" (the largest cost seen of {call.spec.name}, whose arguments show only "
                f"{format_usd(estimate)})"
            )
        if spent + amount <= self.limit_pico:
            text += (
                f"; it would fit once the calls in flight settle, which they did not within "
                f"max_wait={self.max_wait:g}s"
                if self.on_exceed == "wait"
                else "; it would fit once the calls in flight settle: "
                "@budget(on_exceed='wait') waits for them"
            )
        resets = "never (per=total)" if end is None else end.isoformat()
        return f"{text}; resets {resets}"

    # -- learned floors ----------------------------------------------------------------------
    # A function whose real cost exceeds _UNDERESTIMATE x its reservation hides its prompt
    # from its arguments (it builds it inside). It gets a `budget_underestimate` warning and
    # a floor: its later reservations are at least the largest cost it was seen to have. So
    # that concurrent calls do not all reserve the too-small estimate before the first one
    # settles, the first call of a function (per budget and model, per process) whose cost
    # nobody has seen yet runs alone; the others wait for it (at most reservation_ttl). Floors
    # are kept in the ledger too, so other processes start with them, and a function with a
    # declared prompt= is never held back. The overshoot is at most one call per process.
    def _floor(
        self, call: CallRecord, name: str, model: str | None
    ) -> Generator[Any, Any, tuple[int, tuple[str, str, str | None] | None]]:
        """(floor of this call's reservation in pico-USD, this call's probe token if it is
        the first of its function to run)."""
        slot = (name, call.spec.name, model)
        with self._floor_lock:
            floor = self._floors.get(slot)
        if floor is not None:
            return floor, None
        if slot not in self._floors_read:  # once per process: the ledger's floor, if any
            self._floors_read.add(slot)
            load = functools.partial(self._load_floor, slot)
            try:
                (yield Blocking(load)) if self._remote else load()
            except StorageError:
                pass  # the reservation will meet the same error and handle it
        waited, pause = 0.0, _FIRST_POLL
        while True:
            with self._floor_lock:
                floor = self._floors.get(slot)
                if floor is not None:
                    return floor, None
                if call.spec.prompt is not None:
                    return 0, None  # its prompt is declared: its estimate can be trusted
                probe = self._probes.get(slot)
                if probe is None:
                    self._probes[slot] = call
                    return 0, slot
                if waited >= self.reservation_ttl or _inside(call, probe):
                    return 0, None  # (a call made inside the first one cannot wait for it)
            yield Sleep(pause, sleep=self.sleep, async_sleep=self.async_sleep)
            waited += pause
            pause = min(pause * 2, _MAX_POLL)

    def _load_floor(self, slot: tuple[str, str, str | None]) -> None:
        stored = self.ledger().floor(slot[0], floor_field(slot[1], slot[2]))
        if stored is not None:
            with self._floor_lock:
                self._floors[slot] = max(self._floors.get(slot, 0), stored)

    def _end_probe(self, slot: tuple[str, str, str | None]) -> None:
        with self._floor_lock:
            self._probes.pop(slot, None)

    def _settle_and_learn(
        self,
        call: CallRecord,
        name: str,
        key: str | None,
        ledger_key: str,
        rid: str | None,
        model: str | None,
        amount: int,
        actual: int,
        ttl: float | None,
        start: datetime | None,
        end: datetime | None,
        learn: bool = True,
    ) -> Generator[Any, Any, None]:
        yield from self._settle(call, name, key, ledger_key, rid, actual, ttl, start, end)
        if learn:  # after settling: whoever waits on this call then sees its cost spent
            yield from self._learn(call, name, model, amount, actual)

    def _learn(
        self, call: CallRecord, name: str, model: str | None, amount: int, actual: int
    ) -> Generator[Any, Any, None]:
        """Take in a settled call's real cost ``actual`` against its reservation ``amount``."""
        slot = (name, call.spec.name, model)
        underestimated = actual > _UNDERESTIMATE * amount
        if underestimated:
            emit(
                "warning",
                "budget_underestimate",
                {
                    "budget": name,
                    "function": call.spec.name,
                    "model": model,
                    "reserved_usd": float(usd_of(amount)),
                    "cost_usd": float(usd_of(actual)),
                    "hint": f"{call.spec.name} cost more than {_UNDERESTIMATE}x what its "
                    "arguments showed: it sends a prompt they do not contain (or the "
                    "decorated functions it calls spend more than it reserves). Pass "
                    "@budget(prompt=lambda *args, **kwargs: <the prompt text or messages>) so "
                    "each call reserves its real worst case; until then its calls reserve the "
                    "largest cost seen",
                },
            )
        with self._floor_lock:
            floor = self._floors.get(slot)
            if underestimated or (floor and actual > floor):
                learned = max(actual, floor or 0)
            elif floor is None:
                learned = 0  # seen, and within its reservation: no floor
            else:
                return
            self._floors[slot] = learned
        raise_floor = functools.partial(
            self.ledger().raise_floor, name, floor_field(call.spec.name, model), learned
        )
        try:
            stored = (yield Blocking(raise_floor)) if self._remote else raise_floor()
        except StorageError:
            return
        with self._floor_lock:
            self._floors[slot] = max(self._floors.get(slot, 0), stored)


def _inside(call: CallRecord, outer: CallRecord) -> bool:
    """Whether ``call`` is made (directly or not) inside ``outer``."""
    parent = call.parent
    while parent is not None:
        if parent is outer:
            return True
        parent = parent.parent
    return False


def _run_inline(steps: Generator[Any, Any, Any]) -> Any:
    """Drive a layer's generator outside a call (a stream's end): blocking steps run here."""
    sent: Any = None
    while True:
        try:
            instruction = steps.send(sent)
        except StopIteration as stop:
            return stop.value
        sent = instruction.fn() if isinstance(instruction, Blocking) else None


def _burn_option(value: Any, per: str | timedelta) -> BurnAlert | None:
    """``burn_alert=`` as a checked :class:`BurnAlert` (None: no burn alerts)."""
    if value is None:
        return None
    burn = value if isinstance(value, BurnAlert) else BurnAlert(window=value)
    seconds = burn.seconds  # ConfigurationError for a bad window
    if per == "total":
        raise ConfigurationError(
            "burn_alert needs a budget that resets: per='total' never does, so any spend "
            "rate would exhaust it eventually. Use alert_at thresholds for a total budget"
        )
    rearm = burn.rearm
    if isinstance(rearm, bool) or not isinstance(rearm, (int, float)) or not 0 < rearm <= 1:
        raise ConfigurationError(
            f"BurnAlert(rearm=...) must be a fraction in (0, 1], got {rearm!r}"
        )
    if isinstance(per, timedelta) and seconds > per.total_seconds():
        raise ConfigurationError(
            f"burn_alert window ({seconds:g}s) is longer than the budget's window "
            f"({per.total_seconds():g}s): measure the rate over a shorter one"
        )
    return burn


def budget(
    *,
    usd: float | str | Decimal,
    per: str | timedelta = "day",
    name: str | None = None,
    key: Callable[..., Any] | None = None,
    on_exceed: str | Callable[[BudgetStatus], Any] = "raise",
    alert_at: tuple[float, ...] = (0.5, 0.8, 1.0),
    on_alert: Callable[[BudgetStatus], Any] | None = None,
    burn_alert: str | float | timedelta | BurnAlert | None = None,
    max_call_usd: float | str | Decimal | None = None,
    storage: str | None = None,
    tz: str = "UTC",
    reservation_ttl: float = 300,
    unknown_price: str = "refuse",
    default_output_tokens: int = 1024,
    fail_open: bool = False,
    clock: Callable[[], float] = time.time,
    max_wait: float = 30,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | Unset | None = UNSET,
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Callable[[Callable[P, R]], BudgetedFunction[P, R]]:
    """Cap spend at ``usd`` per ``per`` ("hour", "day", "week", "month", "total" or a
    timedelta), calendar-aligned in ``tz``.

    Before each call its worst case (estimated prompt x input price + output budget x output
    price, on the model it will use) is reserved atomically, only if it fits; otherwise
    ``on_exceed``: ``"raise"`` (``BudgetExceeded``), ``"wait"`` (when only reservations of
    calls in flight stand in the way, wait up to ``max_wait`` seconds for them to settle,
    then raise; a call that cannot fit next to what is already spent is refused at once),
    ``"warn"`` (log and proceed), or a callable whose return value replaces the call. After
    the call the reservation is released and the real cost (usage, else the estimate) added;
    on an exception without usage, released. A call costing more than twice its reservation
    (a prompt its arguments do not show: pass ``prompt=``) logs ``budget_underestimate`` and
    its function's later calls reserve at least the largest such cost seen.
    Budgets with the same ``name`` share one ledger across functions, processes and (with
    Redis) machines, so their declarations must agree on ``usd``, ``per``, ``tz`` and
    whether they have a ``key`` (``ConfigurationError`` otherwise); ``key`` (given the
    call's arguments by name, e.g. ``key=lambda user, **_: user``) gives one budget per user
    or tenant.
    ``max_call_usd`` refuses any single call that could cost more (``CallTooExpensive``).
    ``alert_at`` thresholds log one ``budget_alert`` per window (across processes) and call
    ``on_alert(alert)`` (a :class:`BudgetAlert`, the status and why). ``burn_alert="1h"`` (or
    a :class:`BurnAlert`) also alerts when the spend rate of the last hour, kept up, would
    exhaust the budget before the window resets: one ``budget_burn_alert`` per episode
    (across processes), re-armed when the rate falls back. An unreachable ledger refuses
    calls (``BudgetUnavailable``) unless ``fail_open``; a model without a price is refused
    (``PriceUnknown``) unless ``unknown_price="allow"``. ``clock``, ``sleep`` and
    ``async_sleep`` make windows and waits exact in tests. The decorated function gains
    ``budget_status(key=None)`` (a keyed budget needs ``key=``; ``llmguard.budget_keys(name)``
    lists its keys).
    """
    where = "@budget"
    limit = validate.usd(usd, "usd", decorator=where)
    if (
        not isinstance(per, timedelta) or not 1 <= per.total_seconds() <= validate.MAX_SECONDS
    ) and not (isinstance(per, str) and per in _PERIODS):
        raise validate.refuse(
            where,
            "per",
            per,
            f"per must be one of {', '.join(_PERIODS)} or a timedelta from 1 second to 100 years",
        )
    validate.text(name, "name", decorator=where, allow_none=True, meaning="the budget's name")
    validate.function(key, "key", decorator=where, takes="given the call's arguments by name")
    if not (isinstance(on_exceed, str) and on_exceed in _ON_EXCEED) and (
        isinstance(on_exceed, str) or not callable(on_exceed)
    ):
        raise validate.refuse(
            where,
            "on_exceed",
            on_exceed,
            "on_exceed must be 'raise', 'wait', 'warn' or a callable given the BudgetStatus, "
            "whose return value replaces the call",
        )
    validate.seconds(
        max_wait,
        "max_wait",
        decorator=where,
        minimum=0,
        inclusive=True,
        none_means="how long on_exceed='wait' waits for calls in flight to settle",
    )
    validate.function(sleep, "sleep", decorator=where)
    validate.function(async_sleep, "async_sleep", decorator=where)
    fractions: Any = alert_at
    if not isinstance(fractions, (tuple, list)):
        raise validate.refuse(
            where,
            "alert_at",
            alert_at,
            "alert_at must be a tuple of fractions of the limit in (0, 1], e.g. (0.5, 0.8, 1.0)",
        )
    thresholds = tuple(
        validate.fraction(t, "alert_at", decorator=where, meaning="each a fraction of the limit")
        for t in fractions
    )
    validate.function(on_alert, "on_alert", decorator=where, takes="given the BudgetStatus")
    burn = _burn_option(burn_alert, per)
    max_call = validate.usd(max_call_usd, "max_call_usd", decorator=where, allow_none=True)
    validate.storage(storage, decorator=where)
    zone_error = "tz must be an IANA time zone name such as 'UTC' or 'Europe/Paris'"
    if not isinstance(tz, str) or not tz:
        raise validate.refuse(where, "tz", tz, zone_error)
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise validate.refuse(where, "tz", tz, zone_error) from None
    ttl_s = validate.seconds(
        reservation_ttl,
        "reservation_ttl",
        decorator=where,
        minimum=1,
        inclusive=True,
        none_means="how long a reservation of a killed process holds budget",
    )
    validate.choice(unknown_price, "unknown_price", decorator=where, choices=("refuse", "allow"))
    validate.output_budget(default_output_tokens, decorator=where)
    validate.flag(fail_open, "fail_open", decorator=where)
    validate.function(clock, "clock", decorator=where, allow_none=False)
    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("budget", options)
    layer = _BudgetLayer(
        name=name,
        limit=limit,
        period=per,
        key=key,
        on_exceed=on_exceed,
        alert_at=tuple(sorted(thresholds)),
        on_alert=on_alert,
        max_call_usd=max_call,
        storage=storage,
        tz=zone,
        reservation_ttl=ttl_s,
        unknown_price=unknown_price,
        default_output_tokens=default_output_tokens,
        fail_open=fail_open,
        clock=clock,
        max_wait=float(max_wait),
        sleep=sleep,
        async_sleep=async_sleep,
        burn=burn,
    )

    def decorate(func: Callable[P, R]) -> BudgetedFunction[P, R]:
        wrapper = guard(func, decorator="budget", layer=layer, options=options)
        budget_name = name or _full(func)
        _register(budget_name, layer, _full(func))

        def status(key: str | None = None) -> BudgetStatus:
            layer.definition.check_key(budget_name, key)
            return layer.status(budget_name, key)

        wrapper.budget_status = status
        return wrapper  # type: ignore[no-any-return]

    return decorate


def _full(func: Any) -> str:
    return full_name(original(getattr(func, "__func__", func)))  # classmethods too


_declared_by: dict[str, str] = {}  # budget name -> the function first declaring it


def _register(name: str, layer: _BudgetLayer, function: str) -> None:
    """Record a declaration of budget ``name``; refuse one that disagrees with an earlier
    one (they would share one ledger with different limits)."""
    with _registry_lock:
        earlier = _registry.get(name)
        if earlier is None or _declared_by.get(name) == function:
            # New, or the same function defined again (a re-run notebook cell, a reloaded
            # module): the latest definition is the budget's.
            _registry[name] = layer
            _declared_by[name] = function
            return
    if earlier.definition.record() != layer.definition.record():
        raise ConfigurationError(
            f"budget {name!r} is already declared with {earlier.definition.describe()} (on "
            f"{_declared_by.get(name, '?')}); this declaration on {function} says "
            f"{layer.definition.describe()}. Budgets with one name share one ledger: give "
            "them the same usd, per, tz and key-or-not, or different names"
        )


def declared_budgets() -> list[str]:
    """The names of the budgets declared in this process, sorted."""
    with _registry_lock:
        return sorted(_registry)


def reset_registry() -> None:
    """Forget every budget declared in this process (for tests)."""
    with _registry_lock:
        _registry.clear()
        _declared_by.clear()


def _layer(name: str) -> _BudgetLayer:
    with _registry_lock:
        layer = _registry.get(name)
    if layer is None:
        raise ConfigurationError(
            f"no budget named {name!r} in this process: decorate a function with "
            f"@budget(name={name!r}, ...) first"
        )
    return layer


def spent_fraction(name: str, call: CallRecord) -> float:
    """How much of budget ``name`` (declared in this process) the window ``call`` falls in
    has spent: 0.0 to 1.0 and beyond; 1.0 for a budget with no limit."""
    layer = _layer(name)
    status = layer.status(name, layer.key_of(call))
    if not status.limit_usd:
        return 1.0
    return float(status.spent_usd / status.limit_usd)


def budget_definition(
    name: str, storage: str | None = None
) -> tuple[BudgetDefinition, Callable[[], float], Ledger]:
    """Budget ``name``'s definition, clock and ledger: as declared in this process, else as
    stored with its ledger in ``storage`` (default: the configured storage) by the process
    that used it."""
    with _registry_lock:
        layer = _registry.get(name)
    if layer is not None:
        return layer.definition, layer.clock, layer.ledger(storage)
    if storage is not None:
        validate_uri(storage)
    opened = open_storage(storage)
    ledger = ledger_for(opened)
    record = read_config(opened, name)
    definition = None if record is None else BudgetDefinition.from_record(record)
    if definition is None:
        raise ConfigurationError(
            f"no budget named {name!r}: it is not declared in this process and {opened.uri} "
            "holds no definition of it (a budget's definition is stored with its ledger on "
            "its first call). Check the name and storage="
        )
    return definition, time.time, ledger


def _read_status(
    definition: BudgetDefinition,
    clock: Callable[[], float],
    ledger: Ledger,
    name: str,
    key: str | None,
) -> BudgetStatus:
    now = clock()
    window_id, start, end, _ = definition.window(now)
    spent, reserved = ledger.status(ledger_key(name, key, window_id), int(now * 1000))
    return definition.status(name, key, spent, reserved, start, end)


def _reset_window(
    definition: BudgetDefinition,
    clock: Callable[[], float],
    ledger: Ledger,
    name: str,
    key: str | None,
) -> None:
    window_id, *_ = definition.window(clock())
    ledger.reset(ledger_key(name, key, window_id))


def budget_status(name: str, key: str | None = None, storage: str | None = None) -> BudgetStatus:
    """The state of budget ``name`` (for ``key``, which a keyed budget needs) in its current
    window. Works in any process: a budget not declared here is read as stored with its
    ledger in ``storage`` (default: the configured storage)."""
    definition, clock, ledger = budget_definition(name, storage)
    definition.check_key(name, key)
    return _read_status(definition, clock, ledger, name, key)


def budget_keys(name: str, storage: str | None = None) -> dict[str, BudgetStatus]:
    """The keys of keyed budget ``name`` with a ledger in the current window, each with its
    state, sorted by key. Walks the storage's keys: for operators, not for hot paths."""
    definition, clock, ledger = budget_definition(name, storage)
    if not definition.keyed:
        raise ConfigurationError(
            f"budget {name!r} has no key=: read it with llmguard.budget_status({name!r})"
        )
    now = clock()
    window_id, start, end, _ = definition.window(now)
    found: dict[str, BudgetStatus] = {}
    for text in ledger.storage.keys(ledger_prefix(name, every_key=True)):
        parsed = parse_ledger_key(text)
        if parsed is None or parsed.key is None or parsed.window != window_id:
            continue  # another window, an alert flag, or a key in an older format
        spent, reserved = ledger.status(text, int(now * 1000))
        found[parsed.key] = definition.status(name, parsed.key, spent, reserved, start, end)
    return dict(sorted(found.items()))


def reset_budget(name: str, key: str | None = None, storage: str | None = None) -> None:
    """Forget the spend of budget ``name`` (for ``key``, which a keyed budget needs) in its
    current window; in any process, like :func:`budget_status`."""
    definition, clock, ledger = budget_definition(name, storage)
    definition.check_key(name, key)
    _reset_window(definition, clock, ledger, name, key)

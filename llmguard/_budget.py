"""``@budget``: a hard spend cap that holds under concurrency.

LiteLLM-style budgets check spend before a call and add it after, so concurrent calls walk
past the limit together. llmguard *reserves* first: before the call, its worst case (prompt
tokens x input price + output budget x output price, on the model the call will use) is
atomically reserved only if spent + reserved + estimate fits the limit; after the call the
reservation is released and the real cost added. Reservations expire, so a killed process
cannot hold budget forever. Windows are calendar-aligned in ``tz``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any, ParamSpec, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import _validate as validate
from ._config import UNSET, _Unset
from ._errors import (
    BudgetExceeded,
    BudgetUnavailable,
    CallTooExpensive,
    ConfigurationError,
    PriceUnknown,
    StorageError,
)
from ._events import emit
from ._ledger import PICO, Ledger, ledger_for
from ._pipeline import (
    PROCEED,
    Blocking,
    CallRecord,
    PromptFn,
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

P = ParamSpec("P")
R = TypeVar("R")

_PERIODS = ("hour", "day", "week", "month", "total")
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


def _usd(pico: int) -> Decimal:
    return (Decimal(pico) / PICO).normalize()


def _pico(usd: Decimal) -> int:
    """Whole pico-dollars, rounded up; never negative (nothing takes spend off a ledger)."""
    return max(int((usd * PICO).to_integral_value(rounding=ROUND_CEILING)), 0)


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
        self._ledger: Ledger | None = None
        self._remote = False

    # -- plumbing ------------------------------------------------------------------------
    def ledger(self, storage: str | None = None) -> Ledger:
        """The ledger on this budget's storage (or on ``storage``, for the operator API)."""
        if storage is not None and storage != self.storage_uri:
            validate_uri(storage)
            return ledger_for(open_storage(storage))
        if self._ledger is None:
            opened = open_storage(self.storage_uri)
            self._ledger = ledger_for(opened)
            self._remote = opened.remote
        return self._ledger

    def _window(self) -> tuple[str, datetime | None, datetime | None, float | None]:
        now = datetime.fromtimestamp(self.clock(), self.tz)
        start, end = window_of(self.period, now)
        window_id = (
            "total" if start is None else start.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S")
        )
        ttl = None if end is None else max((end - now).total_seconds(), 1.0) + 86400
        return window_id, start, end, ttl

    def _ledger_key(self, name: str, key: str | None, window_id: str) -> str:
        return f"llmguard:budget:{name}:{key or '-'}:{window_id}"

    def status(self, name: str, key: str | None, storage: str | None = None) -> BudgetStatus:
        window_id, start, end, _ = self._window()
        spent, reserved = self.ledger(storage).status(
            self._ledger_key(name, key, window_id), int(self.clock() * 1000)
        )
        return self._status(name, key, spent, reserved, start, end)

    def _status(
        self,
        name: str,
        key: str | None,
        spent: int,
        reserved: int,
        start: datetime | None,
        end: datetime | None,
    ) -> BudgetStatus:
        return BudgetStatus(
            name=name,
            key=key,
            limit_usd=self.limit,
            spent_usd=_usd(spent),
            reserved_usd=_usd(reserved),
            remaining_usd=max(_usd(self.limit_pico - spent - reserved), Decimal(0)),
            window_start=start,
            resets_at=end,
        )

    def reset(self, name: str, key: str | None, storage: str | None = None) -> None:
        window_id, *_ = self._window()
        self.ledger(storage).reset(self._ledger_key(name, key, window_id))

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
        if estimate is None:
            if self.unknown_price == "refuse":
                raise PriceUnknown(
                    f"budget {name!r} cannot be enforced: no price for model {model!r}. Add one "
                    f"with llmguard.set_price({model!r}, input_per_mtok=..., output_per_mtok=...)"
                )
            estimate = Decimal(0)
        if self.max_call is not None and estimate > self.max_call:
            raise CallTooExpensive(
                f"{call.spec.name}: this call could cost up to ${estimate} on {model}, above "
                f"budget {name!r}'s max_call_usd ${self.max_call}: shorten the prompt or lower "
                "max_tokens",
                budget=name,
                key=key,
                limit_usd=self.limit,
                spent_usd=Decimal(0),
                reserved_usd=Decimal(0),
                estimate_usd=estimate,
                resets_at=None,
            )
        window_id, start, end, ttl = self._window()
        ledger_key = self._ledger_key(name, key, window_id)
        rid = os.urandom(8).hex()
        amount = _pico(estimate)
        now_ms = int(self.clock() * 1000)
        try:
            ledger = self.ledger()
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
            if not self.fail_open:
                raise BudgetUnavailable(
                    f"budget {name!r}: its ledger cannot be reached ({exc}); calls are refused "
                    "rather than run unmetered. @budget(fail_open=True) lets them through."
                ) from exc
            emit("warning", "budget_unavailable", {"budget": name, "error": str(exc)[:300]})
            return (yield PROCEED)
        if not ok:
            status = self._status(name, key, spent, reserved, start, end)
            call.fields["budget_remaining_usd"] = float(status.remaining_usd)
            if self.on_exceed == "raise":
                raise BudgetExceeded(
                    f"budget {name!r}{'' if key is None else f' (key {key!r})'} would be exceeded: "
                    f"limit ${self.limit}, spent ${status.spent_usd}, reserved "
                    f"${status.reserved_usd}, this call up to ${estimate}; resets "
                    f"{'never (per=total)' if end is None else end.isoformat()}",
                    budget=name,
                    key=key,
                    limit_usd=self.limit,
                    spent_usd=status.spent_usd,
                    reserved_usd=status.reserved_usd,
                    estimate_usd=estimate,
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
        settle = functools.partial(self._settle, call, name, key, ledger_key, rid or None)
        try:
            result = yield PROCEED
        except BaseException as exc:  # interrupts and cancellations release it too
            cost = self._attempt_cost(call, None, exc, reported_before, estimate)
            yield from settle(_pico(cost), ttl, start, end)
            raise
        if is_stream(result):  # hold the reservation until the stream has been consumed

            def at_end(tally: StreamTally, error: BaseException | None) -> None:
                cost = call.stream_cost(tally)[1]
                _run_inline(settle(_pico(cost if cost is not None else estimate), ttl, start, end))

            return wrap_stream(result, at_end)
        cost = self._attempt_cost(call, result, None, reported_before, estimate)
        yield from settle(_pico(cost), ttl, start, end)
        return result

    @staticmethod
    def _attempt_cost(
        call: CallRecord,
        result: Any,
        error: BaseException | None,
        reported_before: int,
        estimate: Decimal,
    ) -> Decimal:
        """What this attempt cost: the usage it reported, else nothing if it failed, else
        the call's metering (an estimate), else the reserved worst case."""
        metering = call.meter(result, error)  # also takes in the result's own usage
        if len(call.usages) > reported_before:
            cost = call.usage_totals(since=reported_before)[1]
        elif error is not None:
            return Decimal(0)  # nothing was billed: release the reservation
        else:
            cost = metering.cost
        return cost if cost is not None else estimate

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
            emit("warning", "budget_unavailable", {"budget": name, "error": str(exc)[:300]})
            return
        status = self._status(name, key, spent, reserved, start, end)
        call.fields["budget_spent_usd"] = float(status.spent_usd)
        call.fields["budget_remaining_usd"] = float(status.remaining_usd)
        if self.alert_at and self.limit_pico:
            fraction = spent / self.limit_pico
            for threshold in self.alert_at:
                if fraction >= threshold:
                    yield from self._alert(ledger_key, threshold, status, ttl)

    def _alert(
        self, ledger_key: str, threshold: float, status: BudgetStatus, ttl: float | None
    ) -> Generator[Any, Any, None]:
        storage = open_storage(self.storage_uri)
        flag = functools.partial(storage.add, f"{ledger_key}:alert:{threshold}", b"1", ttl)
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
        if self.on_alert is not None:
            self.on_alert(status)


def _run_inline(steps: Generator[Any, Any, Any]) -> Any:
    """Drive a layer's generator outside a call (a stream's end): blocking steps run here."""
    sent: Any = None
    while True:
        try:
            instruction = steps.send(sent)
        except StopIteration as stop:
            return stop.value
        sent = instruction.fn() if isinstance(instruction, Blocking) else None


def budget(
    *,
    usd: float | str | Decimal,
    per: str | timedelta = "day",
    name: str | None = None,
    key: Callable[..., Any] | None = None,
    on_exceed: str | Callable[[BudgetStatus], Any] = "raise",
    alert_at: tuple[float, ...] = (0.5, 0.8, 1.0),
    on_alert: Callable[[BudgetStatus], Any] | None = None,
    max_call_usd: float | str | Decimal | None = None,
    storage: str | None = None,
    tz: str = "UTC",
    reservation_ttl: float = 300,
    unknown_price: str = "refuse",
    default_output_tokens: int = 1024,
    fail_open: bool = False,
    clock: Callable[[], float] = time.time,
    model: str | _Unset | None = UNSET,
    prompt: PromptFn | _Unset | None = UNSET,
    log_content: bool | _Unset = UNSET,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Cap spend at ``usd`` per ``per`` ("hour", "day", "week", "month", "total" or a
    timedelta), calendar-aligned in ``tz``.

    Before each call its worst case (estimated prompt x input price + output budget x output
    price, on the model it will use) is reserved atomically, only if it fits; otherwise
    ``on_exceed``: ``"raise"`` (``BudgetExceeded``), ``"warn"`` (log and proceed), or a
    callable whose return value replaces the call. After the call the reservation is released
    and the real cost (usage, else the estimate) added; on an exception without usage,
    released. Budgets with the same ``name`` share one ledger across functions, processes
    and (with Redis) machines; ``key`` (given the call's arguments by name, e.g.
    ``key=lambda user, **_: user``) gives one budget per user or tenant.
    ``max_call_usd`` refuses any single call that could cost more (``CallTooExpensive``).
    ``alert_at`` thresholds log one ``budget_alert`` per window (across processes) and call
    ``on_alert(status)``. An unreachable ledger refuses calls (``BudgetUnavailable``) unless
    ``fail_open``; a model without a price is refused (``PriceUnknown``) unless
    ``unknown_price="allow"``. The decorated function gains ``budget_status(key=None)``.
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
    if not (isinstance(on_exceed, str) and on_exceed in ("raise", "warn")) and (
        isinstance(on_exceed, str) or not callable(on_exceed)
    ):
        raise validate.refuse(
            where,
            "on_exceed",
            on_exceed,
            "on_exceed must be 'raise', 'warn' or a callable given the BudgetStatus, whose "
            "return value replaces the call",
        )
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
    validate.integer(
        default_output_tokens,
        "default_output_tokens",
        decorator=where,
        minimum=0,
        maximum=validate.MAX_TOKENS,
        meaning="the output budget assumed when a call gives no max_tokens",
    )
    validate.flag(fail_open, "fail_open", decorator=where)
    validate.function(clock, "clock", decorator=where, allow_none=False)
    options = {"model": model, "prompt": prompt, "log_content": log_content}
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
    )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        wrapper = guard(func, decorator="budget", layer=layer, options=options)
        budget_name = name or _full(func)
        with _registry_lock:
            _registry[budget_name] = layer
        wrapper.budget_status = lambda key=None: layer.status(budget_name, key)
        return wrapper  # type: ignore[no-any-return]

    return decorate


def _full(func: Any) -> str:
    return full_name(original(getattr(func, "__func__", func)))  # classmethods too


def _layer(name: str) -> _BudgetLayer:
    with _registry_lock:
        layer = _registry.get(name)
    if layer is None:
        raise ConfigurationError(
            f"no budget named {name!r} in this process: decorate a function with "
            f"@budget(name={name!r}, ...) first"
        )
    return layer


def budget_status(name: str, key: str | None = None, storage: str | None = None) -> BudgetStatus:
    """The state of budget ``name`` (for ``key``) in its current window."""
    return _layer(name).status(name, key, storage)


def reset_budget(name: str, key: str | None = None, storage: str | None = None) -> None:
    """Forget the spend of budget ``name`` (for ``key``) in its current window."""
    _layer(name).reset(name, key, storage)

"""Every option of every decorator (and of configure()) is checked at decoration time:
malformed values raise ConfigurationError naming the option and the value, never another
exception, never acceptance."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmguard
from llmguard import ConfigurationError

NAN = float("nan")
INF = float("inf")


def target(text: str, *, model: str = "gpt-4o") -> str:
    return text


# -- malformed values, by what an option takes ------------------------------------------------

_WRONG_TYPES: list[Any] = [object(), [], {}, b"x", 1j, (1,)]
_HUGE_NUMBERS = st.one_of(st.floats(min_value=4e9), st.integers(min_value=2**53))
_NEGATIVE_NUMBERS = st.one_of(st.floats(max_value=-1e-9), st.integers(max_value=-1))
_NON_FINITE = st.sampled_from([NAN, INF, -INF])


def _strategy(*fixed: Any, extra: Any = None) -> Any:
    parts = [st.sampled_from(list(fixed))]
    if extra is not None:
        parts.append(extra)
    return st.one_of(*parts)


_TAGS = _strategy(
    ["feature"], "feature", 5, {"bad name": "x"}, {1: "x"}, {"": "x"}, {"feature": ["a"]}
)


def _seconds(zero_ok: bool, none_ok: bool = True, strings: bool = False) -> Any:
    fixed = [True, False, "", *_WRONG_TYPES]
    if not strings:
        fixed += ["5", "1s"]
    else:
        fixed += [" ", "7 days", "7y", "-5s", "nan", "inf", "1e3s", timedelta(seconds=-1)]
        fixed += [timedelta.max]
        if not zero_ok:
            fixed += [timedelta(0), "0s"]
    if not zero_ok:
        fixed += [0, 0.0, -0.0]
    if not none_ok:
        fixed += [None]
    return _strategy(*fixed, extra=st.one_of(_NON_FINITE, _NEGATIVE_NUMBERS, _HUGE_NUMBERS))


def _integers(none_ok: bool, zero_ok: bool = False) -> Any:
    fixed = [True, False, "", "5", 1.5, 1.0, NAN, INF, -INF, *_WRONG_TYPES, Decimal(5)]
    if not none_ok:
        fixed.append(None)
    low = -1 if zero_ok else 0
    return _strategy(
        *fixed,
        extra=st.one_of(st.integers(max_value=low), st.integers(min_value=2**53)),
    )


def _usd(none_ok: bool) -> Any:
    fixed = [
        True,
        False,
        "",
        " ",
        "abc",
        "NaN",
        "sNaN",
        "Infinity",
        "-Infinity",
        "-1",
        "1e999999",
        "1e13",
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-0.01"),
        NAN,
        INF,
        -INF,
        *_WRONG_TYPES,
    ]
    if not none_ok:
        fixed.append(None)
    return _strategy(*fixed, extra=st.one_of(_NEGATIVE_NUMBERS, st.integers(min_value=10**13)))


def _callable(none_ok: bool = True) -> Any:
    fixed = [5, "f", "", b"", True, object(), [], 1.5]
    if not none_ok:
        fixed.append(None)
    return _strategy(*fixed)


_FLAG = _strategy(0, 1, "yes", "", None, 1.0, "True", [])


def _text(none_ok: bool, *more: Any) -> Any:
    fixed = ["", "   ", 5, 1.5, b"x", True, False, [], object(), *more]
    if not none_ok:
        fixed.append(None)
    return _strategy(*fixed)


_FRACTION = _strategy(0, 0.0, -0.5, 1.5, 2, NAN, INF, -INF, True, False, "0.5", "", *_WRONG_TYPES)
_STORAGE = _strategy(
    "",
    "   ",
    "ftp://x",
    "nosuch://y",
    "redis://localhost:notaport/0",
    "redis://localhost:6379/0?socket_timeout=soon",
    "file:///tmp/llmguard-x?size_limit=0",
    "file:///tmp/llmguard-x?size_limit=-5",
    "file:///tmp/llmguard-x?size_limit=lots",
    5,
    True,
    b"local",
    [],
    object(),
)
_RATE = _strategy(
    "",
    "   ",
    "0/second",
    "0 per 1 minute",
    "1/0second",
    "1 per 0 seconds",
    "-1/second",
    "abc",
    "1/second;",
    "1/fortnight",
    f"{10**13}/second",
    "1/999999999 year",
    "1/second;0/minute",
    5,
    1.5,
    True,
    b"1/second",
    [],
    object(),
)

_GUARD_OPTIONS = _strategy("yes", 5, 1.5, b"x", [], {"no_such_option": 1}, object(), "")

# decorator -> (how to apply it, the options it needs besides the one under test,
#               {option: malformed values})
Apply = Callable[[dict[str, Any]], Any]


def _decorate(factory: Callable[..., Any]) -> Apply:
    return lambda options: factory(**options)(target)


SPECS: dict[str, tuple[Apply, dict[str, Any], dict[str, Any]]] = {
    "cached": (
        _decorate(llmguard.cached),
        {},
        {
            "ttl": _seconds(zero_ok=False, strings=True),
            "ignore": _strategy(5, [5], [""], None, object(), b"x", [None], ""),
            "key": _callable(),
            "version": _strategy(1.5, NAN, b"v", [], object(), True, ""),
            "cache_if": _callable(),
            "stale_if_error": _FLAG,
            "stale_ttl": _seconds(zero_ok=False, strings=True),
            "storage": _STORAGE,
            "namespace": _text(False),
            "serializer": _text(False, "yaml", "JSON"),
            "lock_timeout": _seconds(zero_ok=False, none_ok=False, strings=True),
            "clock": _callable(none_ok=False),
            "sleep": _callable(),
            "async_sleep": _callable(),
            "model": _text(True),
            "prompt": _callable(),
            "log_content": _FLAG,
            "tags": _TAGS,
        },
    ),
    "rate_limited": (
        _decorate(llmguard.rate_limited),
        {"rate": "10/second"},
        {
            "rate": _RATE,
            "tokens": _RATE,
            "name": _text(True),
            "key": _callable(),
            "block": _FLAG,
            "max_wait": _seconds(zero_ok=True),
            "clock": _callable(none_ok=False),
            "storage": _STORAGE,
            "default_output_tokens": _integers(none_ok=False, zero_ok=True),
            "margin": _seconds(zero_ok=True),
            "on_storage_error": _strategy("ignore", "", None, True, 5, "Allow"),
            "sleep": _callable(),
            "async_sleep": _callable(),
            "model": _text(True),
            "prompt": _callable(),
            "log_content": _FLAG,
            "tags": _TAGS,
        },
    ),
    "retry_on_rate_limit": (
        _decorate(llmguard.retry_on_rate_limit),
        {},
        {
            "max_tries": _integers(none_ok=False),
            "max_time": _seconds(zero_ok=False),
            "max_wait": _seconds(zero_ok=False, none_ok=False),
            "initial_wait": _seconds(zero_ok=False, none_ok=False),
            "server_errors": _FLAG,
            "retry_on": _strategy((int,), [ValueError, 5], 5, "ValueError", None, object(), int),
            "jitter": _callable(),
            "clock": _callable(none_ok=False),
            "sleep": _callable(),
            "async_sleep": _callable(),
            "model": _text(True),
            "prompt": _callable(),
            "log_content": _FLAG,
            "tags": _TAGS,
        },
    ),
    "budget": (
        _decorate(llmguard.budget),
        {"usd": 1},
        {
            "usd": _usd(none_ok=False),
            "per": _strategy(
                "fortnight",
                "",
                "Day",
                timedelta(0),
                timedelta(microseconds=1),
                timedelta(microseconds=999_999),
                timedelta(days=-1),
                timedelta.max,
                5,
                None,
                True,
                *_WRONG_TYPES,
            ),
            "name": _text(True),
            "key": _callable(),
            "on_exceed": _strategy("explode", "", 5, None, True, b"raise", []),
            "alert_at": _strategy(
                0.5, "0.5", (0,), (1.5,), (NAN,), (True,), [-0.1], None, ((0.5,),), ("0.5",), 1
            ),
            "on_alert": _callable(),
            "max_call_usd": _usd(none_ok=True),
            "storage": _STORAGE,
            "tz": _text(False, "Mars/Olympus", "/etc/passwd", "../etc", "UTC\x00"),
            "reservation_ttl": _seconds(zero_ok=False, none_ok=False),
            "unknown_price": _text(False, "deny", "Refuse"),
            "default_output_tokens": _integers(none_ok=False, zero_ok=True),
            "fail_open": _FLAG,
            "burn_alert": _strategy("fortnight", "", -1, "0s", True, []),
            "max_wait": _seconds(zero_ok=True, none_ok=False),
            "sleep": _callable(),
            "async_sleep": _callable(),
            "clock": _callable(none_ok=False),
            "model": _text(True),
            "prompt": _callable(),
            "log_content": _FLAG,
            "tags": _TAGS,
        },
    ),
    "route_model": (
        _decorate(llmguard.route_model),
        {"default": "gpt-4o", "cheap": "gpt-4o-mini", "budget": "b"},
        {
            "default": _text(False),
            "cheap": _text(True),
            "when": _callable(),
            "cheap_below_tokens": _integers(none_ok=True),
            "fallbacks": _strategy("gpt-4o-mini", 5, [5], [""], None, object(), [None]),
            "downgrade_at": _FRACTION,
            "budget": _text(True),
            "param": _text(False, "not a name", "1model"),
            "critical_param": _text(False, "not a name"),
            "prompt": _callable(),
            "log_content": _FLAG,
            "tags": _TAGS,
        },
    ),
    "debounced": (
        _decorate(llmguard.debounced),
        {},
        {
            "wait": _seconds(zero_ok=False, none_ok=False),
            "key": _callable(),
            "clock": _callable(none_ok=False),
            "sleep": _callable(),
            "async_sleep": _callable(),
            "model": _text(True),
            "prompt": _callable(),
            "log_content": _FLAG,
            "tags": _TAGS,
        },
    ),
    "track": (
        _decorate(llmguard.track),
        {},
        {"model": _text(True), "prompt": _callable(), "log_content": _FLAG, "tags": _TAGS},
    ),
    "guard": (
        _decorate(llmguard.guard),
        {"retry": True},
        {
            "cache": _GUARD_OPTIONS,
            "route": _GUARD_OPTIONS,
            "budget": _GUARD_OPTIONS,
            "retry": _GUARD_OPTIONS,
            "rate": _strategy(5, 1.5, b"x", [], {"no_such_option": 1}, object(), "", "0/second"),
            "tags": _TAGS,
        },
    ),
    "configure": (
        lambda options: llmguard.configure(**options),
        {},
        {
            "storage": _STORAGE,
            "cache_dir": _strategy("", "  ", 5, True, b"/tmp/x", [], object(), 1.5),
            "cache_size_limit": _integers(none_ok=True),
        },
    ),
}

FACTORIES: dict[str, Callable[..., Any]] = {
    "cached": llmguard.cached,
    "rate_limited": llmguard.rate_limited,
    "retry_on_rate_limit": llmguard.retry_on_rate_limit,
    "budget": llmguard.budget,
    "route_model": llmguard.route_model,
    "debounced": llmguard.debounced,
    "track": llmguard.track,
    "guard": llmguard.guard,
    "configure": llmguard.configure,
}
CASES = [(name, option) for name, (_, _, options) in SPECS.items() for option in options]


def test_every_option_of_every_decorator_is_covered() -> None:
    for name, factory in FACTORIES.items():
        taken = {
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.kind is not p.POSITIONAL_ONLY
        }
        assert taken == set(SPECS[name][2]), name


def _shown(value: Any) -> str | None:
    """The value as the message must show it (None: too long or not worth checking)."""
    if isinstance(value, (bool, int, float, str, bytes, Decimal, timedelta)) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else None
    return None


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_malformed_options_fail_at_decoration(data: Any) -> None:
    name, option = data.draw(st.sampled_from(CASES), label="option")
    apply, base, options = SPECS[name]
    value = data.draw(options[option], label="value")
    with pytest.raises(ConfigurationError) as info:
        apply({**base, option: value})
    message = str(info.value)
    assert option in message
    shown = _shown(value)
    if shown is not None and name != "guard":
        assert shown in message, (message, shown)


def test_valid_options_are_still_accepted() -> None:
    for options in (
        {"ttl": "7d", "stale_ttl": None, "lock_timeout": timedelta(seconds=0.5)},
        {"ttl": 0.5, "ignore": "text", "version": 2, "namespace": "ns"},
        {"ttl": timedelta(days=365 * 99), "lock_timeout": "2m"},
    ):
        llmguard.cached(**options)(target)
    llmguard.rate_limited("10 per 2 seconds;500/minute", tokens="200000/minute", max_wait=0)(target)
    llmguard.rate_limited(tokens="1/year", margin=0)(target)
    llmguard.retry_on_rate_limit(max_tries=1, max_time=None, retry_on=[KeyError])(target)
    llmguard.budget(usd=Decimal("0.000001"), per=timedelta(seconds=1), alert_at=[1])(target)
    llmguard.budget(usd="1000000", per="total", max_call_usd=0)(target)
    llmguard.budget(usd=0.5, tz="Europe/Paris", reservation_ttl=1)(target)
    llmguard.route_model("gpt-4o", cheap="m", downgrade_at=1, budget="b", fallbacks=["x"])(target)
    llmguard.debounced(wait=86400)(target)
    llmguard.guard(cache={"ttl": "1h"}, rate="1/second")(target)
    llmguard.configure(cache_dir="/tmp/somewhere", cache_size_limit=1, storage="memory://")


# -- the cases issue 12 names, each accepted (or raised something else) before ------------


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: llmguard.rate_limited("0/second"), "rate"),
        (lambda: llmguard.rate_limited("1/0second"), "rate"),
        (lambda: llmguard.rate_limited(tokens="0/minute"), "tokens"),
        (lambda: llmguard.rate_limited("1/second", max_wait=NAN), "max_wait"),
        (lambda: llmguard.rate_limited("1/second", margin=NAN), "margin"),
        (lambda: llmguard.retry_on_rate_limit(max_time=NAN), "max_time"),
        (lambda: llmguard.retry_on_rate_limit(max_wait=True), "max_wait"),
        (lambda: llmguard.budget(usd=1, reservation_ttl=NAN), "reservation_ttl"),
        (lambda: llmguard.budget(usd=1, reservation_ttl=INF), "reservation_ttl"),
        (lambda: llmguard.budget(usd="1e999999"), "usd"),
        (lambda: llmguard.budget(usd=1, per=timedelta(microseconds=1)), "per"),
        (lambda: llmguard.budget(usd=1, per=timedelta.max), "per"),
        (lambda: llmguard.budget(usd=1, alert_at=0.5), "alert_at"),
        (lambda: llmguard.budget(usd=1, alert_at=(True,)), "alert_at"),
        (lambda: llmguard.budget(usd=1, tz=5), "tz"),  # type: ignore[arg-type]
        (lambda: llmguard.debounced(wait=INF), "wait"),
        (lambda: llmguard.route_model("m", fallbacks=5), "fallbacks"),  # type: ignore[arg-type]
        (lambda: llmguard.route_model("m", cheap="c", cheap_below_tokens=True), "cheap"),
        (lambda: llmguard.cached(ignore=5), "ignore"),  # type: ignore[arg-type]
        (lambda: llmguard.cached(lock_timeout=None), "lock_timeout"),  # type: ignore[arg-type]
        (lambda: llmguard.cached(ttl="99999999999999999999d"), "ttl"),
        (lambda: llmguard.guard(cache={"tll": "7d"}), "tll"),
        (lambda: llmguard.configure(cache_size_limit=True), "cache_size_limit"),
        (lambda: llmguard.configure(cache_dir=5), "cache_dir"),  # type: ignore[arg-type]
    ],
)
def test_named_cases_fail_at_decoration(make: Callable[[], Any], option: str) -> None:
    def decorate() -> None:
        result = make()
        if callable(result):
            result(target)

    with pytest.raises(ConfigurationError, match=option):
        decorate()


def test_messages_say_what_would_do() -> None:
    with pytest.raises(ConfigurationError) as info:
        llmguard.rate_limited("0/second")
    assert "rate='0/second'" in str(info.value)
    assert "from 1" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        llmguard.cached(ttl=NAN)
    assert "ttl=nan" in str(info.value)
    assert "'7d'" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        llmguard.guard(cache={"tll": "7d"})
    assert "'tll'" in str(info.value)
    assert "ttl" in str(info.value)


def test_a_refused_configure_changes_nothing() -> None:
    llmguard.configure(storage="memory://")
    with pytest.raises(ConfigurationError):
        llmguard.configure(storage="memory://other", cache_size_limit=-1)
    assert llmguard.open_storage().uri == "memory://"


def test_a_zero_rate_is_refused_instead_of_waited_on() -> None:
    # Before: accepted, waited max_wait, then "it would allow this call in 1.050s".
    with pytest.raises(ConfigurationError, match="0 calls per window"):
        llmguard.rate_limited("0/second", storage="memory://", sleep=lambda s: None)


# -- cache keys of values that contain themselves ---------------------------------------------


@dataclasses.dataclass
class Node:
    name: str
    children: list[Any]


def _cycles() -> list[Any]:
    listed: list[Any] = [1]
    listed.append(listed)
    mapping: dict[str, Any] = {}
    mapping["self"] = mapping
    node = Node("root", [])
    node.children.append(node)
    nested: list[Any] = [[]]
    nested[0].append(nested)
    return [listed, mapping, node, nested, {"messages": [listed]}]


@pytest.mark.parametrize("value", _cycles(), ids=["list", "dict", "dataclass", "nested", "deep"])
def test_a_value_containing_itself_is_a_type_error(value: Any) -> None:
    runs: list[int] = []

    @llmguard.cached(storage="memory://")
    def ask(question: Any) -> str:
        runs.append(1)
        return "answer"

    with pytest.raises(TypeError, match="contains itself") as info:
        ask(value)
    assert "question" in str(info.value)
    assert "ignore=" in str(info.value)
    assert not isinstance(info.value, RecursionError)
    with pytest.raises(TypeError, match="contains itself"):
        ask.cache_key(value)
    assert runs == []


def test_a_value_containing_itself_is_a_type_error_async() -> None:
    @llmguard.cached(storage="memory://")
    async def ask(question: Any) -> str:
        return "answer"

    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(TypeError, match="contains itself"):
        asyncio.run(ask(looped))


def test_a_pydantic_model_containing_itself_is_a_type_error() -> None:
    import pydantic

    class Thread(pydantic.BaseModel):
        items: list[Any]

    thread = Thread(items=[])
    thread.items.append(thread)

    @llmguard.cached(storage="memory://")
    def ask(question: Any) -> str:
        return "answer"

    with pytest.raises(TypeError, match="question"):
        ask(thread)


def test_deep_but_finite_values_still_make_keys() -> None:
    deep: list[Any] = []
    for _ in range(200):
        deep = [deep]

    @llmguard.cached(storage="memory://")
    def ask(question: Any) -> str:
        return "answer"

    assert ask(deep) == "answer"
    assert ask.cache_info().hits == 0
    assert ask(deep) == "answer"
    assert ask.cache_info().hits == 1

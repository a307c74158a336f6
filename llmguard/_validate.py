"""Checking decorator options, once, at decoration time.

Every option of every decorator (and of ``configure()``) goes through one of the checks
below, so a wrong value fails where it is written, with a :class:`ConfigurationError` that
names the option, shows the value and says what would do instead::

    @cached(ttl=nan): ttl must be a finite number of seconds > 0, a timedelta or a string
    like '90s', '30m', '12h', '7d' (None: no expiry)

NaN, infinities, booleans where a number is expected, wrong types, empty strings and values
too large to mean anything (beyond 100 years, a trillion dollars, ...) are all refused here,
never discovered in the middle of a call.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Collection
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, overload

from ._errors import ConfigurationError, MissingExtra
from ._redact import redact_uri

MAX_SECONDS = 100 * 365 * 86400.0
"""The longest duration any option takes (100 years); longer ones are refused as nonsense
(and would overflow ``time.sleep``, ``threading`` timeouts and Redis expiries)."""

MAX_USD = Decimal(10) ** 6
"""The largest amount of money an option takes (a million dollars): ledgers count
pico-dollars in 64-bit integers (Redis), which hold about $9.2M, so a budget's limit plus
what calls in flight may still add stays representable."""

MAX_TOKENS = 10**7
"""The largest output budget of one call an option takes (ten million tokens)."""

MAX_RATE = 10**12
"""The largest number of requests or tokens a rate limit's window takes."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*$", re.ASCII)


def _shown(value: Any) -> str:
    text = repr(redact_uri(value) if isinstance(value, str) else value)  # any URI-like text
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(decorator: str, option: str, value: Any, requirement: str) -> ConfigurationError:
    """The error for ``decorator(option=value)``: ``requirement`` says what would do."""
    given = f"{option}={_shown(value)}"
    return ConfigurationError(
        f"{decorator}({given}): {requirement}" if decorator else f"{given}: {requirement}"
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _limit(number: float) -> str:
    return f"{number:g}"


@overload
def seconds(
    value: Any,
    option: str,
    *,
    decorator: str,
    allow_none: Literal[False] = ...,
    minimum: float = ...,
    inclusive: bool = ...,
    maximum: float = ...,
    durations: bool = ...,
    none_means: str = ...,
) -> float: ...


@overload
def seconds(
    value: Any,
    option: str,
    *,
    decorator: str,
    allow_none: bool,
    minimum: float = ...,
    inclusive: bool = ...,
    maximum: float = ...,
    durations: bool = ...,
    none_means: str = ...,
) -> float | None: ...


def seconds(
    value: Any,
    option: str,
    *,
    decorator: str,
    allow_none: bool = False,
    minimum: float = 0.0,
    inclusive: bool = False,
    maximum: float = MAX_SECONDS,
    durations: bool = False,
    none_means: str = "",
) -> float | None:
    """A duration in seconds: a finite number (not a bool) above ``minimum`` (or equal to
    it with ``inclusive``) and at most ``maximum``; with ``durations`` also a timedelta or
    ``"90s"``/``"30m"``/``"12h"``/``"7d"``/``"2w"``. None only with ``allow_none``
    (``none_means`` says what it means, for the message)."""
    bound = f">= {_limit(minimum)}" if inclusive else f"> {_limit(minimum)}"
    top = "at most 100 years" if maximum >= MAX_SECONDS else f"<= {_limit(maximum)}"
    what = "a duration" if durations else "a finite number of seconds"
    requirement = f"{option} must be {what} {bound} and {top}"
    if durations:
        requirement += " (seconds, a timedelta, or a string like '90s', '30m', '12h', '7d')"
    if allow_none:
        requirement += f"; None: {none_means or 'none'}"
    elif none_means:
        requirement += f" ({none_means})"
    if value is None:
        if allow_none:
            return None
        raise refuse(decorator, option, value, requirement)
    number: float
    if _number(value):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            raise refuse(decorator, option, value, requirement) from None
    elif durations and isinstance(value, datetime.timedelta):
        number = value.total_seconds()
    elif durations and isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise refuse(
                decorator,
                option,
                value,
                requirement + "; a string is a number and a unit s, m, h, d or w",
            )
        number = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise refuse(decorator, option, value, requirement)
    if (
        math.isnan(number)
        or number > maximum
        or number < minimum
        or (number == minimum and not inclusive)
    ):
        raise refuse(decorator, option, value, requirement)
    return number


@overload
def integer(
    value: Any,
    option: str,
    *,
    decorator: str,
    minimum: int,
    maximum: int,
    allow_none: Literal[False] = ...,
    meaning: str = ...,
) -> int: ...


@overload
def integer(
    value: Any,
    option: str,
    *,
    decorator: str,
    minimum: int,
    maximum: int,
    allow_none: bool,
    meaning: str = ...,
) -> int | None: ...


def integer(
    value: Any,
    option: str,
    *,
    decorator: str,
    minimum: int,
    maximum: int,
    allow_none: bool = False,
    meaning: str = "",
) -> int | None:
    """An int (not a bool) in ``[minimum, maximum]``; None only with ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        requirement = f"{option} must be an int from {minimum} to {maximum:,}"
        if meaning:
            requirement += f" ({meaning})"
        if allow_none:
            requirement += " or None"
        raise refuse(decorator, option, value, requirement)
    return int(value)


def fraction(value: Any, option: str, *, decorator: str, meaning: str = "") -> float:
    """A number in (0, 1] (not a bool, not NaN)."""
    if not _number(value) or not 0 < value <= 1:
        requirement = f"{option} must be a fraction in (0, 1], e.g. 0.8"
        if meaning:
            requirement += f" ({meaning})"
        raise refuse(decorator, option, value, requirement)
    return float(value)


def output_budget(value: Any, *, decorator: str) -> int:
    """``default_output_tokens``: the output budget a call without ``max_tokens`` is
    assumed to ask for (an int from 0 to :data:`MAX_TOKENS`)."""
    return integer(
        value,
        "default_output_tokens",
        decorator=decorator,
        minimum=0,
        maximum=MAX_TOKENS,
        meaning="the output budget assumed when a call gives no max_tokens",
    )


@overload
def usd(
    value: Any, option: str, *, decorator: str, allow_none: Literal[False] = ...
) -> Decimal: ...


@overload
def usd(value: Any, option: str, *, decorator: str, allow_none: bool) -> Decimal | None: ...


def usd(value: Any, option: str, *, decorator: str, allow_none: bool = False) -> Decimal | None:
    """An exact amount of USD >= 0: a Decimal, an int, a float (by its repr) or a numeric
    string such as ``"20"`` or ``"0.05"``; finite and at most :data:`MAX_USD`."""
    requirement = (
        f"{option} must be an amount of USD >= 0 and <= {MAX_USD:,}: a Decimal, a number or a "
        "numeric string such as '20' or '0.05'"
    ) + (" (None: no such limit)" if allow_none else "")
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, float, str)):
        raise refuse(decorator, option, value, requirement)
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise refuse(decorator, option, value, requirement) from None
    if not number.is_finite() or number < 0 or number > MAX_USD:
        raise refuse(decorator, option, value, requirement)
    return number + 0  # drops a negative zero's sign


def flag(value: Any, option: str, *, decorator: str) -> bool:
    """True or False (not 1, 0, "yes" or None)."""
    if not isinstance(value, bool):
        raise refuse(decorator, option, value, f"{option} must be True or False")
    return value


def function(
    value: Any, option: str, *, decorator: str, allow_none: bool = True, takes: str = ""
) -> Any:
    """A callable (a string is never one); None with ``allow_none``."""
    if value is None and allow_none:
        return None
    if not callable(value):
        requirement = f"{option} must be callable" + (f" ({takes})" if takes else "")
        if allow_none:
            requirement += " or None"
        raise refuse(decorator, option, value, requirement)
    return value


@overload
def text(
    value: Any,
    option: str,
    *,
    decorator: str,
    allow_none: Literal[False] = ...,
    meaning: str = ...,
    identifier: bool = ...,
) -> str: ...


@overload
def text(
    value: Any,
    option: str,
    *,
    decorator: str,
    allow_none: bool,
    meaning: str = ...,
    identifier: bool = ...,
) -> str | None: ...


def text(
    value: Any,
    option: str,
    *,
    decorator: str,
    allow_none: bool = False,
    meaning: str = "",
    identifier: bool = False,
) -> str | None:
    """A non-empty string (a Python identifier with ``identifier``); None with
    ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip() or (identifier and not value.isidentifier()):
        requirement = f"{option} must be a non-empty string" + (
            ", a parameter name" if identifier else ""
        )
        if meaning:
            requirement += f" ({meaning})"
        if allow_none:
            requirement += " or None"
        raise refuse(decorator, option, value, requirement)
    return value


def choice(value: Any, option: str, *, decorator: str, choices: Collection[str]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        names = ", ".join(repr(c) for c in choices)
        raise refuse(decorator, option, value, f"{option} must be one of {names}")
    return value


def storage(value: Any, option: str = "storage", *, decorator: str) -> str | None:
    """A storage URI a registered backend opens (None: the configured one)."""
    from ._storage import check_storage

    if value is None:
        check_storage(None)  # the configured storage's folder, if local
        return None

    if not isinstance(value, str) or not value.strip():
        raise refuse(
            decorator,
            option,
            value,
            f"{option} must be a storage URI such as 'local', 'memory://', "
            "'file:///var/lib/llmguard' or 'redis://host:6379/0' (None: the configured one)",
        )
    try:
        check_storage(value)  # the URI, and a local storage's folder
    except MissingExtra:
        raise  # already says what to install
    except ConfigurationError as exc:
        raise refuse(decorator, option, value, str(exc)) from None
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("redis", "rediss", "unix"):
        from redis.connection import parse_url  # present: validate_uri checked it

        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise refuse(decorator, option, value, f"not a Redis URL: {exc}") from None
    elif scheme == "file" and "?" in value:
        from urllib.parse import parse_qs, urlsplit

        for limit in parse_qs(urlsplit(value).query).get("size_limit", []):
            if not limit.isdigit() or not 1 <= int(limit) <= 2**50:
                raise refuse(
                    decorator,
                    option,
                    value,
                    f"size_limit={limit!r} must be a number of bytes from 1 to {2**50:,}",
                )
    return value


def strings(
    value: Any, option: str, *, decorator: str, meaning: str, allow_empty: bool = True
) -> tuple[str, ...]:
    """A sequence of non-empty strings (never one string: that is a common slip for a
    1-tuple), as a tuple."""
    requirement = f"{option} must be a tuple or list of {meaning}"
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, set, frozenset)):
        raise refuse(decorator, option, value, requirement)
    items = tuple(value)
    if not all(isinstance(item, str) and item.strip() for item in items):
        raise refuse(decorator, option, value, requirement)
    if not items and not allow_empty:
        raise refuse(decorator, option, value, requirement + " (at least one)")
    return items


def keywords(decorator: str, given: Collection[str], target: Callable[..., Any]) -> None:
    """Refuse option names ``target`` (a decorator factory) does not take, naming them."""
    import inspect

    parameters = inspect.signature(target).parameters
    known = [
        name
        for name, p in parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and not name.startswith("_")
    ]
    unknown = sorted(name for name in given if not isinstance(name, str) or name not in known)
    if unknown:
        raise ConfigurationError(
            f"{decorator} got unknown options {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(known)}"
        )

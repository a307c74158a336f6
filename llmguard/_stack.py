"""``@guard``: the recommended stack in one decorator.

The order, outermost first, and why:

1. cache: a hit costs nothing, so it must not be routed, reserved, retried or rate-limited;
2. route: picks the model the layers below work with (and falls back to another);
3. budget: reserves the worst case *for the routed model*, settles what was really spent;
4. retry: re-runs only what is below it, inside the one reservation;
5. rate limit: every attempt, retries included, takes a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from . import _validate as validate
from ._budget import budget as _budget
from ._cache import cached as _cached
from ._errors import ConfigurationError
from ._pipeline import GuardedFunction
from ._ratelimit import rate_limited as _rate_limited
from ._retry import retry_on_rate_limit as _retry
from ._route import route_model as _route
from ._tags import TagValues
from ._track import track as _track

P = ParamSpec("P")
R = TypeVar("R")

Options = Mapping[str, Any]


def _options(name: str, value: Any, decorator: Callable[..., Any]) -> dict[str, Any] | None:
    """The options for one policy: None to skip it, else a dict whose names ``decorator``
    takes (checked here, so a misspelt option fails like any other bad option)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        validate.keywords(f"@guard({name}=...)", value, decorator)
        return dict(value)
    raise validate.refuse(
        "@guard",
        name,
        value,
        f"{name} takes True (the decorator's defaults), a dict of its options, or None",
    )


def guard(
    *,
    cache: bool | Options | None = None,
    route: Options | None = None,
    budget: Options | None = None,
    retry: bool | Options | None = None,
    rate: str | Options | None = None,
    tags: TagValues | None = None,
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]:
    """Apply the policies in the recommended order: cache, route, budget, retry, rate limit.

    Each argument takes that decorator's options as a dict (``True`` for its defaults, a
    rate string for ``rate``); leave one out to skip that policy::

        @llmguard.guard(
            cache={"ttl": "7d"},
            route={"default": "gpt-4o", "cheap": "gpt-4o-mini", "cheap_below_tokens": 1500},
            budget={"usd": 20, "per": "day"},
            retry={"max_tries": 6},
            rate={"rate": "500/minute", "tokens": "200000/minute"},
        )
        def summarize(text: str, *, model: str = "gpt-4o") -> str: ...

    ``tags`` tags every call of the function (see ``llmguard.tags``).
    """
    layers: list[Callable[[Any], Any]] = []  # innermost first
    rate_options = (
        {"rate": rate} if isinstance(rate, str) else _options("rate", rate, _rate_limited)
    )
    if rate_options is not None:
        layers.append(_rate_limited(**rate_options))
    retry_options = _options("retry", retry, _retry)
    if retry_options is not None:
        layers.append(_retry(**retry_options))
    budget_options = _options("budget", budget, _budget)
    if budget_options is not None:
        layers.append(_budget(**budget_options))
    route_options = _options("route", route, _route)
    if route_options is not None:
        if "default" not in route_options:
            raise ConfigurationError(
                "@guard(route=...) needs 'default', the model to use by default"
            )
        layers.append(_route(**route_options))
    cache_options = _options("cache", cache, _cached)
    if cache_options is not None:
        layers.append(_cached(**cache_options))
    if not layers:
        raise ConfigurationError("@guard needs at least one of cache, route, budget, retry, rate")
    if tags is not None:
        layers.append(_track(tags=tags))  # checked now: bad tags fail at decoration

    def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
        wrapped: Any = func
        for layer in layers:
            wrapped = layer(wrapped)
        return wrapped  # type: ignore[no-any-return]

    return decorate

"""Model prices: genai-prices (maintained upstream), user overrides, exact Decimal costs.

A model's price is looked up once per process and reused: a genai-prices lookup per call
would cost more than the rest of a call's metering. Only a lookup that completed is kept
(a price, or "unknown"): one cut short by an interrupt is not remembered, and one that
failed (genai-prices cannot be imported, say) is tried again ``RETRY_AFTER`` seconds later.
``set_price()`` adds or overrides a model. An unknown model costs ``None`` (never a silent
0) and warns once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._errors import ConfigurationError
from ._events import warn_once

_MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Tiered:
    """A price that changes with the prompt size (cliff pricing, as genai-prices models it):
    once the call's total input tokens exceed ``start``, every token pays that tier's price."""

    base: Decimal
    tiers: tuple[tuple[int, Decimal], ...]

    def at(self, total_input_tokens: int) -> Decimal:
        price = self.base
        for start, tier_price in self.tiers:
            if total_input_tokens > start:
                price = tier_price
        return price


PerMTok = Decimal | Tiered


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens for one model. Missing cached / cache-write prices fall back
    to the input price."""

    model: str
    input_per_mtok: PerMTok
    output_per_mtok: PerMTok
    cached_input_per_mtok: PerMTok | None = None
    cache_write_per_mtok: PerMTok | None = None
    source: str = "genai-prices"

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> Decimal:
        """Exact USD cost. ``input_tokens`` is the call's whole input, *including* the
        cached and cache-write tokens (OpenAI's ``prompt_tokens`` convention). Negative
        counts count as 0: a cost is never negative."""
        if (
            input_tokens < 0
            or output_tokens < 0
            or cached_input_tokens < 0
            or cache_write_tokens < 0
        ):
            input_tokens, output_tokens = max(input_tokens, 0), max(output_tokens, 0)
            cached_input_tokens, cache_write_tokens = (
                max(cached_input_tokens, 0),
                max(cache_write_tokens, 0),
            )
        if not cached_input_tokens and not cache_write_tokens:
            return (
                input_tokens * _at(self.input_per_mtok, input_tokens)
                + output_tokens * _at(self.output_per_mtok, input_tokens)
            ) / _MILLION
        uncached = max(input_tokens - cached_input_tokens - cache_write_tokens, 0)
        cached_price = self.cached_input_per_mtok or self.input_per_mtok
        write_price = self.cache_write_per_mtok or self.input_per_mtok
        total = (
            uncached * _at(self.input_per_mtok, input_tokens)
            + cached_input_tokens * _at(cached_price, input_tokens)
            + cache_write_tokens * _at(write_price, input_tokens)
            + output_tokens * _at(self.output_per_mtok, input_tokens)
        )
        return total / _MILLION


def _at(price: PerMTok, total_input_tokens: int) -> Decimal:
    return price if isinstance(price, Decimal) else price.at(total_input_tokens)


_overrides: dict[str, ModelPrice] = {}
_cache: dict[str, ModelPrice | None] = {}
_failed: dict[str, float] = {}  # model -> when its failed lookup may be tried again
_lock = threading.Lock()
_clock = time.monotonic

RETRY_AFTER = 60.0
"""Seconds before a lookup that failed (not one that found the model unknown) is tried
again: a broken price table costs one attempt per model per minute, not one per call."""


def _decimal(value: Any, what: str) -> Decimal:
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except Exception:
        raise ConfigurationError(
            f"{what} must be a number of USD per million tokens, got {value!r}"
        ) from None
    if not number.is_finite() or number < 0:
        raise ConfigurationError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def set_price(
    model: str,
    *,
    input_per_mtok: float | str | Decimal,
    output_per_mtok: float | str | Decimal,
    cached_input_per_mtok: float | str | Decimal | None = None,
    cache_write_per_mtok: float | str | Decimal | None = None,
) -> ModelPrice:
    """Add or override a model's price, in USD per million tokens.

    Takes effect at once for every later call in this process; matched on the exact model
    name (case-insensitive), before genai-prices is consulted.

    >>> import llmguard
    >>> llmguard.set_price("my-finetune", input_per_mtok=3, output_per_mtok=12)  # doctest: +SKIP
    ModelPrice(model='my-finetune', ...)
    """
    if not isinstance(model, str) or not model:
        raise ConfigurationError("set_price needs a model name")
    price = ModelPrice(
        model=model,
        input_per_mtok=_decimal(input_per_mtok, "input_per_mtok"),
        output_per_mtok=_decimal(output_per_mtok, "output_per_mtok"),
        cached_input_per_mtok=None
        if cached_input_per_mtok is None
        else _decimal(cached_input_per_mtok, "cached_input_per_mtok"),
        cache_write_per_mtok=None
        if cache_write_per_mtok is None
        else _decimal(cache_write_per_mtok, "cache_write_per_mtok"),
        source="override",
    )
    with _lock:
        _overrides[model.lower()] = price
        _cache.clear()
        _failed.clear()
    return price


def reset_prices() -> None:
    """Drop every ``set_price()`` override and the per-model lookup cache (for tests)."""
    with _lock:
        _overrides.clear()
        _cache.clear()
        _failed.clear()


def _convert(value: Any) -> PerMTok | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    base = getattr(value, "base", None)
    tiers = getattr(value, "tiers", None)
    if isinstance(base, Decimal) and tiers is not None:
        return Tiered(base, tuple(sorted((int(t.start), Decimal(t.price)) for t in tiers)))
    return Decimal(str(value))


def _lookup_genai_prices(model: str) -> ModelPrice | None:
    try:
        from genai_prices import Usage, calc_price

        calc = calc_price(Usage(input_tokens=0, output_tokens=0), model)
    except LookupError:
        return None
    mp = calc.model_price
    input_price = _convert(getattr(mp, "input_mtok", None))
    output_price = _convert(getattr(mp, "output_mtok", None))
    if input_price is None or output_price is None:
        return None
    return ModelPrice(
        model=model,
        input_per_mtok=input_price,
        output_per_mtok=output_price,
        cached_input_per_mtok=_convert(getattr(mp, "cache_read_mtok", None)),
        cache_write_per_mtok=_convert(getattr(mp, "cache_write_mtok", None)),
    )


def load_price_table() -> None:
    """Load genai-prices' table now (~0.3 s: a server's start-up) rather than in the first
    call that needs a price. A table that cannot be loaded warns once, as a lookup would."""
    try:
        import genai_prices  # noqa: F401 - importing it builds the table
    except Exception as exc:
        warn_once(
            "*", "price_lookup_failed", model=None, error=f"{type(exc).__name__}: {exc}"[:300]
        )


def _interrupt_behind(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or other BaseException that is not an Exception) that ``exc``
    was raised because of, if any: Python 3.11 turns one that lands while a class is being
    built (genai-prices' dataclasses, on its first import) into a RuntimeError."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if not isinstance(cause, Exception):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def get_price(model: str) -> ModelPrice | None:
    """The price of ``model`` (override first, then genai-prices), or None if unknown.

    Looked up once per model per process; an unknown model warns once
    (``unknown_model_price`` event) and returns None. A lookup that failed warns once
    (``price_lookup_failed``), returns None and is tried again after ``RETRY_AFTER``
    seconds; one cut short by an interrupt is not remembered at all.
    """
    try:
        return _cache[model]
    except KeyError:
        pass
    key = model.lower()
    price = _overrides.get(key)
    if price is None and "/" in key:  # "openai/gpt-4o"
        price = _overrides.get(key.rsplit("/", 1)[1])
    if price is None:
        retry_at = _failed.get(model)
        if retry_at is not None and _clock() < retry_at:
            return None  # failed a moment ago (and said so): not tried on every call
        try:
            price = _lookup_genai_prices(model)
        except Exception as exc:  # a broken price table must not break the call
            interrupt = _interrupt_behind(exc)
            if interrupt is not None:  # cut short, not answered: the caller is interrupted
                raise interrupt from None
            warn_once(
                model,
                "price_lookup_failed",
                model=model,
                error=f"{type(exc).__name__}: {exc}"[:300],
                hint=f"cost_usd will be None; tried again in {RETRY_AFTER:g} s",
            )
            _failed[model] = _clock() + RETRY_AFTER
            return None  # not cached: not an answer
        _failed.pop(model, None)
    if price is None:
        warn_once(
            model,
            "unknown_model_price",
            model=model,
            hint=f"cost_usd will be None; call llmguard.set_price({model!r}, input_per_mtok=..., "
            "output_per_mtok=...)",
        )
    _cache[model] = price
    return price


def calc_cost(
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> Decimal | None:
    """Exact USD cost of a call on ``model``, or None if its price is unknown.

    ``input_tokens`` includes cached and cache-write tokens.

    >>> import llmguard
    >>> llmguard.calc_cost("gpt-4o", input_tokens=1000, output_tokens=100)
    Decimal('0.0035')
    """
    price = get_price(model)
    if price is None:
        return None
    return price.cost(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens)

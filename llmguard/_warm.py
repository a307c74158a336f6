"""``warm_up()``: pay at start-up what the first decorated call would otherwise pay."""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import ConfigurationError
from ._events import get_logger
from ._prices import get_price, load_price_table
from ._tokens import counter_for


def warm_up(models: str | Iterable[str] | None = None) -> None:
    """Load now what llmguard otherwise loads in the first call that needs it, so that a
    server's first request does not wait 0.4-1.3 s for it: the tiktoken encodings of
    ``models`` (without models: ``o200k_base``, the one OpenAI's current models use and
    other vendors' estimates are made with), the genai-prices table and each model's price,
    and the event logger (structlog).

    Unknown models and unloadable encodings give their usual one-time warnings here, at
    start-up. Nothing is opened: storages connect on first use. Safe to call more than
    once, from any thread.

    >>> import llmguard
    >>> llmguard.warm_up(models=["gpt-4o", "gpt-4o-mini"])  # doctest: +SKIP
    """
    if models is None:
        chosen: tuple[str | None, ...] = (None,)
    elif isinstance(models, str):
        chosen = (models,)
    else:
        chosen = tuple(models)
        if not all(isinstance(model, str) and model for model in chosen):
            raise ConfigurationError(f"warm_up(models=...) takes model names, got {models!r}")
    get_logger()
    load_price_table()
    for model in chosen:
        counter_for(model)
        if model is not None:
            get_price(model)

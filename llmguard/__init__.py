"""llmguard: keep LLM API bills and rate-limit errors under control with decorators.

Everything users may touch is listed in ``__all__``; the implementation lives in private
modules. ``import llmguard`` loads no tokenizer, price table or storage backend: those load
on first use. ``llmguard.alerts`` (alert destinations) is a submodule loaded when first used.
"""

from typing import Any as _Any

from ._budget import (
    BudgetedFunction,
    BudgetStatus,
    budget,
    budget_keys,
    budget_status,
    reset_budget,
)
from ._cache import CachedFunction, CacheInfo, bypass_cache, cached
from ._config import Unset, configure
from ._debounce import debounced
from ._errors import (
    BudgetExceeded,
    BudgetUnavailable,
    CallTooExpensive,
    ConfigurationError,
    LLMGuardError,
    MissingExtra,
    PriceUnknown,
    RateLimitExceeded,
    RequestTooLarge,
    StorageError,
)
from ._events import Subscription, configure_logging, subscribe, unsubscribe
from ._instrument import instrument, record_usage
from ._pipeline import CallRecord, GuardedFunction, current_call
from ._prices import ModelPrice, calc_cost, get_price, set_price
from ._ratelimit import rate_limited
from ._retry import retry_on_rate_limit
from ._route import route_model
from ._stack import guard
from ._storage import Storage, open_storage, register_storage
from ._tags import tags
from ._tokens import TokenCount, count_message_tokens, count_tokens
from ._track import track
from ._usage import Usage
from ._version import __version__
from ._warm import warm_up

__all__ = [
    "BudgetExceeded",
    "BudgetStatus",
    "BudgetUnavailable",
    "BudgetedFunction",
    "CacheInfo",
    "CachedFunction",
    "CallRecord",
    "CallTooExpensive",
    "ConfigurationError",
    "GuardedFunction",
    "LLMGuardError",
    "MissingExtra",
    "ModelPrice",
    "PriceUnknown",
    "RateLimitExceeded",
    "RequestTooLarge",
    "Storage",
    "StorageError",
    "Subscription",
    "TokenCount",
    "Unset",
    "Usage",
    "__version__",
    "alerts",
    "budget",
    "budget_keys",
    "budget_status",
    "bypass_cache",
    "cached",
    "calc_cost",
    "configure",
    "configure_logging",
    "count_message_tokens",
    "count_tokens",
    "current_call",
    "debounced",
    "get_price",
    "guard",
    "instrument",
    "open_storage",
    "rate_limited",
    "record_usage",
    "register_storage",
    "reset_budget",
    "retry_on_rate_limit",
    "route_model",
    "set_price",
    "subscribe",
    "tags",
    "track",
    "unsubscribe",
    "warm_up",
]


def _report_as_public(namespace: dict[str, _Any]) -> None:
    """Public classes say ``llmguard.X`` in tracebacks, reprs and pickles, not the private
    module that defines them. Their own annotations are resolved first, where they were
    written, so ``typing.get_type_hints`` (pydantic, FastAPI...) still finds their names."""
    from inspect import get_annotations
    from typing import get_type_hints

    for name in __all__:
        kind = namespace.get(name)
        if isinstance(kind, type) and kind.__module__ != __name__:
            own = get_annotations(kind)
            if own:
                hints = get_type_hints(kind, include_extras=True)
                kind.__annotations__ = {field: hints[field] for field in own}
            kind.__module__ = __name__


_report_as_public(globals())


def __getattr__(name: str) -> _Any:
    """``llmguard.alerts``, imported on first use."""
    if name == "alerts":
        import importlib

        return importlib.import_module(".alerts", __name__)
    raise AttributeError(f"module 'llmguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "alerts"})

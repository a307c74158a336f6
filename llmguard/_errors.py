"""Every exception llmguard raises, in one place.

The tree::

    LLMGuardError                 base of everything below; catch this to catch them all
    ├── ConfigurationError        bad decorator arguments or settings; raised at decoration or
    │   │                         configure() time, never in the middle of a call
    │   └── MissingExtra          an optional dependency is not installed; names the
    │                             ``pip install "llmguard[...]"`` that adds it
    ├── StorageError              a storage backend failed (disk full, Redis unreachable, ...);
    │                             the backend's own exception is chained as ``__cause__``
    ├── RateLimitExceeded         @rate_limited could not start the call within max_wait (or
    │   │                         block=False); ``retry_after`` says when it could
    │   └── RequestTooLarge       the call needs more tokens than the limit allows at all:
    │                             waiting cannot help, so it is never retried
    ├── BudgetExceeded            @budget refused the call: it would take spend past the limit
    │   └── CallTooExpensive      the call's own estimate is above max_call_usd
    ├── BudgetUnavailable         the budget's ledger cannot be reached (fail closed)
    └── PriceUnknown              a budget cannot be enforced on a model without a price

Each message says what went wrong and what to do about it.
"""

from __future__ import annotations

import importlib
from datetime import datetime
from decimal import Decimal
from types import ModuleType

from ._redact import redact_uri, scrub


class LLMGuardError(Exception):
    """Base class of every llmguard exception."""


class ConfigurationError(LLMGuardError, ValueError):
    """A decorator argument, setting or storage URI is invalid.

    Raised when the decorator is applied (or ``configure()`` is called), so a bad
    configuration fails at import time rather than on the first request in production.
    """


class MissingExtra(ConfigurationError):
    """An optional dependency is not installed: ``module`` comes with the ``extra``
    (``pip install "llmguard[extra]"``, which the message names)."""

    def __init__(self, what: str, *, module: str, extra: str) -> None:
        super().__init__(f'{what} needs the {module} package: pip install "llmguard[{extra}]"')
        self.module = module
        self.extra = extra


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in (None, module) and not module.startswith(f"{exc.name}."):
            raise  # the package is there but one of its own dependencies is missing
        raise MissingExtra(what, module=module, extra=extra) from None
    except ImportError as exc:  # "import of openai halted", a broken installation
        raise MissingExtra(what, module=module, extra=extra) from exc


class StorageError(LLMGuardError):
    """A storage backend failed; ``__cause__`` holds the backend's own exception.

    ``uri`` is the storage's URI with any password masked (``redis://:***@host``), and the
    message never contains the password either."""

    def __init__(self, message: str, *, uri: str) -> None:
        shown = redact_uri(uri)
        super().__init__(f"{scrub(message, uri)} (storage {shown!r})")
        self.uri = shown


class RateLimitExceeded(LLMGuardError):
    """A call could not start within its rate limit.

    ``retry_after`` is the seconds until the limit would let it start (None if never);
    ``limit`` names the limit, e.g. ``"500 per 1 minute"``. ``@retry_on_rate_limit`` waits
    ``retry_after`` before trying again.
    """

    def __init__(self, message: str, *, retry_after: float | None, limit: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit


class RequestTooLarge(RateLimitExceeded):
    """The call needs more tokens than its token limit allows in a whole window: it can never
    pass, so it fails at once instead of waiting forever, and is never retried. Lower the
    prompt or ``max_tokens``, or raise the limit."""


class BudgetExceeded(LLMGuardError):
    """A call was refused because it could take spend past its budget.

    Names the budget, its key, the limit, what is spent and reserved, the call's estimate
    and when the window resets; wait for ``resets_at``, raise the limit, or use a cheaper
    model.
    """

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        key: str | None,
        limit_usd: Decimal,
        spent_usd: Decimal,
        reserved_usd: Decimal,
        estimate_usd: Decimal,
        resets_at: datetime | None,
    ) -> None:
        super().__init__(message)
        self.budget = budget
        self.key = key
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.estimate_usd = estimate_usd
        self.resets_at = resets_at


class CallTooExpensive(BudgetExceeded):
    """The call's worst-case estimate is above the budget's ``max_call_usd``: shorten the
    prompt or lower ``max_tokens``."""


class BudgetUnavailable(LLMGuardError):
    """The budget's ledger cannot be reached (Redis down...): calls are refused rather than
    run unmetered. ``@budget(fail_open=True)`` lets them through instead."""


class PriceUnknown(LLMGuardError):
    """A budget cannot be enforced for a model without a price: add one with
    ``llmguard.set_price(model, input_per_mtok=..., output_per_mtok=...)``."""

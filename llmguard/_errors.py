"""Every exception llmguard raises, in one place.

The tree::

    LLMGuardError                 base of everything below; catch this to catch them all
    ├── ConfigurationError        bad decorator arguments or settings; raised at decoration or
    │                             configure() time, never in the middle of a call
    ├── StorageError              a storage backend failed (disk full, Redis unreachable, ...);
    │                             the backend's own exception is chained as ``__cause__``
    └── RateLimitExceeded         @rate_limited could not start the call within max_wait (or
        │                         block=False); ``retry_after`` says when it could
        └── RequestTooLarge       the call needs more tokens than the limit allows at all:
                                  waiting cannot help, so it is never retried

Each message says what went wrong and what to do about it.
"""

from __future__ import annotations


class LLMGuardError(Exception):
    """Base class of every llmguard exception."""


class ConfigurationError(LLMGuardError, ValueError):
    """A decorator argument, setting or storage URI is invalid.

    Raised when the decorator is applied (or ``configure()`` is called), so a bad
    configuration fails at import time rather than on the first request in production.
    """


class StorageError(LLMGuardError):
    """A storage backend failed; ``__cause__`` holds the backend's own exception."""

    def __init__(self, message: str, *, uri: str) -> None:
        super().__init__(f"{message} (storage {uri!r})")
        self.uri = uri


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

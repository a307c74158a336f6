"""Every exception llmguard raises, in one place.

The tree::

    LLMGuardError                 base of everything below; catch this to catch them all
    ├── ConfigurationError        bad decorator arguments or settings; raised at decoration or
    │                             configure() time, never in the middle of a call
    └── StorageError              a storage backend failed (disk full, Redis unreachable, ...);
                                  the backend's own exception is chained as ``__cause__``

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

"""Global settings: where llmguard keeps its state.

Read lazily at call time; decorator arguments win over ``configure()``, which wins over the
environment (``LLMGUARD_STORAGE``, ``LLMGUARD_CACHE_DIR``), which wins over the defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._errors import ConfigurationError


class _Unset:
    """Sentinel type: an argument that was not given (as opposed to an explicit ``None``)."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET = _Unset()


@dataclass
class _Settings:
    storage: str | None = None
    cache_dir: str | None = None


_settings = _Settings()


def configure(
    *,
    storage: str | _Unset | None = UNSET,
    cache_dir: str | os.PathLike[str] | _Unset | None = UNSET,
) -> None:
    """Set process-wide defaults for every llmguard decorator.

    ``storage`` is a URI (``"local"``, ``"file:///var/lib/llmguard"``, ``"memory://"``,
    ``"redis://host:6379/0"``); ``cache_dir`` is the folder of the default local storage.
    Pass ``None`` to go back to the environment / built-in default; omit an argument to
    leave it as it is.

    >>> import llmguard
    >>> llmguard.configure(storage="memory://")
    >>> llmguard.configure(storage=None)   # back to LLMGUARD_STORAGE or the local default
    """
    if not isinstance(storage, _Unset):
        if storage is not None:
            from ._storage import validate_uri

            validate_uri(storage)
        _settings.storage = storage
    if not isinstance(cache_dir, _Unset):
        _settings.cache_dir = None if cache_dir is None else os.fspath(cache_dir)


def reset_configuration() -> None:
    """Forget everything ``configure()`` set (tests use this between cases)."""
    _settings.storage = None
    _settings.cache_dir = None


def storage_uri() -> str:
    """The storage URI in force: ``configure()``, else ``LLMGUARD_STORAGE``, else local."""
    uri = _settings.storage or os.environ.get("LLMGUARD_STORAGE") or "local"
    return uri


def cache_dir() -> Path:
    """The default local storage folder, created with mode 0700 on first use by a backend.

    ``configure(cache_dir=...)``, else ``LLMGUARD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/llmguard`` (``~/.cache/llmguard`` when XDG_CACHE_HOME is unset).
    """
    chosen = _settings.cache_dir or os.environ.get("LLMGUARD_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llmguard"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; refuse a path that is not a folder."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise ConfigurationError(
            f"{path} exists and is not a folder: choose another cache_dir"
        ) from exc
    return path

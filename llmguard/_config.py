"""Global settings: where llmguard keeps its state.

Read lazily at call time; decorator arguments win over ``configure()``, which wins over the
environment (``LLMGUARD_STORAGE``, ``LLMGUARD_CACHE_DIR``), which wins over the defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._errors import ConfigurationError


class Unset:
    """The type of ``UNSET``, the default of llmguard options that were not given (as
    opposed to an explicit ``None``, which often means "off"). It appears in signatures
    (``model: str | Unset | None = UNSET``); there is one instance, and it is falsy.
    A wrapper that forwards options can leave them out, or pass ``llmguard.Unset()``."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET = Unset()


@dataclass
class _Settings:
    storage: str | None = None
    cache_dir: str | None = None
    cache_size_limit: int | None = None


_settings = _Settings()
_generation = 0  # bumped by every configure(): what was resolved from settings is stale


def settings_generation() -> int:
    """A number that changes whenever ``configure()`` (or ``reset_configuration()``) runs:
    whatever was resolved from the settings before (a storage's folder) is to be resolved
    again."""
    return _generation


def _changed() -> None:
    global _generation
    _generation += 1


def configure(
    *,
    storage: str | Unset | None = UNSET,
    cache_dir: str | os.PathLike[str] | Unset | None = UNSET,
    cache_size_limit: int | Unset | None = UNSET,
) -> None:
    """Set process-wide defaults for every llmguard decorator.

    ``storage`` is a URI (``"local"``, ``"file:///var/lib/llmguard"``, ``"memory://"``,
    ``"redis://host:6379/0"``); ``cache_dir`` is the folder of the default local storage;
    ``cache_size_limit`` caps the bytes of cache entries a local storage keeps (default 1 GiB,
    env ``LLMGUARD_CACHE_SIZE_LIMIT``; a ``file://`` URI can say ``?size_limit=N``).
    Pass ``None`` to go back to the environment / built-in default; omit an argument to
    leave it as it is. Settings take effect for every call made after this one, including
    calls of functions decorated before. A ``cache_dir`` (or ``file://`` storage) that
    exists and is not a folder raises ``ConfigurationError`` here.

    >>> import llmguard
    >>> llmguard.configure(storage="memory://")
    >>> llmguard.configure(storage=None)   # back to LLMGUARD_STORAGE or the local default
    """
    from . import _validate as validate

    # Every argument is checked before any is set: a refused call changes nothing.
    if not isinstance(storage, Unset):
        validate.storage(storage, decorator="configure")
    folder: str | None = None
    if cache_dir is not None and not isinstance(cache_dir, Unset):
        if not isinstance(cache_dir, (str, os.PathLike)) or not str(os.fspath(cache_dir)).strip():
            raise validate.refuse(
                "configure",
                "cache_dir",
                cache_dir,
                "cache_dir must be a folder path, a non-empty str or a pathlib.Path (None: "
                "LLMGUARD_CACHE_DIR, else the user cache folder)",
            )
        if not isinstance(os.fspath(cache_dir), str):
            raise validate.refuse(
                "configure", "cache_dir", cache_dir, "cache_dir must be a str path, not bytes"
            )
        folder = str(os.fspath(cache_dir))
        check_folder(Path(folder).expanduser(), "cache_dir")
    if not isinstance(cache_size_limit, Unset):
        validate.integer(
            cache_size_limit,
            "cache_size_limit",
            decorator="configure",
            minimum=1,
            maximum=2**50,
            allow_none=True,
            meaning="bytes of cache entries a local storage keeps; None: the default, 1 GiB",
        )
    if not isinstance(storage, Unset):
        _settings.storage = storage
    if not isinstance(cache_dir, Unset):
        _settings.cache_dir = folder
    if not isinstance(cache_size_limit, Unset):
        _settings.cache_size_limit = cache_size_limit
    _changed()


def reset_configuration() -> None:
    """Forget everything ``configure()`` set (tests use this between cases)."""
    _settings.storage = None
    _settings.cache_dir = None
    _settings.cache_size_limit = None
    _changed()


def storage_uri() -> str:
    """The storage URI in force: ``configure()``, else ``LLMGUARD_STORAGE``, else local."""
    uri = _settings.storage or os.environ.get("LLMGUARD_STORAGE") or "local"
    return uri


def cache_size_limit() -> int:
    """Bytes of cache entries a local storage keeps before evicting (default 1 GiB)."""
    if _settings.cache_size_limit is not None:
        return _settings.cache_size_limit
    env = os.environ.get("LLMGUARD_CACHE_SIZE_LIMIT")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ConfigurationError(
                f"LLMGUARD_CACHE_SIZE_LIMIT must be bytes, got {env!r}"
            ) from None
    return 2**30


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


def check_folder(path: Path, what: str) -> None:
    """ConfigurationError if ``path`` exists and is not a folder (checked when a decorator is
    applied or ``configure()`` is called; found only later, it is a storage failure)."""
    if path.exists() and not path.is_dir():
        raise ConfigurationError(
            f"{what} {path} exists and is not a folder: choose a folder for llmguard's state"
        )


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; refuse a path that is not a folder (an
    OSError: at call time, this is the storage failing, not a configuration error)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            f"{path} exists and is not a folder: choose another cache_dir"
        ) from None
    return path

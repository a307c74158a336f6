"""Storage backends, chosen by URI through a registry.

Every policy that keeps state (cache entries, locks, rate-limit counters, budget ledgers)
talks to a :class:`Storage`, never to diskcache or Redis directly, so a backend added with
:func:`register_storage` serves all of them. Built in:

=====================================  ===============================================
``local`` (default), ``file:///path``,  diskcache in a folder (default: the user cache dir,
a plain path                            mode 0700): shared by every process on the machine
``memory://`` / ``memory://name``       a dict in this process (tests, single workers)
``redis://``, ``rediss://``,            Redis (extra ``llmguard[redis]``): shared by
``unix://``                             every process on every machine; ``?prefix=app1:``
                                        puts every key llmguard writes under that prefix
=====================================  ===============================================

Values are bytes (or ints for counters). The local backend treats its folder as hostile
input: it never unpickles (a pickled value is refused, a pickled key is skipped), never opens
or deletes a file outside the folder whatever a row says, refuses a folder that another user
owns or that group/others can write, and creates its folders 0700 and files 0600.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ._config import (
    cache_dir,
    cache_size_limit,
    check_folder,
    ensure_private_dir,
    settings_generation,
    storage_uri,
)
from ._errors import ConfigurationError, LLMGuardError, StorageError, require
from ._events import outages, storage_answered, storage_failed, warn_once
from ._redact import malformed_uri, redact_uri, scrub


class Storage(ABC):
    """A key-value store shared by llmguard's policies. Every operation is atomic."""

    uri: str

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if absent or expired."""

    @abstractmethod
    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value``, expiring after ``ttl`` seconds (None: never)."""

    @abstractmethod
    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True if stored (a lock primitive)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""

    @abstractmethod
    def incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        """Add ``delta`` to the integer at ``key`` (created at 0) and return the new value;
        ``ttl`` applies when the counter is created."""

    @abstractmethod
    def clear(self, prefix: str = "") -> int:
        """Delete every key starting with ``prefix``; returns how many."""

    @abstractmethod
    def count(self, prefix: str = "") -> int:
        """How many live keys start with ``prefix`` (walks them: not for hot paths)."""

    @abstractmethod
    def keys(self, prefix: str = "", *, entries: bool = False) -> list[str]:
        """The live keys starting with ``prefix`` (cache entries' with ``entries=True``),
        for operator commands; walks them, not for hot paths."""

    @abstractmethod
    def release(self, key: str, token: bytes) -> bool:
        """Delete ``key`` only if it still holds ``token`` (unlock only your own lock)."""

    def renew(self, key: str, token: bytes, ttl: float) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now, only if it still holds ``token``
        (extend your own lock, a lease's heartbeat); False if it does not (it expired, or
        another holder took it). Atomic. The built-in backends implement it; a backend that
        does not raises NotImplementedError, and its locks then simply expire after their
        ttl even while their holder works."""
        raise NotImplementedError(f"{type(self).__name__} cannot renew a lock")

    # Cache entries: a backend may keep them apart and evict them under a size limit;
    # everything stored with the methods above (locks, counters, ledgers) is never evicted.
    def get_entry(self, key: str) -> bytes | None:
        return self.get(key)

    def set_entry(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.set(key, value, ttl)

    def delete_entry(self, key: str) -> bool:
        return self.delete(key)

    def clear_entries(self, prefix: str = "") -> int:
        return self.clear(prefix)

    def count_entries(self, prefix: str = "") -> int:
        return self.count(prefix)

    remote: bool = False
    """True when operations cross the network (async calls run them in a thread)."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release connections and files."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_uri(self.uri)!r}>"


# Operations that only read: a success of one does not end an outage in which a write
# failed (a read-only folder or replica answers them, and is still down for the rest).
_READS = frozenset({"get", "floor", "get_moving_window", "get_sliding_window", "get_expiry"})


@functools.lru_cache(maxsize=256)
def _shown(uri: str) -> str:
    return redact_uri(uri)


class _wrapped:
    """``with _wrapped(uri, "get"):`` turns a backend's exception into a StorageError (its
    own exception chained as ``__cause__``), and keeps the storage's outage state: a failure
    starts an outage, the first success after it ends it (one ``storage_recovered`` event).
    The one seam between llmguard and a backend: every operation of the local and Redis
    storages, the budget ledgers and the rate limits' storages runs inside it.
    (A class, not @contextmanager: it runs on every cache hit.)"""

    __slots__ = ("uri", "what")

    def __init__(self, uri: str, what: str) -> None:
        self.uri = uri
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            if outages:  # some storage is down: is it this one, back?
                storage_answered(_shown(self.uri), write=self.what not in _READS)
            return
        if _local_storages:  # an interrupt may have left a transaction open: end it
            end_broken_transactions(self.uri)
        if not isinstance(exc, Exception) or isinstance(exc, (ConfigurationError, RefusedRow)):
            return
        storage_failed(_shown(self.uri), write=self.what not in _READS)
        if isinstance(exc, StorageError):
            return
        raise StorageError(
            f"{self.what} failed: {type(exc).__name__}: {exc}", uri=self.uri
        ) from exc


storage_errors = _wrapped
"""The seam under its public name, for the modules that adapt other libraries' storages."""

# Every LocalStorage of this process (the limits storages open their own), for the seam.
_local_storages: weakref.WeakSet[LocalStorage] = weakref.WeakSet()


def end_broken_transactions(uri: str) -> None:
    """After an exception left an operation on storage ``uri``: end any SQLite transaction
    it left open on this thread (see :meth:`LocalStorage.end_broken_transaction`)."""
    for storage in list(_local_storages):
        if storage.uri == uri:
            storage.end_broken_transaction()


def _end_transaction(cache: Any) -> None:
    """End the transaction this thread's connection to diskcache ``cache`` is in, if any,
    and clear diskcache's record that this thread holds one.

    diskcache keeps one connection per thread (``Cache._local.con``, for the process
    ``_local.pid``) and the thread in a transaction (``Cache._txn_id``); an exception that
    reaches ``Cache._transact`` between its ``BEGIN IMMEDIATE`` and its ``try`` (a
    KeyboardInterrupt from a signal handler) leaves both set, and then every later operation
    of this thread fails and every other process waits for the database lock. The connection
    is closed (which rolls its transaction back; diskcache opens a new one when next used)
    rather than sent a ROLLBACK: a ``_transact`` generator abandoned by the interrupt still
    holds the old connection, and its late ROLLBACK must not end a newer transaction."""
    local = cache._local
    con = getattr(local, "con", None)
    if con is not None and getattr(local, "pid", None) == os.getpid() and con.in_transaction:
        try:
            cache.close()  # this thread's connection only
        except Exception:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
    if cache._txn_id == threading.get_ident():
        cache._txn_id = None


class MemoryStorage(Storage):
    """A dict in this process, with expiry; for tests and single-process apps."""

    def __init__(
        self, uri: str = "memory://", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.uri = uri
        self._clock = clock
        self._data: dict[str, tuple[Any, float | None]] = {}
        self._lock = threading.RLock()

    def atomic(self) -> Any:
        """A block in which get/set/... of this storage are one atomic step."""
        return self._lock

    def _live(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock():
            del self._data[key]
            return None
        return value

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self._clock() + ttl

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._live(key)
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with self._lock:
            self._data[key] = (bytes(value), self._expiry(ttl))

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._data[key] = (bytes(value), self._expiry(ttl))
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with self._lock:
            current = self._live(key)
            if current is None:
                value, expires = delta, self._expiry(ttl)
            else:
                value, expires = int(current) + delta, self._data[key][1]
            self._data[key] = (value, expires)
            return value

    def clear(self, prefix: str = "") -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for key in doomed:
                del self._data[key]
            return len(doomed)

    def count(self, prefix: str = "") -> int:
        with self._lock:
            return sum(
                1 for k in list(self._data) if k.startswith(prefix) and self._live(k) is not None
            )

    def keys(self, prefix: str = "", *, entries: bool = False) -> list[str]:
        with self._lock:
            return sorted(
                k for k in list(self._data) if k.startswith(prefix) and self._live(k) is not None
            )

    def release(self, key: str, token: bytes) -> bool:
        with self._lock:
            if self._live(key) != token:
                return False
            del self._data[key]
            return True

    def renew(self, key: str, token: bytes, ttl: float) -> bool:
        with self._lock:
            if self._live(key) != token:
                return False
            self._data[key] = (token, self._expiry(ttl))
            return True


class RefusedRow(StorageError):
    """A row of a local storage's database that llmguard will not use (it points outside the
    folder, or at no file): the row is dropped, the file it names is never touched."""


@functools.cache
def _safe_disk() -> type:
    import diskcache
    from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_TEXT

    class SafeDisk(diskcache.Disk):  # type: ignore[misc]
        """diskcache's Disk for a folder whose database may have been tampered with.

        Only bytes, str, int and float go in or come out: a pickled value is refused, a
        pickled key is never unpickled (``get`` answers None for it, which no walk over
        keys takes for a key). A row's file is opened or removed only if its real path
        (symlinks resolved) is inside the folder. Sub-folders are created 0700 and value
        files 0600, whatever the umask.
        """

        def __init__(self, directory: str, **settings: Any) -> None:
            super().__init__(directory, **settings)
            self._base = os.path.realpath(directory)
            self._seen: set[str] = set()
            self.refused = 0
            self.on_refused: Callable[[str], None] | None = None

        def _refuse(self, what: str, name: str | None = None) -> None:
            if name is not None:
                if name in self._seen:  # a row refused when read is dropped: count it once
                    return
                self._seen.add(name)
            self.refused += 1
            if self.on_refused is not None:
                self.on_refused(what)

        def _inside(self, filename: Any) -> str | None:
            """The real path of a row's file, or None if it is not inside the folder."""
            if not isinstance(filename, str) or not filename:
                return None
            full = os.path.realpath(os.path.join(self._base, filename))
            if full == self._base or os.path.commonpath([self._base, full]) != self._base:
                return None
            return full

        def get(self, key: Any, raw: bool) -> Any:
            if not raw:
                self._refuse("a pickled key")
                return None
            return super().get(key, raw)

        def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> Any:
            if not read and type(value) not in (bytes, str, int, float):
                raise TypeError(
                    f"llmguard's local storage keeps plain data only, not {type(value).__name__}"
                )
            return super().store(value, read, key=key)

        def fetch(self, mode: int, filename: str, value: Any, read: bool) -> Any:
            if mode == MODE_PICKLE:
                raise StorageError(
                    "refusing to unpickle a value found in the cache folder (it was not written by "
                    "llmguard's storage); delete the folder if you did not put it there",
                    uri=self._directory,
                )
            if mode in (MODE_BINARY, MODE_TEXT):
                full = self._inside(filename)
                if full is None:
                    self._refuse("a row whose file is outside the folder", str(filename))
                    raise RefusedRow(
                        f"a row names the file {str(filename)[:200]!r}, outside the cache folder",
                        uri=self._directory,
                    )
                filename = full
            return super().fetch(mode, filename, value, read)

        def remove(self, file_path: str) -> None:
            full = self._inside(file_path)
            if full is None:  # never delete a file the folder does not hold
                self._refuse("a row whose file is outside the folder", str(file_path))
                return
            with contextlib.suppress(OSError):
                os.remove(full)
            parent = os.path.dirname(full)  # then the sub-folders it emptied, not the folder
            while parent != self._base and parent.startswith(self._base + os.sep):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)

        def _makedirs(self, path: str) -> None:
            parent = os.path.dirname(path)
            if parent and parent != path and not os.path.isdir(parent):
                self._makedirs(parent)
            with contextlib.suppress(OSError):  # another process may be creating it too
                os.mkdir(path, 0o700)

        def _write(
            self, full_path: str, iterator: Any, mode: str, encoding: str | None = None
        ) -> int:
            """diskcache's own ``_write``, creating the file 0600 (never through a link)."""
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            flags |= getattr(os, "O_BINARY", 0)
            for count in range(1, 11):
                self._makedirs(os.path.dirname(full_path))
                try:
                    # Another cache may have deleted the folder before the file was opened.
                    fd = os.open(full_path, flags, 0o600)
                except OSError:
                    if count == 10:
                        raise
                    continue
                with open(fd, mode.replace("x", "w"), encoding=encoding) as writer:
                    size = 0
                    for chunk in iterator:
                        size += len(chunk)
                        writer.write(chunk)
                    return size
            raise AssertionError("unreachable")  # pragma: no cover

    return SafeDisk


DEFAULT_SIZE_LIMIT = 2**30  # 1 GiB of cache entries per local storage folder


class LocalStorage(Storage):
    """diskcache in a folder: atomic across every process on this machine, no server.

    Two diskcache databases: the folder itself for state (locks, counters, ledgers: never
    evicted) and ``entries/`` for cache entries, evicted least-recently-stored first beyond
    ``size_limit`` bytes.

    The folder must belong to this process's user and not be writable by group or others
    (StorageError otherwise: whoever can write it could plant entries or budget records).
    Rows llmguard did not write and will not use (a pickled key, a file outside the
    folder) are skipped or dropped and counted in ``refused_rows``, with one warning.

    A folder deleted or replaced while open (a temp cleaner) is noticed within
    ``CHECK_INTERVAL`` seconds, and at once by every atomic block (each budget ledger
    transaction), by comparing the device and inode of the folder and of its database with
    those it had when opened: the storage then reopens the folder on disk (one
    ``storage_folder_replaced`` warning), so processes never keep writing to a deleted copy
    while others use a new one.
    """

    CHECK_INTERVAL = 1.0

    def __init__(
        self, directory: str | os.PathLike[str], *, size_limit: int = DEFAULT_SIZE_LIMIT
    ) -> None:
        if size_limit <= 0:
            raise ConfigurationError(
                f"size_limit must be a number of bytes > 0, got {size_limit!r}"
            )
        self.directory = Path(directory).expanduser()
        self.uri = f"file://{self.directory}"
        self.size_limit = size_limit
        self._cache: Any = None
        self._entries: Any = None
        self._lock = threading.Lock()
        self.refused_rows = 0
        # The identity of each folder whose database is open (see _identity), the next time
        # to compare it with the disk, and this thread's depth of atomic blocks.
        self._opened: dict[Path, tuple[int, int, int, int]] = {}
        self._check_at = 0.0
        self._depth = threading.local()
        _local_storages.add(self)

    def _refused(self, what: str) -> None:
        self.refused_rows += 1
        warn_once(
            f"{self.directory}:{what}",
            "storage_row_refused",
            folder=str(self.directory),
            row=what,
            hint="llmguard did not write it and skipped it; delete the folder if you did not "
            "put it there",
        )

    def _check_private(self, folder: Path) -> None:
        """StorageError unless ``folder`` is this user's and only this user can write it."""
        if os.name != "posix":
            return
        info = os.stat(folder)
        if info.st_uid != os.geteuid():
            raise StorageError(
                f"refusing the cache folder {folder}: it belongs to user id {info.st_uid}, not "
                f"to this process's user id {os.geteuid()}, and its owner could plant cache "
                "entries or budget records in it; use a folder of your own (LLMGUARD_CACHE_DIR "
                "or configure(cache_dir=...)), or chown it to this user and `chmod 700` it",
                uri=self.uri,
            )
        loose = info.st_mode & 0o022
        if loose:
            who = "group and others" if loose == 0o022 else "group" if loose & 0o020 else "others"
            raise StorageError(
                f"refusing the cache folder {folder}: it is writable by {who} (mode "
                f"{info.st_mode & 0o777:o}), and whoever can write it could plant cache entries "
                f"or budget records in it; run `chmod 700 {folder}`",
                uri=self.uri,
            )

    def _open(self, folder: Path, **settings: Any) -> Any:
        import diskcache

        with _wrapped(self.uri, "opening the cache folder"):
            ensure_private_dir(folder)
            for checked in {self.directory, folder}:
                self._check_private(checked)
            database = folder / "cache.db"  # created 0600 before SQLite creates it 0644
            flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            os.close(os.open(database, flags, 0o600))
            identity = self._identity(folder)  # before opening: a replacement meanwhile shows
            cache = diskcache.Cache(str(folder), disk=_safe_disk(), timeout=60, **settings)
            cache.disk.on_refused = self._refused
            if identity is not None:
                self._opened[folder] = identity
            return cache

    @staticmethod
    def _identity(folder: Path) -> tuple[int, int, int, int] | None:
        """(device, inode) of ``folder`` and of its database, or None if either is gone."""
        try:
            here, database = os.stat(folder), os.stat(folder / "cache.db")
        except OSError:
            return None
        return here.st_dev, here.st_ino, database.st_dev, database.st_ino

    def _verify(self, force: bool = False) -> None:
        """Reopen the folder if it was deleted or replaced since it was opened: compared
        with the disk at most once per CHECK_INTERVAL, or now if ``force``; never inside
        this thread's atomic block."""
        now = time.monotonic()
        inside: int = getattr(self._depth, "n", 0)
        if (now < self._check_at and not force) or inside:
            return
        with self._lock:
            self._check_at = now + self.CHECK_INTERVAL
            if all(self._identity(f) == known for f, known in self._opened.items()):
                return
            gone = self._opened.get(self.directory) or next(iter(self._opened.values()))
            stale = [c for c in (self._cache, self._entries) if c is not None]
            self._cache = self._entries = None
            self._opened.clear()
        for cache in stale:
            with contextlib.suppress(Exception):
                cache.close()
        warn_once(  # once per folder replaced, whichever instances had it open
            f"{self.directory}:{gone}",
            "storage_folder_replaced",
            storage=self.uri,
            hint="the cache folder was deleted or replaced while in use (a temp cleaner?): "
            "llmguard uses the one now on disk; what the old one held (cache entries, "
            "rate-limit windows, budget spend so far) is gone. Keep cache_dir out of folders "
            "that are cleaned (such as /tmp), or use redis://",
        )

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """A block in which get/set/... are one atomic step across every process (an SQLite
        transaction on the state database), on the folder now on disk."""
        self._verify(force=True)
        depth = self._depth
        outer: int = getattr(depth, "n", 0)
        try:  # the depth is restored however the block ends, even cut short by an interrupt
            depth.n = outer + 1
            with self.cache.transact():
                yield
        finally:
            depth.n = outer

    def end_broken_transaction(self) -> None:
        """End what an exception (a KeyboardInterrupt, say) left open on this thread: an
        SQLite transaction of either database that no atomic block of this thread is still
        running is rolled back (what it wrote is undone: the operation did not happen), so
        this process and every other can use the folder again. Called by the storage seam
        whenever an exception leaves an operation; inside this thread's atomic block it
        leaves the transaction to that block, which ends it."""
        if getattr(self._depth, "n", 0):
            return
        for cache in (self._cache, self._entries):
            if cache is not None:
                _end_transaction(cache)

    @property
    def cache(self) -> Any:
        """The state ``diskcache.Cache`` (never evicted), opened on first use."""
        if time.monotonic() >= self._check_at:
            self._verify()
        if self._cache is None:
            with self._lock:
                if self._cache is None:
                    self._cache = self._open(self.directory, eviction_policy="none")
        return self._cache

    @property
    def entries(self) -> Any:
        """The cache entries' ``diskcache.Cache`` (size-limited, evicting)."""
        if time.monotonic() >= self._check_at:
            self._verify()
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    ensure_private_dir(self.directory)
                    self._entries = self._open(
                        self.directory / "entries",
                        size_limit=self.size_limit,
                        eviction_policy="least-recently-stored",
                    )
        return self._entries

    @staticmethod
    def _as_bytes(value: Any) -> bytes | None:
        if value is None or isinstance(value, bytes):
            return value
        return str(value).encode()

    @staticmethod
    def _fetch(cache: Any, key: str) -> Any:
        """``cache.get(key)``; a refused row is dropped (its file untouched) and reads as
        absent."""
        try:
            return cache.get(key)
        except RefusedRow:
            cache.delete(key)
            return None

    def get(self, key: str) -> bytes | None:
        with _wrapped(self.uri, "get"):
            return self._as_bytes(self._fetch(self.cache, key))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with _wrapped(self.uri, "set"):
            self.cache.set(key, bytes(value), expire=ttl)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        with _wrapped(self.uri, "add"):
            return bool(self.cache.add(key, bytes(value), expire=ttl))

    def delete(self, key: str) -> bool:
        with _wrapped(self.uri, "delete"):
            return bool(self.cache.delete(key))

    def incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with _wrapped(self.uri, "incr"):
            cache = self.cache
            if ttl is None:
                return int(cache.incr(key, delta, default=0))
            with cache.transact():
                created = cache.get(key) is None
                value = int(cache.incr(key, delta, default=0))
                if created:
                    cache.touch(key, expire=ttl)
                return value

    def release(self, key: str, token: bytes) -> bool:
        with _wrapped(self.uri, "release"):
            cache = self.cache
            with cache.transact():
                if self._fetch(cache, key) != token:
                    return False
                return bool(cache.delete(key))

    def renew(self, key: str, token: bytes, ttl: float) -> bool:
        with _wrapped(self.uri, "renew"):
            cache = self.cache
            with cache.transact():  # one SQLite transaction: compare and renew, atomically
                if cache.get(key) != token:
                    return False
                return bool(cache.touch(key, expire=ttl))

    @staticmethod
    def _clear(cache: Any, prefix: str) -> int:
        if not prefix:
            return int(cache.clear())
        removed = 0
        for key in list(cache.iterkeys()):
            if isinstance(key, str) and key.startswith(prefix) and cache.delete(key):
                removed += 1
        return removed

    @staticmethod
    def _count(cache: Any, prefix: str) -> int:
        cache.expire()
        return sum(1 for key in cache.iterkeys() if isinstance(key, str) and key.startswith(prefix))

    def clear(self, prefix: str = "") -> int:
        with _wrapped(self.uri, "clear"):
            return self._clear(self.cache, prefix)

    def keys(self, prefix: str = "", *, entries: bool = False) -> list[str]:
        with _wrapped(self.uri, "keys"):
            cache = self.entries if entries else self.cache
            cache.expire()
            return sorted(
                k for k in cache.iterkeys() if isinstance(k, str) and k.startswith(prefix)
            )

    def count(self, prefix: str = "") -> int:
        with _wrapped(self.uri, "count"):
            return self._count(self.cache, prefix)

    def get_entry(self, key: str) -> bytes | None:
        with _wrapped(self.uri, "get"):
            return self._as_bytes(self._fetch(self.entries, key))

    def set_entry(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with _wrapped(self.uri, "set"):
            self.entries.set(key, bytes(value), expire=ttl)

    def delete_entry(self, key: str) -> bool:
        with _wrapped(self.uri, "delete"):
            return bool(self.entries.delete(key))

    def clear_entries(self, prefix: str = "") -> int:
        with _wrapped(self.uri, "clear"):
            return self._clear(self.entries, prefix)

    def count_entries(self, prefix: str = "") -> int:
        with _wrapped(self.uri, "count"):
            return self._count(self.entries, prefix)

    def close(self) -> None:
        for cache in (self._cache, self._entries):
            if cache is not None:
                cache.close()
        self._cache = self._entries = None
        self._opened.clear()


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_INCR_WITH_TTL = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if value == tonumber(ARGV[1]) and ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""


def split_redis_prefix(uri: str) -> tuple[str, str]:
    """(the URI without its ``prefix`` query parameter, the prefix or "")."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    if not prefixes:
        return uri, ""
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[-1]


REDIS_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
"""Seconds a Redis client of llmguard's waits to connect and for each answer, unless the
URI says otherwise (``?socket_timeout=0.5&socket_connect_timeout=1``: redis-py reads them,
and they win over these): a Redis that accepts connections and never answers fails each
operation after this long instead of hanging the call."""


class RedisStorage(Storage):
    """Redis: shared by every process on every machine that uses the same URI.

    ``?prefix=app1:`` in the URI puts every key llmguard writes (cache entries, locks,
    ledgers, rate-limit windows) under that prefix, and makes ``clear``, ``count`` and
    ``keys`` see only those: several applications (or test runs) can share one database.
    Keys passed to and returned by the methods are without the prefix. Operations time out
    after :data:`REDIS_TIMEOUTS` (``?socket_timeout=`` and ``?socket_connect_timeout=`` in
    the URI change them).
    """

    def __init__(self, uri: str) -> None:
        redis = require("redis", extra="redis", what=f"storage {redact_uri(uri)!r}")
        self.uri = uri
        self.connection_uri, self.prefix = split_redis_prefix(uri)
        self.client = redis.Redis.from_url(self.connection_uri, **REDIS_TIMEOUTS)
        self._incr = self.client.register_script(_INCR_WITH_TTL)
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)

    remote = True

    def key(self, key: str) -> str:
        """The Redis key that holds llmguard's ``key`` (with the URI's prefix)."""
        return self.prefix + key

    @staticmethod
    def _ms(ttl: float | None) -> int | None:
        return None if ttl is None else max(1, int(ttl * 1000))

    def get(self, key: str) -> bytes | None:
        with _wrapped(self.uri, "get"):
            value: Any = self.client.get(self.prefix + key)
        return None if value is None else bytes(value)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with _wrapped(self.uri, "set"):
            self.client.set(self.prefix + key, value, px=self._ms(ttl))

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        with _wrapped(self.uri, "add"):
            return bool(self.client.set(self.prefix + key, value, px=self._ms(ttl), nx=True))

    def delete(self, key: str) -> bool:
        with _wrapped(self.uri, "delete"):
            return bool(self.client.delete(self.prefix + key))

    def incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with _wrapped(self.uri, "incr"):
            ms = self._ms(ttl)
            return int(self._incr(keys=[self.prefix + key], args=[delta, "" if ms is None else ms]))

    def clear(self, prefix: str = "") -> int:
        with _wrapped(self.uri, "clear"):
            removed = 0
            batch: list[Any] = []
            match = _redis_glob_escape(self.prefix + prefix) + "*"
            for key in self.client.scan_iter(match=match, count=500):
                batch.append(key)
                if len(batch) == 500:
                    removed += int(self.client.delete(*batch))
                    batch.clear()
            if batch:
                removed += int(self.client.delete(*batch))
            return removed

    def count(self, prefix: str = "") -> int:
        with _wrapped(self.uri, "count"):
            match = _redis_glob_escape(self.prefix + prefix) + "*"
            return sum(1 for _ in self.client.scan_iter(match=match, count=500))

    def keys(self, prefix: str = "", *, entries: bool = False) -> list[str]:
        with _wrapped(self.uri, "keys"):
            match = _redis_glob_escape(self.prefix + prefix) + "*"
            skip = len(self.prefix)
            return sorted(k.decode()[skip:] for k in self.client.scan_iter(match=match, count=500))

    def release(self, key: str, token: bytes) -> bool:
        with _wrapped(self.uri, "release"):
            return bool(self._release(keys=[self.prefix + key], args=[token]))

    def renew(self, key: str, token: bytes, ttl: float) -> bool:
        with _wrapped(self.uri, "renew"):
            return bool(
                self._renew(keys=[self.prefix + key], args=[token, max(1, int(ttl * 1000))])
            )

    def close(self) -> None:
        self.client.close()


def _redis_glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


_LOCAL_ALIASES = ("local", "disk", "local://", "disk://")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")  # C:\\cache, C:/cache: a folder on Windows
_LOCAL_SCHEMES = ("local", "disk", "file")


def _local_place(uri: str) -> tuple[Path, int]:
    """(folder, size limit) of a local storage URI, from the settings in force now."""
    if uri in _LOCAL_ALIASES:
        return cache_dir(), cache_size_limit()
    if not uri.startswith("file://"):
        return Path(uri).expanduser(), cache_size_limit()
    parts = urlsplit(uri)
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise ConfigurationError(f"storage {uri!r} names no folder: use file:///absolute/path")
    query = parse_qs(parts.query)
    if "size_limit" not in query:
        return Path(path).expanduser(), cache_size_limit()
    try:
        return Path(path).expanduser(), int(query["size_limit"][-1])
    except ValueError:
        raise ConfigurationError(f"size_limit in {uri!r} must be a number of bytes") from None


def _local_from_uri(uri: str) -> Storage:
    folder, size_limit = _local_place(uri)
    return LocalStorage(folder, size_limit=size_limit)


_registry: dict[str, Callable[[str], Storage]] = {
    "local": _local_from_uri,
    "disk": _local_from_uri,
    "file": _local_from_uri,
    "memory": MemoryStorage,
    "redis": RedisStorage,
    "rediss": RedisStorage,
    "unix": RedisStorage,
}
_open: dict[str, Storage] = {}  # by location: see _location
_open_lock = threading.Lock()
_locations: dict[str, str] = {}  # URI -> location, under the settings of _located_at
_located_at = -1


def register_storage(scheme: str, factory: Callable[[str], Storage]) -> None:
    """Make ``scheme://...`` URIs open ``factory(uri)`` everywhere llmguard takes storage."""
    if not scheme.isidentifier():
        raise ConfigurationError(f"storage scheme must be a simple name, got {scheme!r}")
    _registry[scheme] = factory


def scheme_of(uri: str) -> str:
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    if uri in ("local", "disk"):
        return uri
    return "file"  # a plain folder path


def validate_uri(uri: str) -> str:
    """Check a storage URI at configuration time; returns it."""
    if not isinstance(uri, str) or not uri:
        raise ConfigurationError(f"storage must be a URI string, got {uri!r}")
    if malformed_uri(uri) and not (os.name == "nt" and _DRIVE.match(uri)):
        raise ConfigurationError(
            f"storage {redact_uri(uri)!r} is a malformed URI: a scheme is followed by '://' "
            "(redis://host:6379/0, file:///absolute/path); a folder whose name holds ':' is "
            "given as ./name or file:///absolute/path"
        )
    scheme = scheme_of(uri)
    if scheme not in _registry:
        known = ", ".join(sorted(f"{s}://" for s in _registry))
        raise ConfigurationError(
            f"unknown storage scheme in {redact_uri(uri)!r}: use one of {known}, or a folder path"
        )
    if _registry[scheme] is RedisStorage:
        redis = require("redis", extra="redis", what=f"storage {redact_uri(uri)!r}")
        try:  # a malformed port or ?socket_timeout=: redis-py would say so at the first call
            redis.connection.parse_url(split_redis_prefix(uri)[0])
        except ValueError as exc:
            raise ConfigurationError(
                scrub(f"storage {redact_uri(uri)!r} is not a Redis URI redis-py takes: {exc}", uri)
            ) from None
    return uri


def local_folder(uri: str | None = None) -> Path | None:
    """The folder a local storage URI (default: the configured one) names now, or None for
    a storage that is not a folder (``memory://``, ``redis://``...). Opens nothing."""
    chosen = uri or storage_uri()
    if scheme_of(chosen) not in _LOCAL_SCHEMES:
        return None
    return _local_place(chosen)[0]


def check_storage(uri: str | None) -> None:
    """Check a decorator's ``storage=`` (None: the configured one) when it is applied, or
    ``configure(storage=...)``: ConfigurationError for a bad URI, or a local storage whose
    folder exists and is not a folder. (The configured URI's own scheme is checked when it
    is used: ``LLMGUARD_STORAGE`` is read at call time.)"""
    if uri is not None:
        validate_uri(uri)
    chosen = uri or storage_uri()
    if scheme_of(chosen) in _LOCAL_SCHEMES:
        check_folder(_local_place(chosen)[0], "the cache folder")


def _location(uri: str) -> str:
    """What ``uri`` names now: a local storage's folder and size limit as the settings in
    force resolve them (``local`` follows ``configure(cache_dir=...)``), any other URI
    itself. Resolved once per URI until settings change."""
    global _located_at
    generation = settings_generation()
    if generation != _located_at:
        _locations.clear()
        _located_at = generation
    location = _locations.get(uri)
    if location is None:
        if scheme_of(uri) in _LOCAL_SCHEMES:
            folder, size_limit = _local_place(uri)
            location = f"file://{folder}?size_limit={size_limit}"  # a key, never parsed
        else:
            location = uri
        _locations[uri] = location
    return location


def open_storage(uri: str | None = None) -> Storage:
    """The storage for ``uri`` (default: the configured one), one instance per location per
    process. ``local`` (and a folder path) is the folder the settings name now: after
    ``configure(cache_dir=...)`` it opens the new folder."""
    chosen = uri or storage_uri()
    location = _location(chosen)
    storage = _open.get(location)
    if storage is None:
        with _open_lock:
            storage = _open.get(location)
            if storage is None:
                validate_uri(chosen)
                factory = _registry[scheme_of(chosen)]
                try:
                    if factory is _local_from_uri:  # the folder resolved above, not again
                        folder, size_limit = _local_place(chosen)
                        storage = LocalStorage(folder, size_limit=size_limit)
                    else:
                        storage = factory(chosen)
                except LLMGuardError:
                    raise
                except Exception as exc:  # e.g. a malformed port: say so, without the password
                    raise StorageError(
                        f"opening failed: {type(exc).__name__}: {exc}", uri=chosen
                    ) from exc
                _open[location] = storage
    return storage


def close_storages() -> None:
    """Close and forget every storage opened in this process."""
    with _open_lock:
        for storage in _open.values():
            try:
                storage.close()
            except Exception:
                pass
        _open.clear()
        _locations.clear()


def _after_fork() -> None:  # connections and file handles are not shared with a child
    _open.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

"""Leases: storage locks that stay held while their holder works, and only that long.

A lock entry expires after its ``ttl`` so that a holder that dies (a killed process, a lost
machine) cannot block the others for ever. A holder that is alive but slow (a reasoning
model thinking for minutes) must not lose it: while a :class:`Lease` is held, one
background thread per process renews its entry every ``ttl / 3`` with the storage's atomic
compare-and-renew (:meth:`Storage.renew`: only while the entry still holds the lease's
token). A dead holder's lease is no longer renewed, so it expires at most ``ttl`` after
the holder's last heartbeat.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._errors import StorageError
from ._events import warn_once
from ._storage import Storage


class Lease:
    """A lock entry ``key`` = ``token`` in ``storage``, renewed to ``ttl`` every ``ttl / 3``
    from :meth:`keep` until :meth:`end` (or until ``owner()`` returns None: what holds the
    lease was garbage collected without ending it)."""

    __slots__ = ("_ended", "key", "lost", "owner", "renewals", "storage", "token", "ttl")

    def __init__(self, storage: Storage, key: str, token: bytes, ttl: float) -> None:
        self.storage = storage
        self.key = key
        self.token = token
        self.ttl = ttl
        self.owner: Callable[[], Any] | None = None
        self.renewals = 0
        self.lost = False  # the entry expired or changed hands: not renewed any more
        self._ended = False

    @property
    def active(self) -> bool:
        """Still to be renewed: not ended, not lost, its owner (if any) still alive."""
        owner = self.owner
        return not self._ended and not self.lost and (owner is None or owner() is not None)

    def keep(self) -> Lease:
        """Start the heartbeat."""
        _keeper.add(self)
        return self

    def end(self) -> None:
        """Stop the heartbeat (the caller then releases the entry, or lets it expire)."""
        self._ended = True

    def renew(self) -> None:
        """One heartbeat (on the keeper's thread)."""
        try:
            kept = self.storage.renew(self.key, self.token, self.ttl)
        except NotImplementedError:
            self.lost = True
            warn_once(
                f"lease:{type(self.storage).__name__}",
                "lock_not_renewable",
                storage=self.storage.uri,
                hint="this storage cannot renew locks: a call slower than lock_timeout lets "
                "waiting callers in other processes call upstream too",
            )
            return
        except StorageError as exc:  # try again at the next beat; the entry may expire
            warn_once(
                f"lease:{self.storage.uri}",
                "lock_renewal_failed",
                storage=self.storage.uri,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        if kept:
            self.renewals += 1
        else:
            self.lost = True


class _Keeper:
    """The thread that renews every active lease of this process, each on its own beat."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Lease]] = []
        self._order = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._wake:
            heapq.heappush(self._due, (self._next(lease), next(self._order), lease))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="llmguard-lease-keeper", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    @staticmethod
    def _next(lease: Lease) -> float:
        return time.monotonic() + lease.ttl / 3

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    while self._due and not self._due[0][2].active:
                        heapq.heappop(self._due)  # ended, lost or abandoned: forget it
                    if not self._due:
                        self._wake.wait()
                        continue
                    delay = self._due[0][0] - time.monotonic()
                    if delay <= 0:
                        _, _, lease = heapq.heappop(self._due)
                        break
                    self._wake.wait(delay)
            lease.renew()  # outside the lock: storage I/O
            if lease.active:
                with self._wake:
                    heapq.heappush(self._due, (self._next(lease), next(self._order), lease))

    def reset(self) -> None:
        """In a forked child: the parent's leases are not the child's to renew."""
        self._due = []
        self._wake = threading.Condition(threading.Lock())
        self._thread = None


_keeper = _Keeper()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keeper.reset)

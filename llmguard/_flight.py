"""Sharing one call's outcome among concurrent callers (``@cached``, ``@debounced``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncio loads only when an async function is decorated and called
    import asyncio

Outcome = tuple[bool | None, Any, Decimal | None, str | None]
"""(ok, result or exception, cost, model)."""


class Flight:
    """One upstream call that concurrent callers in this process wait for and share.

    The leader runs the call and ``finish``es the flight with its outcome; followers
    ``wait`` (threads) or ``wait_async`` (asyncio tasks: on the leader's loop they await a
    future, from another loop they wait in a worker thread). ``leader`` is the leader's
    call record (a call made inside it is not its follower); ``owner``, when set, is a weak
    reference to what finishes the flight later (a stream being consumed): once it is gone
    unfinished, the flight is dead (:meth:`alive`)."""

    __slots__ = ("deferred", "event", "future", "leader", "loop", "outcome", "owner")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, leader: Any = None) -> None:
        self.event = threading.Event()
        self.deferred = False  # the leader finishes it later (when its stream ends)
        self.loop = loop
        self.leader = leader
        self.owner: Callable[[], Any] | None = None
        self.future: asyncio.Future[Any] | None = loop.create_future() if loop is not None else None
        self.outcome: Outcome = (None, None, None, None)

    def alive(self) -> bool:
        """Unfinished, and its leader (or the stream it deferred to) is still at work."""
        return not self.event.is_set() and (self.owner is None or self.owner() is not None)

    def finish(
        self, ok: bool | None, value: Any, cost: Decimal | None = None, model: str | None = None
    ) -> None:
        """Publish the outcome once: ``ok`` True (``value`` is the result), False (``value``
        is the exception) or None (no outcome: followers must go it alone)."""
        if self.event.is_set():
            return
        self.outcome = (ok, value, cost, model)
        self.event.set()
        if self.future is not None and not self.future.done():
            _wake(self.future)

    def wait(self, timeout: float | None) -> Outcome:
        self.event.wait(timeout)
        return self.outcome

    def wait_while_alive(self, beat: float) -> Outcome:
        """Wait until the flight finishes or dies, looking every ``beat`` seconds."""
        while not self.event.wait(beat) and self.alive():
            pass
        return self.outcome

    async def wait_while_alive_async(self, beat: float) -> Outcome:
        import asyncio

        loop = asyncio.get_running_loop()
        if self.future is not None and self.loop is loop:
            while self.alive():
                try:
                    await asyncio.wait_for(asyncio.shield(self.future), beat)
                except asyncio.TimeoutError:
                    pass
            return self.outcome
        return await loop.run_in_executor(None, self.wait_while_alive, beat)

    async def wait_async(self, timeout: float | None) -> Outcome:
        import asyncio

        loop = asyncio.get_running_loop()
        if self.future is not None and self.loop is loop:
            try:
                await asyncio.wait_for(asyncio.shield(self.future), timeout)
            except asyncio.TimeoutError:
                pass
            return self.outcome
        return await loop.run_in_executor(None, self.wait, timeout)


def _wake(future: asyncio.Future[Any]) -> None:
    """Resolve a flight's future from any thread: directly on its loop's thread (the leader's,
    usually), else through the loop (a stream settled by the garbage collector elsewhere).
    A closed loop has nobody left waiting."""
    import asyncio

    loop = future.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    try:
        if running is loop:
            future.set_result(None)
        else:
            loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # the loop is closed
        pass


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def running_loop() -> asyncio.AbstractEventLoop:
    """The running event loop (asyncio is imported here, not at ``import llmguard``)."""
    import asyncio

    return asyncio.get_running_loop()

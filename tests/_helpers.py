"""Helpers shared by the test files: work in several processes, Python in a subprocess, and
virtual time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import multiprocessing
import os
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import pytest


def _child(target: Callable[..., Any], ready: Any, out: Any, args: tuple[Any, ...]) -> None:
    try:
        out.put((True, target(ready, *args)))
    except BaseException:
        out.put((False, traceback.format_exc()))
        raise


def in_processes(
    target: Callable[..., Any],
    *args: Any,
    processes: int = 4,
    timeout: float = 120.0,
    killed_by: int | None = None,
) -> list[Any]:
    """Run ``target(ready, *args)`` in ``processes`` fresh (spawned) processes and return
    what each returned. ``ready`` is a barrier shared by them: ``ready.wait()`` starts the
    load in every process at once, after its own warm-up. A process that raises fails the
    test with its traceback. With ``killed_by=signal.SIGKILL`` each process must end killed
    by that signal (nothing is returned). ``target`` must be a module-level function."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    ready = context.Barrier(processes)
    workers = [
        context.Process(target=_child, args=(target, ready, out, args)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    results: list[Any] = []
    try:
        if killed_by is None:
            for _ in workers:
                ok, value = out.get(timeout=timeout)
                if not ok:
                    pytest.fail(f"a worker process failed:\n{value}")
                results.append(value)
        for worker in workers:
            worker.join(timeout)
            expected = 0 if killed_by is None else -killed_by
            assert worker.exitcode == expected, f"worker exit code {worker.exitcode}"
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(5)
    return results


def run_python(
    *argv: str,
    env: dict[str, str] | None = None,
    without: tuple[str, ...] = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"),
    timeout: float = 300,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python *argv`` in a subprocess (this interpreter), with this environment less
    ``without`` (provider keys: examples run offline) plus ``env``; ``input`` on its
    standard input; output captured as text."""
    clean = {k: v for k, v in os.environ.items() if k not in without}
    return subprocess.run(
        [sys.executable, *argv],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
        check=check,
    )


class VirtualClock:
    """Time that moves only when someone sleeps: ``clock=``, ``sleep=`` and ``async_sleep=``
    for the decorators. :meth:`gather` runs coroutines concurrently in virtual time: when
    none of them can run (each asleep, or waiting for one that is), time jumps to the earliest
    wake-up. (Not for coroutines that wait on threads or the network.)"""

    def __init__(self, now: float = 1_000_000.0, *, horizon: float = 86_400.0) -> None:
        self.now = self.start = now
        self.horizon = horizon  # a wait that never ends fails instead of spinning
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._gathering = False

    def __call__(self) -> float:
        return self.now

    def _advance_to(self, at: float) -> None:
        assert at - self.start <= self.horizon, f"virtual time ran past {self.horizon:g}s"
        self.now = max(self.now, at)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self._advance_to(self.now + seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if not self._gathering:  # one coroutine at a time: time simply moves on
            self._advance_to(self.now + seconds)
            await asyncio.sleep(0)
            return
        wake = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), wake))
        await wake

    def options(self) -> dict[str, Any]:
        """``clock=``, ``sleep=`` and ``async_sleep=`` for a decorator."""
        return {"clock": self, "sleep": self.sleep, "async_sleep": self.async_sleep}

    async def gather(self, *coroutines: Awaitable[Any]) -> list[Any]:
        """Like ``asyncio.gather(*coroutines, return_exceptions=True)``, in virtual time."""
        self._gathering = True
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        running = [len(tasks)]

        def finished(_: Any) -> None:
            running[0] -= 1

        for task in tasks:
            task.add_done_callback(finished)
        loop = asyncio.get_running_loop()
        try:
            while running[0]:
                await asyncio.sleep(0)  # every runnable task takes a step
                # Idle: nothing left to run (asleep here, or waiting for one that is).
                ready = getattr(loop, "_ready", None)  # CPython's run queue
                idle = not ready if ready is not None else len(self._sleepers) == running[0]
                if running[0] and self._sleepers and idle:
                    at = self._sleepers[0][0]
                    self._advance_to(at)
                    while self._sleepers and self._sleepers[0][0] <= at:
                        heapq.heappop(self._sleepers)[2].set_result(None)
        finally:
            self._gathering = False
        return [task.exception() or task.result() for task in tasks]


class FaultyRedis:
    """A server on loopback that a Redis client talks to, failing on demand. ``mode`` says
    what a connection meets:

    - ``"up"``: the real Redis at ``target`` (bytes passed through both ways)
    - ``"down"``: a connection closed at once (a Redis that went away)
    - ``"hung"``: a connection accepted and never answered (a hung server, a black hole)
    - ``"readonly"``: a read-only replica: the handshake is answered, GET finds nothing,
      every other command gets ``-READONLY``

    Setting the mode closes every connection open so far, so clients meet the new mode at
    their next command. :meth:`uri` points a Redis URI (database, ``?prefix=``...) here."""

    def __init__(self, target: tuple[str, int] | None = None, mode: str = "up") -> None:
        import socket
        import threading

        assert mode in self.MODES, mode
        self.target = target
        self.mode = mode
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[Any] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def before(cls, redis_uri: str, mode: str = "up") -> FaultyRedis:
        """One in front of the Redis of ``redis_uri``."""
        from urllib.parse import urlsplit

        parts = urlsplit(redis_uri)
        return cls((parts.hostname or "127.0.0.1", parts.port or 6379), mode)

    def uri(self, redis_uri: str = "redis://127.0.0.1/0") -> str:
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(redis_uri)._replace(netloc=f"127.0.0.1:{self.port}"))

    MODES = ("up", "down", "hung", "readonly")

    def set_mode(self, mode: str) -> None:
        assert mode in self.MODES, mode
        with self._lock:
            self.mode = mode
            doomed, self._open = self._open, []
        for sock in doomed:
            self._close(sock)

    def close(self) -> None:
        self._close(self._server)
        self.set_mode("down")

    @staticmethod
    def _close(sock: Any) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                mode = self.mode
                self._open.append(conn)
            if mode == "down":
                self._close(conn)
            elif mode == "readonly":
                threading.Thread(target=self._replica, args=(conn,), daemon=True).start()
            elif mode == "up":
                assert self.target is not None
                upstream = socket.create_connection(self.target)
                with self._lock:
                    self._open.append(upstream)
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            # "hung": held open, never read nor answered

    @classmethod
    def _pump(cls, source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            cls._close(sock)

    @staticmethod
    def _replica(conn: Any) -> None:
        reader = conn.makefile("rb")
        resp3 = False
        try:
            while line := reader.readline():
                args = []
                for _ in range(int(line[1:])):
                    size = int(reader.readline()[1:])
                    args.append(reader.read(size + 2)[:-2])
                name = args[0].upper()
                if name == b"HELLO":
                    resp3 = args[1:2] == [b"3"]
                    conn.sendall(
                        b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:"
                        + (b"3" if resp3 else b"2")
                        + b"\r\n$4\r\nrole\r\n$7\r\nreplica\r\n"
                    )
                elif name in (b"CLIENT", b"SELECT", b"PING", b"AUTH"):
                    conn.sendall(b"+OK\r\n")
                elif name == b"GET":
                    conn.sendall(b"_\r\n" if resp3 else b"$-1\r\n")
                else:
                    conn.sendall(b"-READONLY You can't write against a read only replica.\r\n")
        except (OSError, ValueError):
            pass

"""Stampede protection for calls slower than ``lock_timeout``: the leader's lock is a lease
renewed while it works, in-process followers wait while it lives, a dead leader's lease
expires, and a call re-entering its own miss runs uncached instead of waiting for itself."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents

LEASE = 0.3  # lock_timeout in these tests: the upstream calls take several times longer
SLOW = 1.5
# Across processes a little more: a process loading its tokenizer holds the GIL for a while,
# and a lease must outlive the longest pause of its heartbeat thread.
PROCESS_LEASE = 0.6


@pytest.fixture(params=["memory", "local", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://lease-tests"
    elif request.param == "local":
        yield f"file://{tmp_path}/cache"
    else:
        yield request.getfixturevalue("redis_uri")


@pytest.fixture(params=["local", "redis"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage several processes share."""
    if request.param == "local":
        yield f"file://{tmp_path}/cache"
    else:
        yield request.getfixturevalue("redis_uri")


# -- the storage primitive -------------------------------------------------------------------


def test_renew_extends_only_your_own_lock(backend: str) -> None:
    storage = llmguard.open_storage(backend)
    assert storage.add("k:lock", b"mine", ttl=0.2)
    assert not storage.renew("k:lock", b"theirs", 5)
    assert storage.renew("k:lock", b"mine", 5)
    time.sleep(0.4)  # past the original ttl: renewed, so still held
    assert storage.get("k:lock") == b"mine"
    assert not storage.add("k:lock", b"theirs", ttl=5)
    assert storage.release("k:lock", b"mine")
    assert not storage.renew("k:lock", b"mine", 5)  # gone: nothing to renew
    assert storage.get("k:lock") is None


def test_renew_does_not_revive_an_expired_lock(backend: str) -> None:
    storage = llmguard.open_storage(backend)
    assert storage.add("k:lock", b"mine", ttl=0.1)
    time.sleep(0.3)
    assert not storage.renew("k:lock", b"mine", 5)
    assert storage.add("k:lock", b"theirs", ttl=5)
    assert not storage.renew("k:lock", b"mine", 5)
    assert storage.get("k:lock") == b"theirs"


def test_a_lease_is_renewed_until_it_ends(backend: str) -> None:
    from llmguard._lease import Lease

    storage = llmguard.open_storage(backend)
    assert storage.add("k:lock", b"tok", ttl=LEASE)
    lease = Lease(storage, "k:lock", b"tok", LEASE).keep()
    time.sleep(4 * LEASE)
    assert storage.get("k:lock") == b"tok"
    assert lease.renewals >= 2
    lease.end()
    time.sleep(2 * LEASE)
    assert storage.get("k:lock") is None  # not renewed any more: expired


def test_a_lease_whose_owner_is_gone_is_not_renewed(backend: str) -> None:
    class Holder:
        pass

    import weakref

    from llmguard._lease import Lease

    storage = llmguard.open_storage(backend)
    holder = Holder()
    assert storage.add("k:lock", b"tok", ttl=LEASE)
    lease = Lease(storage, "k:lock", b"tok", LEASE)
    lease.owner = weakref.ref(holder)
    lease.keep()
    time.sleep(2 * LEASE)
    assert storage.get("k:lock") == b"tok"
    del holder
    gc.collect()
    time.sleep(2 * LEASE)
    assert storage.get("k:lock") is None


# -- one upstream call, however long it takes --------------------------------------------------


def test_16_threads_one_call_slower_than_lock_timeout(backend: str) -> None:
    runs: list[int] = []
    gate = threading.Barrier(16)

    @llmguard.cached(storage=backend, lock_timeout=LEASE)
    def think(text: str) -> str:
        runs.append(1)
        time.sleep(SLOW)
        return text.upper()

    results: list[str] = []

    def worker() -> None:
        gate.wait()
        results.append(think("same"))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == [1]
    assert results == ["SAME"] * 16


def test_16_tasks_one_call_slower_than_lock_timeout(backend: str) -> None:
    runs: list[int] = []

    @llmguard.cached(storage=backend, lock_timeout=LEASE)
    async def think(text: str) -> str:
        runs.append(1)
        await asyncio.sleep(SLOW)
        return text.upper()

    async def main() -> list[str]:
        return await asyncio.gather(*(think("same") for _ in range(16)))

    assert asyncio.run(main()) == ["SAME"] * 16
    assert runs == [1]


def _slow_function(storage: str, counter: str, seconds: float) -> Callable[[str], str]:
    """The same cached function (same name, same code) in every process."""
    llmguard.count_tokens("load the tokenizer now, not while holding the lock")

    @llmguard.cached(storage=storage, lock_timeout=PROCESS_LEASE)
    def think(text: str) -> str:
        llmguard.open_storage(counter).incr("runs")
        time.sleep(seconds)
        return text.upper()

    return think


def _process_worker(storage: str, counter: str, results: Any) -> None:
    think = _slow_function(storage, counter, 2 * SLOW)
    shared = llmguard.open_storage(counter)
    shared.incr("ready")
    while int(shared.get("ready") or 0) < 2:  # both processes start calling together
        time.sleep(0.01)
    gate = threading.Barrier(8)
    out: list[str] = []

    def worker() -> None:
        gate.wait()
        out.append(think("same"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(out)


def test_2_processes_one_call_slower_than_lock_timeout(shared_backend: str, tmp_path: Path) -> None:
    import multiprocessing

    counter = f"file://{tmp_path}/counter"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_process_worker, args=(shared_backend, counter, results))
        for _ in range(2)
    ]
    for p in processes:
        p.start()
    outputs = [results.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(30)
        assert p.exitcode == 0
    assert outputs == [["SAME"] * 8, ["SAME"] * 8]
    assert llmguard.open_storage(counter).get("runs") == b"1"


def _doomed_leader(storage: str, counter: str) -> None:
    _slow_function(storage, counter, 600)("same")  # killed long before it returns


def test_a_killed_leader_is_taken_over_after_its_lease(shared_backend: str, tmp_path: Path) -> None:
    import multiprocessing

    counter = f"file://{tmp_path}/counter"
    shared = llmguard.open_storage(counter)
    leader = multiprocessing.get_context("spawn").Process(
        target=_doomed_leader, args=(shared_backend, counter)
    )
    leader.start()
    try:
        deadline = time.monotonic() + 60
        while shared.get("runs") is None:  # the leader is in its upstream call
            assert time.monotonic() < deadline
            assert leader.is_alive()
            time.sleep(0.02)
        think = _slow_function(shared_backend, counter, 0)
        started: list[float] = []
        results: list[str] = []

        def follower() -> None:
            results.append(think("same"))
            started.append(time.monotonic())

        waiting = threading.Thread(target=follower)
        waiting.start()
        time.sleep(5 * PROCESS_LEASE)  # the leader is alive: its lease holds, however long
        assert shared.get("runs") == b"1"
        assert results == []
        killed = time.monotonic()
        leader.kill()
        leader.join(10)
        waiting.join(30)
        assert results == ["SAME"]
        assert shared.get("runs") == b"2"  # the follower took over, once the lease expired
        assert started[0] > killed
    finally:
        if leader.is_alive():
            leader.kill()
            leader.join(10)


def test_a_stream_slower_than_lock_timeout_is_shared(backend: str) -> None:
    runs: list[int] = []

    @llmguard.cached(storage=backend, lock_timeout=LEASE)
    def chunks(text: str) -> Iterator[str]:
        runs.append(1)
        yield from ("a", "b", "c")

    first = chunks("x")
    assert next(first) == "a"
    got: list[list[str]] = []
    follower = threading.Thread(target=lambda: got.append(list(chunks("x"))))
    follower.start()
    time.sleep(4 * LEASE)  # consumed slowly: the lock and the flight stay held
    assert got == []
    assert list(first) == ["b", "c"]
    follower.join(10)
    assert got == [["a", "b", "c"]]
    assert runs == [1]


def test_a_dropped_stream_does_not_block_others(backend: str) -> None:
    runs: list[int] = []

    @llmguard.cached(storage=backend, lock_timeout=LEASE)
    def chunks(text: str) -> Iterator[str]:
        runs.append(1)
        yield from ("a", "b")

    abandoned = chunks("x")
    assert next(abandoned) == "a"
    del abandoned  # dropped unfinished: never stored, lease no longer renewed
    gc.collect()
    assert list(chunks("x")) == ["a", "b"]
    assert runs == [1, 1]


# -- a call inside its own miss ----------------------------------------------------------------


def test_a_function_calling_itself_with_the_same_arguments_runs_uncached(
    backend: str, events: CapturedEvents
) -> None:
    runs: list[str] = []
    naps: list[float] = []

    @llmguard.cached(storage=backend, lock_timeout=1, sleep=naps.append)
    def research(topic: str) -> str:
        runs.append(topic)
        if len(runs) == 1:
            return "outer+" + research(topic)  # same arguments, inside its own call
        return "inner"

    assert research("ai") == "outer+inner"
    assert research("ai") == "outer+inner"  # the outer answer was stored
    assert runs == ["ai", "ai"]
    assert naps == []  # never waited for itself
    assert [e["cache"] for e in events.calls] == ["reentrant", "miss", "hit"]


def test_an_async_function_calling_itself_runs_uncached(
    backend: str, events: CapturedEvents
) -> None:
    runs: list[str] = []
    naps: list[float] = []

    async def nap(seconds: float) -> None:
        naps.append(seconds)
        await asyncio.sleep(0)

    @llmguard.cached(storage=backend, lock_timeout=1, async_sleep=nap)
    async def research(topic: str) -> str:
        runs.append(topic)
        if len(runs) == 1:
            return "outer+" + await research(topic)
        return "inner"

    async def main() -> list[str]:
        return [await research("ai"), await research("ai")]

    assert asyncio.run(main()) == ["outer+inner", "outer+inner"]
    assert runs == ["ai", "ai"]
    assert naps == []
    assert [e["cache"] for e in events.calls] == ["reentrant", "miss", "hit"]


def test_a_cycle_through_another_decorated_function_runs_uncached(backend: str) -> None:
    runs: list[str] = []
    naps: list[float] = []

    @llmguard.cached(storage=backend, lock_timeout=1, sleep=naps.append)
    def plan(goal: str) -> str:
        runs.append(goal)
        return "plan:" + (step(goal) if len(runs) == 1 else "leaf")

    @llmguard.track(model="gpt-4o-mini")
    def step(goal: str) -> str:
        return plan(goal)

    assert plan("x") == "plan:plan:leaf"
    assert runs == ["x", "x"]
    assert naps == []


def test_other_callers_still_wait_for_a_leader_calling_itself(backend: str) -> None:
    runs: list[str] = []
    inside = threading.Event()

    @llmguard.cached(storage=backend, lock_timeout=LEASE)
    def research(topic: str) -> str:
        runs.append(topic)
        if len(runs) == 1:
            inside.set()
            time.sleep(SLOW)
            return "outer+" + research(topic)
        return "inner"

    leader = threading.Thread(target=research, args=("ai",))
    leader.start()
    inside.wait(10)
    assert research("ai") == "outer+inner"  # a follower: not a re-entry
    leader.join()
    assert runs == ["ai", "ai"]


# -- backends without renew ---------------------------------------------------------------------


def test_a_backend_without_renew_still_caches_with_one_warning(events: CapturedEvents) -> None:
    from llmguard import _storage
    from llmguard._storage import MemoryStorage

    class Plain(MemoryStorage):
        """A backend written before Storage.renew existed."""

        def renew(self, key: str, token: bytes, ttl: float) -> bool:
            return llmguard.Storage.renew(self, key, token, ttl)

    llmguard.register_storage("plain", Plain)
    try:
        runs: list[int] = []

        @llmguard.cached(storage="plain://x", lock_timeout=LEASE)
        def think(text: str) -> str:
            runs.append(1)
            time.sleep(3 * LEASE)
            return text.upper()

        assert think("a") == "A"
        assert think("a") == "A"
        assert runs == [1]
        assert len(events.of("lock_not_renewable")) == 1
    finally:
        _storage._registry.pop("plain")

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents


def test_a_burst_of_threads_makes_one_call_with_the_latest_arguments(
    events: CapturedEvents,
) -> None:
    runs: list[str] = []

    @llmguard.debounced(wait=0.15)
    def summarize(text: str, model: str = "gpt-4o") -> str:
        runs.append(text)
        return f"summary of {text!r}"

    results: dict[str, str] = {}

    def typist(text: str) -> None:
        results[text] = summarize(text)

    threads = []
    for text in ("h", "he", "hel", "hell", "hello"):
        thread = threading.Thread(target=typist, args=(text,))
        thread.start()
        threads.append(thread)
        time.sleep(0.03)  # keystrokes closer together than `wait`
    for thread in threads:
        thread.join()
    assert runs == ["hello"]
    assert set(results.values()) == {"summary of 'hello'"}
    paid = [e for e in events.calls if not e.get("debounced")]
    shared = [e for e in events.calls if e.get("debounced")]
    assert len(paid) == 1
    assert len(shared) == 4
    assert paid[0]["cost_source"] == "estimate"
    assert {e["cost_source"] for e in shared} == {"debounced"}
    assert all(e["cost_usd"] == 0 and e["saved_usd"] == paid[0]["cost_usd"] for e in shared)


def test_a_burst_of_tasks_makes_one_call() -> None:
    runs: list[str] = []

    @llmguard.debounced(wait=0.1)
    async def summarize(text: str) -> str:
        runs.append(text)
        await asyncio.sleep(0.01)
        return text.upper()

    async def main() -> list[str]:
        tasks = []
        for text in ("a", "ab", "abc"):
            tasks.append(asyncio.create_task(summarize(text)))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ["ABC", "ABC", "ABC"]
    assert runs == ["abc"]


def test_calls_further_apart_than_wait_run_separately(flavour: str) -> None:
    runs: list[int] = []
    if flavour == "sync":

        @llmguard.debounced(wait=0.05)
        def f(i: int) -> int:
            runs.append(i)
            return i

        assert [f(1), f(2)] == [1, 2]
    else:

        @llmguard.debounced(wait=0.05)
        async def g(i: int) -> int:
            runs.append(i)
            return i

        async def main() -> list[int]:
            return [await g(1), await g(2)]

        assert asyncio.run(main()) == [1, 2]
    assert runs == [1, 2]


def test_keys_debounce_independently() -> None:
    runs: list[tuple[str, str]] = []

    @llmguard.debounced(wait=0.1, key=lambda user, text: user)
    def suggest(user: str, text: str) -> str:
        runs.append((user, text))
        return text

    out: list[str] = []
    threads = [
        threading.Thread(target=lambda u=u, t=t: out.append(suggest(u, t)))
        for u, t in (("alice", "a1"), ("bob", "b1"), ("alice", "a2"))
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert sorted(runs) == [("alice", "a2"), ("bob", "b1")]


def test_every_caller_of_the_burst_gets_the_exception() -> None:
    @llmguard.debounced(wait=0.1)
    async def broken(text: str) -> str:
        raise RuntimeError("provider down")

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(broken("x"))]
        await asyncio.sleep(0.02)
        tasks.append(asyncio.create_task(broken("xy")))
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]


def test_injected_clock_and_sleep_make_the_wait_exact() -> None:
    now = [100.0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    @llmguard.debounced(wait=0.3, clock=lambda: now[0], sleep=sleep)
    def f(text: str) -> str:
        return text

    assert f("only") == "only"
    assert naps == [pytest.approx(0.3)]


def test_bad_configuration() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="parentheses"):
        llmguard.debounced(lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.debounced(wait=0)
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.debounced(key="user")  # type: ignore[arg-type]

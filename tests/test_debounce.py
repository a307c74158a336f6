from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer


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


def test_bare_debounced_collapses_a_burst_like_the_called_forms() -> None:
    runs: list[str] = []

    @llmguard.debounced
    def bare(text: str) -> str:
        runs.append(text)
        return text.upper()

    assert bare.__name__ == "bare"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(bare, "a")
        time.sleep(0.05)  # well within the default 0.3 s
        second = pool.submit(bare, "ab")
        assert first.result() == second.result() == "AB"
    assert runs == ["ab"]
    assert bare.with_options()("x") == "X"


def test_bad_configuration() -> None:
    async def words() -> AsyncIterator[str]:
        yield "a"

    with pytest.raises(llmguard.ConfigurationError, match="async generator function"):
        llmguard.debounced()(words)
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.debounced(wait=0)
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.debounced(key="user")  # type: ignore[arg-type]


# -- streams: every caller of the burst reads the one stream (issue 11) ----------------------
STREAM_OPTIONS: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
REPLY = "Fake reply about: hello"


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _assert_one_paid_stream(events: CapturedEvents, callers: int, chunks: list[Any]) -> None:
    """One event per caller: the leader's with the provider's usage, the others' at $0
    saving that much."""
    assert len(events.calls) == callers
    [paid] = [e for e in events.calls if not e.get("debounced")]
    usage = chunks[-1].usage
    assert paid["cost_source"] == "usage"
    assert (paid["input_tokens"], paid["output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    for shared in events.calls:
        if shared is not paid:
            assert (shared["cost_source"], shared["cost_usd"]) == ("debounced", 0)
            assert shared["saved_usd"] == paid["cost_usd"] > 0


def test_every_caller_of_a_burst_reads_the_whole_stream_as_it_arrives(
    events: CapturedEvents,
) -> None:
    """The leader (the burst's first caller) holds its stream unread while a follower reads
    the whole of it: nobody waits for another caller to read."""
    with FakeLLMServer(chunk_delay=0.002) as fake:
        client = llmguard.instrument(fake.openai_client())

        @llmguard.debounced(wait=0.3)
        def suggest(text: str, model: str = "gpt-4o-mini") -> Any:
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], **STREAM_OPTIONS
            )

        read: dict[str, list[Any]] = {}
        follower_done = threading.Event()

        def leader() -> None:
            stream = suggest("he")
            assert follower_done.wait(10)  # nothing read here meanwhile
            read["leader"] = list(stream)

        def follower(text: str) -> None:
            read[text] = list(suggest(text))
            if text == "hello":
                follower_done.set()

        threads = [threading.Thread(target=leader)]
        threads[0].start()
        time.sleep(0.02)
        for text in ("hel", "hello"):
            threads.append(threading.Thread(target=follower, args=(text,)))
            threads[-1].start()
            time.sleep(0.02)
        for thread in threads:
            thread.join(10)
        assert len(fake.requests) == 1
        assert fake.requests[0].body["messages"][0]["content"] == "hello"  # the latest
    assert {name: _text(chunks) for name, chunks in read.items()} == {
        "leader": REPLY,
        "hel": REPLY,
        "hello": REPLY,
    }
    assert read["leader"] == read["hel"] == read["hello"]  # the same chunk objects
    _assert_one_paid_stream(events, 3, read["leader"])


def test_async_callers_of_a_burst_read_the_stream_and_one_may_leave(
    events: CapturedEvents, tmp_path: Any
) -> None:
    """A follower cancelled (a timeout) while it waits for a chunk leaves; the others read on;
    one event each, the budget charged once and released."""
    with FakeLLMServer(chunk_delay=0.05) as fake:
        aclient = llmguard.instrument(fake.openai_client(async_client=True))

        @llmguard.debounced(wait=0.3)  # outside: the callers it serves reserve nothing
        @llmguard.budget(usd=1, name="typing", storage=f"file://{tmp_path}/ledger")
        async def suggest(text: str, model: str = "gpt-4o-mini", max_tokens: int = 50) -> Any:
            return await aclient.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                **STREAM_OPTIONS,
            )

        gate: list[asyncio.Event] = []

        async def read(text: str) -> list[Any]:
            stream = await suggest(text)
            await gate[0].wait()  # the impatient caller reads first
            return [chunk async for chunk in stream]

        async def impatient(text: str) -> list[Any]:
            stream = await suggest(text)
            chunks = [await stream.__anext__()]
            try:  # gives up while the next chunk is read (it comes 50 ms later)
                chunks.append(await asyncio.wait_for(stream.__anext__(), 0.005))
            except asyncio.TimeoutError:
                pass
            finally:
                gate[0].set()
            return chunks

        async def main() -> list[Any]:
            gate.append(asyncio.Event())
            tasks = []
            for text, reader in (("h", read), ("he", impatient), ("hello", read)):
                tasks.append(asyncio.create_task(reader(text)))
                await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

        first, cut, last = asyncio.run(main())
        assert len(fake.requests) == 1
    assert _text(first) == _text(last) == REPLY
    assert len(cut) == 1
    _assert_one_paid_stream(events, 3, first)
    status = llmguard.budget_status("typing")
    assert status.reserved_usd == 0
    [paid] = [e for e in events.calls if not e.get("debounced")]
    assert status.spent_usd == Decimal(str(paid["cost_usd"]))


def test_a_debounced_generator_runs_once_for_the_burst(
    flavour: str, events: CapturedEvents
) -> None:
    """Once "generator already executing" for every caller but one."""
    runs: list[str] = []
    if flavour == "sync":

        @llmguard.debounced(wait=0.3)
        def words(text: str) -> Iterator[str]:
            runs.append(text)
            for word in ("a", "burst", "of", "words"):
                time.sleep(0.002)
                yield word + " "

        results: list[str] = []
        threads = [
            threading.Thread(target=lambda t=t: results.append("".join(words(t))))
            for t in ("x", "xy", "xyz")
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join(10)
    else:

        async def generate() -> AsyncIterator[str]:
            for word in ("a", "burst", "of", "words"):
                await asyncio.sleep(0.002)
                yield word + " "

        @llmguard.debounced(wait=0.3)
        async def awords(text: str) -> AsyncIterator[str]:
            runs.append(text)
            return generate()

        async def read(text: str) -> str:
            return "".join([word async for word in await awords(text)])

        async def main() -> list[str]:
            tasks = []
            for text in ("x", "xy", "xyz"):
                tasks.append(asyncio.create_task(read(text)))
                await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

        results = asyncio.run(main())
    assert runs == ["xyz"]
    assert results == ["a burst of words "] * 3
    assert len(events.calls) == 3
    assert sum(1 for e in events.calls if e.get("debounced")) == 2


def test_a_caller_closing_its_stream_early_does_not_cut_the_others(
    events: CapturedEvents,
) -> None:
    with FakeLLMServer() as fake:
        client = llmguard.instrument(fake.openai_client())

        @llmguard.debounced(wait=0.3)
        def suggest(text: str, model: str = "gpt-4o-mini") -> Any:
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], **STREAM_OPTIONS
            )

        streams: dict[str, Any] = {}
        threads = [
            threading.Thread(target=lambda t=t: streams.__setitem__(t, suggest(t)))
            for t in ("he", "hello")
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join(10)
        early = streams["he"]
        next(early)
        early.close()
        assert events.calls == []  # still read by the other caller
        chunks = list(streams["hello"])
        assert len(fake.requests) == 1
    assert _text(chunks) == REPLY
    _assert_one_paid_stream(events, 2, chunks)


def test_a_stream_helper_is_refused_for_every_caller_before_it_is_sent(
    events: CapturedEvents,
) -> None:
    with FakeLLMServer() as fake:
        client = fake.anthropic_client()

        @llmguard.debounced(wait=0.3)
        def reply(text: str) -> Any:
            return client.messages.stream(
                model="claude-3-5-haiku-latest",
                max_tokens=50,
                messages=[{"role": "user", "content": text}],
            )

        outcomes: list[Any] = []

        def call(text: str) -> None:
            try:
                outcomes.append(reply(text))
            except TypeError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=call, args=(t,)) for t in ("a", "ab")]
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join(10)
        assert fake.requests == []
    assert [type(o) for o in outcomes] == [TypeError, TypeError]
    assert "create(stream=True)" in str(outcomes[0])
    assert len(events.calls) == 2

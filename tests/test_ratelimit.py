from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents

from .conftest import call


@pytest.fixture(params=["local", "memory", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One test body, every storage the rate limiter supports."""
    if request.param == "local":
        yield f"file://{tmp_path}/limits"
    elif request.param == "memory":
        yield f"memory://{tmp_path.name}"
    else:
        yield request.getfixturevalue("redis_uri")


def max_in_window(starts: list[float], window: float) -> int:
    """The most starts any window of ``window`` seconds contains."""
    starts = sorted(starts)
    best, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def limited(flavour: str, **options: Any) -> Any:
    starts: list[float] = []
    if flavour == "sync":

        @llmguard.rate_limited(**options)
        def f(i: int, model: str = "gpt-4o") -> int:
            starts.append(time.time())
            return i

    else:

        @llmguard.rate_limited(**options)
        async def f(i: int, model: str = "gpt-4o") -> int:  # type: ignore[misc]
            starts.append(time.time())
            return i

    f.starts = starts  # type: ignore[attr-defined]
    return f


def test_blocks_until_the_window_allows(flavour: str, backend: str, events: CapturedEvents) -> None:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    f = limited(flavour, rate="4/second", storage=backend, sleep=sleep, async_sleep=async_sleep)
    assert [call(f, i) for i in range(7)] == list(range(7))
    assert max_in_window(f.starts, 1.0) <= 4
    assert f.starts[4] - f.starts[0] >= 0.99
    assert len(waits) <= 4  # computed from the window's reset time, not polled
    waited = [e["rate_wait_s"] for e in events.calls]
    assert waited[:4] == [0.0] * 4  # the first four fit the window
    assert waited[4] > 0  # the fifth waited for the first to leave it (see starts above)


def test_block_false_raises_at_once_with_retry_after(flavour: str, backend: str) -> None:
    f = limited(flavour, rate="2/second", storage=backend, block=False)
    call(f, 1)
    call(f, 2)
    started = time.monotonic()
    with pytest.raises(llmguard.RateLimitExceeded) as info:
        call(f, 3)
    assert time.monotonic() - started < 0.5
    assert 0 < info.value.retry_after <= 1.05  # type: ignore[operator]  # window + margin
    assert info.value.limit == "2 per 1 second"


def test_max_wait(backend: str) -> None:
    f = limited("sync", rate="1/minute", storage=backend, max_wait=0.2)
    call(f, 1)
    with pytest.raises(llmguard.RateLimitExceeded) as info:
        call(f, 2)
    assert 50 < info.value.retry_after <= 61.2  # type: ignore[operator]  # + 2% margin


def test_token_limit_counts_prompt_and_output_budget(backend: str) -> None:
    sizes: list[int] = []

    @llmguard.rate_limited(
        tokens="1000/minute", storage=backend, block=False, default_output_tokens=300
    )
    def ask(text: str, max_tokens: int | None = None, model: str = "gpt-4o") -> str:
        sizes.append(len(text))
        return text

    prompt = " ".join(["word"] * 100)  # 100 tokens
    assert llmguard.count_tokens(prompt, "gpt-4o") == 100
    ask(prompt, max_tokens=400)  # 500
    ask(prompt)  # 100 + default 300 = 400; total 900
    with pytest.raises(llmguard.RateLimitExceeded) as info:
        ask(prompt, max_tokens=101)  # 201 > 100 left
    assert "tokens" not in info.value.limit or info.value.limit == "1000 per 1 minute"
    ask("", max_tokens=99)  # 99 fits
    with pytest.raises(llmguard.RequestTooLarge):
        ask(prompt, max_tokens=5000)


def test_messages_are_counted_with_the_chat_formula() -> None:
    @llmguard.rate_limited(tokens="10000/minute", storage="memory://msgs")
    def chat(messages: list[dict[str, str]], max_tokens: int = 0, model: str = "gpt-4o") -> str:
        return "ok"

    layer = chat.__llmguard__.layers[0]  # type: ignore[attr-defined]
    from llmguard._pipeline import CallRecord

    messages = [{"role": "user", "content": "hello there"}]
    record = CallRecord(chat.__llmguard__, (messages,), {"max_tokens": 50}, None)  # type: ignore[attr-defined]
    assert layer.token_cost(record) == llmguard.count_message_tokens(messages, "gpt-4o") + 50


def test_key_gives_each_user_a_limit_and_name_shares_one(backend: str) -> None:
    @llmguard.rate_limited("1/minute", key=lambda user, **_: user, storage=backend, block=False)
    def per_user(user: str) -> str:
        return user

    per_user("alice")
    per_user("bob")
    with pytest.raises(llmguard.RateLimitExceeded):
        per_user("alice")

    @llmguard.rate_limited("1/minute", name="openai-shared", storage=backend, block=False)
    def one() -> int:
        return 1

    @llmguard.rate_limited("1/minute", name="openai-shared", storage=backend, block=False)
    def two() -> int:
        return 2

    one()
    with pytest.raises(llmguard.RateLimitExceeded):
        two()


def test_retry_outside_rate_limited_waits_for_the_window() -> None:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    @llmguard.retry_on_rate_limit(jitter=None, sleep=sleep)
    @llmguard.rate_limited("2/second", storage="memory://retry-order", block=False)
    def f(i: int) -> int:
        return i

    assert [f(i) for i in range(3)] == [0, 1, 2]
    assert len(waits) == 1
    assert 0.5 < waits[0] <= 1.05


def test_bad_configuration_fails_at_decoration() -> None:
    for args, options in [
        (("60/minut",), {}),
        ((), {}),
        (("10/second",), {"tokens": "lots"}),
        (("10/second",), {"storage": "custom-thing://x"}),
        (("10/second",), {"max_wait": -1}),
    ]:
        with pytest.raises(llmguard.ConfigurationError):
            llmguard.rate_limited(*args, **options)
    with pytest.raises(llmguard.ConfigurationError, match="rate string"):
        llmguard.rate_limited(lambda: 1)  # type: ignore[call-overload]


def _burst(storage: str, ready: Any, out: Any) -> None:
    import threading
    import time as t

    import llmguard as lg

    starts: list[float] = []

    @lg.rate_limited("20/second", storage=storage, max_wait=10)
    def work(i: int) -> None:
        starts.append(t.time())

    work(-1)  # warm up (imports, storage, tokenizer), like a running worker
    starts.clear()
    ready.wait()  # every process starts the load together
    deadline = t.time() + 3.0

    def worker() -> None:
        i = 0
        while t.time() < deadline:
            work(i)
            i += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(starts)


@pytest.mark.parametrize("where", ["default", "redis"])
def test_proof_4_processes_x_4_threads_hold_20_per_second(
    where: str, request: pytest.FixtureRequest
) -> None:
    storage = "local" if where == "default" else request.getfixturevalue("redis_uri")
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    ready = context.Barrier(4)
    workers = [context.Process(target=_burst, args=(storage, ready, out)) for _ in range(4)]
    for worker in workers:
        worker.start()
    starts = [at for _ in workers for at in out.get(timeout=60)]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert len(starts) >= 40  # the limit was actually exercised
    # Every one-second window holds at most 20 starts. (Starts are stamped by the function
    # itself, a few microseconds after the limiter granted them; 2 ms of slack absorbs a
    # thread being descheduled in between, which says nothing about the limiter.)
    assert max_in_window(starts, 0.998) <= 20

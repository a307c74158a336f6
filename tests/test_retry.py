from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

import llmguard
from llmguard._retry import classify, retry_after
from llmguard.testing import CapturedEvents, FakeLLMServer

MESSAGES = [{"role": "user", "content": "hello"}]


class Naps:
    """An injected sleep: records the waits, sleeps not at all."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def ask_fn(flavour: str, fake: FakeLLMServer, naps: Naps, **options: Any) -> Any:
    """A decorated function calling the fake with the real openai SDK (its retries off)."""
    options = {"jitter": None, "sleep": naps, "async_sleep": naps.asleep, **options}
    if flavour == "sync":
        client = fake.openai_client()

        @llmguard.retry_on_rate_limit(**options)
        def ask(question: str) -> str:
            reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            return str(reply.choices[0].message.content)

        return ask
    aclient = fake.openai_client(async_client=True)

    @llmguard.retry_on_rate_limit(**options)
    async def aask(question: str) -> str:
        reply = await aclient.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return str(reply.choices[0].message.content)

    return lambda q: asyncio.run(aask(q))


def test_honours_retry_after(flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents) -> None:
    naps = Naps()
    fake_llm.fail_next(2, 429, retry_after=0.75)
    ask = ask_fn(flavour, fake_llm, naps)
    assert ask("q").startswith("Fake reply")
    assert naps.waits == [0.75, 0.75]
    retries = events.of("llm_retry")
    assert [(r["attempt"], r["status"], r["reason"], r["wait_s"]) for r in retries] == [
        (1, 429, "rate_limit", 0.75),
        (2, 429, "rate_limit", 0.75),
    ]
    [done] = events.calls
    assert (done["attempts"], done["retry_wait_s"], done["outcome"]) == (3, 1.5, "ok")


def test_exponential_backoff_without_retry_after(flavour: str, fake_llm: FakeLLMServer) -> None:
    naps = Naps()
    fake_llm.fail_next(4, 503)
    ask = ask_fn(flavour, fake_llm, naps, initial_wait=0.5, max_wait=3)
    ask("q")
    assert naps.waits == [0.5, 1.0, 2.0, 3.0]


def test_full_jitter_stays_within_the_exponential_bound(fake_llm: FakeLLMServer) -> None:
    naps = Naps()
    fake_llm.fail_next(3, 500)
    ask = ask_fn("sync", fake_llm, naps, jitter=llmguard_full_jitter(), initial_wait=1.0)
    ask("q")
    assert len(naps.waits) == 3
    assert all(0 <= w <= bound for w, bound in zip(naps.waits, [1, 2, 4], strict=True))


def llmguard_full_jitter() -> Any:
    import backoff

    return backoff.full_jitter


def test_gives_up_after_max_tries_with_the_original_exception(
    flavour: str, fake_llm: FakeLLMServer
) -> None:
    import openai

    naps = Naps()
    fake_llm.fail_next(10, 429, retry_after=0.1)
    ask = ask_fn(flavour, fake_llm, naps, max_tries=3)
    with pytest.raises(openai.RateLimitError) as info:
        ask("q")
    assert info.value.status_code == 429
    assert len(naps.waits) == 2
    assert fake_llm.statuses == [429, 429, 429]


def test_never_retries_an_exhausted_quota(flavour: str, events: CapturedEvents) -> None:
    import openai

    naps = Naps()
    with FakeLLMServer(quota_exhausted=True) as fake:
        ask = ask_fn(flavour, fake, naps)
        with pytest.raises(openai.RateLimitError, match="quota"):
            ask("q")
        assert fake.statuses == [429]
    assert naps.waits == []
    assert events.calls[0]["attempts"] == 1


def test_max_wait_caps_and_max_time_gives_up(fake_llm: FakeLLMServer) -> None:
    import openai

    naps = Naps()
    fake_llm.fail_next(1, 429, retry_after=500)
    ask_fn("sync", fake_llm, naps, max_wait=2)("q")
    assert naps.waits == [2]

    clock = iter([0.0, 10.0, 100.0])
    fake_llm.fail_next(2, 429, retry_after=30)
    ask = ask_fn("sync", fake_llm, naps, max_time=120, clock=lambda: next(clock))
    with pytest.raises(openai.RateLimitError):
        ask("q")  # the second retry would end past max_time
    assert naps.waits == [2, 30]


def test_server_errors_timeouts_and_dropped_connections(
    flavour: str, fake_llm: FakeLLMServer
) -> None:
    naps = Naps()
    fake_llm.fail_next(1, 502)
    fake_llm.drop_next(1)
    ask = ask_fn(flavour, fake_llm, naps)
    ask("q")
    assert len(naps.waits) == 2


def test_server_errors_off(fake_llm: FakeLLMServer) -> None:
    import openai

    naps = Naps()
    fake_llm.fail_next(1, 500)
    with pytest.raises(openai.InternalServerError):
        ask_fn("sync", fake_llm, naps, server_errors=False)("q")
    fake_llm.fail_next(1, 429, retry_after=0.2)
    ask_fn("sync", fake_llm, naps, server_errors=False)("q")  # 429s still are
    assert naps.waits == [0.2]


def test_anthropic_overloaded_and_rate_limited(flavour: str, fake_llm: FakeLLMServer) -> None:
    naps = Naps()
    fake_llm.fail_next(1, 529, retry_after=1)
    fake_llm.fail_next(1, 429, retry_after=2)
    request = {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": MESSAGES}
    options = {"jitter": None, "sleep": naps, "async_sleep": naps.asleep, "server_errors": False}
    if flavour == "sync":
        client = fake_llm.anthropic_client()

        @llmguard.retry_on_rate_limit(**options)
        def ask() -> Any:
            return client.messages.create(**request)

        ask()
    else:
        aclient = fake_llm.anthropic_client(async_client=True)

        @llmguard.retry_on_rate_limit(**options)
        async def aask() -> Any:
            return await aclient.messages.create(**request)

        asyncio.run(aask())
    assert naps.waits == [1, 2]


def test_local_rate_limit_refusals_are_retried_only_when_asked() -> None:
    naps = Naps()
    attempts: list[int] = []

    def limited() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise llmguard.RateLimitExceeded("busy", retry_after=0.25, limit="1 per 1 second")
        return "ok"

    # @rate_limited's own refusal is not provider trouble: not retried by default...
    with pytest.raises(llmguard.RateLimitExceeded):
        llmguard.retry_on_rate_limit(jitter=None, sleep=naps)(limited)()
    assert (len(attempts), naps.waits) == (1, [])
    # ...but retry_on names it: then it waits its retry_after
    retried = llmguard.retry_on_rate_limit(
        jitter=None, sleep=naps, retry_on=(llmguard.RateLimitExceeded,)
    )(limited)
    assert retried() == "ok"
    assert naps.waits == [0.25]

    @llmguard.retry_on_rate_limit(jitter=None, sleep=naps, retry_on=(llmguard.RateLimitExceeded,))
    def too_large() -> str:
        raise llmguard.RequestTooLarge("never fits", retry_after=None, limit="10 per 1 minute")

    with pytest.raises(llmguard.RequestTooLarge):
        too_large()  # can never pass: not even retry_on retries it
    assert len(naps.waits) == 1


def test_retry_on_adds_types_and_others_pass_through() -> None:
    class Flaky(Exception):
        pass

    naps = Naps()
    calls: list[int] = []

    @llmguard.retry_on_rate_limit(retry_on=(Flaky,), jitter=None, sleep=naps, initial_wait=0.1)
    def f() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Flaky
        if len(calls) == 2:
            raise KeyError("not retried")
        return "ok"

    with pytest.raises(KeyError):
        f()
    assert len(calls) == 2


def _response(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://x"))


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            httpx.HTTPStatusError(
                "429", request=httpx.Request("GET", "http://x"), response=_response(429)
            ),
            "rate_limit",
        ),
        (type("Custom", (Exception,), {"status_code": 429})(), "rate_limit"),
        (type("Custom", (Exception,), {"status": 529})(), "overloaded"),
        (type("EnforcedSpendLimitReachedError", (Exception,), {"status_code": 429})(), None),
        (type("RateLimitError", (Exception,), {"code": "insufficient_quota"})(), None),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "connection"),
        (httpx.ConnectError("refused"), "connection"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (ValueError("bug"), None),
    ],
)
def test_classify(exc: BaseException, reason: str | None) -> None:
    assert classify(exc, server_errors=True, retry_on=()) == reason


def test_retry_after_header_forms() -> None:
    class WithResponse(Exception):
        def __init__(self, headers: dict[str, str]) -> None:
            self.response = _response(429, headers)

    assert retry_after(WithResponse({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after(WithResponse({"retry-after": "7"})) == 7
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after(WithResponse({"retry-after": date}), now=now.timestamp) == 30
    assert retry_after(WithResponse({"retry-after": "soon"})) is None
    assert retry_after(WithResponse({})) is None


def test_bad_configuration() -> None:
    for options in ({"max_tries": 0}, {"max_wait": -1}, {"retry_on": (int,)}, {"max_time": "1m"}):
        with pytest.raises(llmguard.ConfigurationError):
            llmguard.retry_on_rate_limit(**options)  # type: ignore[call-overload]

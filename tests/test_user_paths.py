"""The paths users walk (issue 11): every policy of the README's first example stacked
(``@cached``, ``@route_model`` with fallbacks, ``@budget``, ``@retry_on_rate_limit``,
``@rate_limited``) over ``instrument()``ed OpenAI and Anthropic clients, sync and async,
for plain calls, streams and the SDKs' stream helpers, against a provider that answers a
429 with ``retry-after`` once and fails a model outright.

For every call: one event; its tokens are the provider's usage; a cache hit costs $0; and
the budget's ledger holds exactly the sum of the events' costs, nothing reserved. Then an
async server whose requests time out or are cancelled mid-stream: each still logs one event
and releases its reservation.
"""

from __future__ import annotations

import asyncio
import inspect
from decimal import Decimal
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer, settle_dropped_streams

MODELS = {  # provider -> (default, cheap, fallback)
    "openai": ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini"),
    "anthropic": ("claude-3-5-sonnet-latest", "claude-3-5-haiku-latest", "claude-3-haiku-20240307"),
}
PATHS = [
    "chat",
    "chat-stream",
    "chat-helper",
    "responses",
    "responses-stream",
    "responses-helper",
    "messages",
    "messages-stream",
    "messages-helper",
]
INCLUDE_USAGE = {"include_usage": True}
SHORT = "Why is the sky blue?"  # routed to the cheap model
LONG = "Explain, with care and in some detail, why the sky looks blue at noon."  # the default


def _provider(path: str) -> str:
    return "anthropic" if path.startswith("messages") else "openai"


def _sdk_call(path: str, client: Any, model: str, question: str, max_tokens: int) -> Any:
    """The provider call a user writes: a response, a stream, or a stream helper's manager
    (a coroutine of the first two with an async client)."""
    messages = [{"role": "user", "content": question}]
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    responses: dict[str, Any] = {"model": model, "input": question, "max_output_tokens": max_tokens}
    if path == "chat":
        return client.chat.completions.create(**chat)
    if path == "chat-stream":
        return client.chat.completions.create(**chat, stream=True, stream_options=INCLUDE_USAGE)
    if path == "chat-helper":
        return client.chat.completions.stream(**chat, stream_options=INCLUDE_USAGE)
    if path == "responses":
        return client.responses.create(**responses)
    if path == "responses-stream":
        return client.responses.create(**responses, stream=True)
    if path == "responses-helper":
        return client.responses.stream(**responses)
    if path == "messages":
        return client.messages.create(**chat)
    if path == "messages-stream":
        return client.messages.create(**chat, stream=True)
    assert path == "messages-helper"
    return client.messages.stream(**chat)


def _anthropic_input(usage: Any) -> int:
    return int(
        usage.input_tokens
        + (usage.cache_read_input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
    )


def _from_events(path: str, events: list[Any]) -> tuple[str, tuple[int, int]]:
    """(text, (input, output) tokens the provider reported) of a raw stream's events."""
    if path == "chat-stream":
        text = "".join(c.choices[0].delta.content or "" for c in events if c.choices)
        usage = events[-1].usage
        return text, (usage.prompt_tokens, usage.completion_tokens)
    if path == "responses-stream":
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        usage = events[-1].response.usage
        return text, (usage.input_tokens, usage.output_tokens)
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    start = next(e for e in events if e.type == "message_start").message.usage
    end = next(e for e in events if e.type == "message_delta").usage
    return text, (_anthropic_input(start), end.output_tokens)


def _from_final(path: str, final: Any) -> tuple[str, tuple[int, int]]:
    """(text, (input, output) tokens) of a response, completion or message."""
    usage = final.usage
    if path.startswith("chat"):
        return final.choices[0].message.content, (usage.prompt_tokens, usage.completion_tokens)
    if path.startswith("responses"):
        return final.output_text, (usage.input_tokens, usage.output_tokens)
    return final.content[0].text, (_anthropic_input(usage), usage.output_tokens)


def _read(path: str, result: Any) -> tuple[str, tuple[int, int]]:
    if path.endswith("-stream"):
        return _from_events(path, list(result))
    if path.endswith("-helper"):
        with result as stream:
            if path == "chat-helper":
                return _from_final(path, stream.get_final_completion())
            if path == "responses-helper":
                return _from_final(path, stream.get_final_response())
            return _from_final(path, stream.get_final_message())
    return _from_final(path, result)


async def _aread(path: str, result: Any) -> tuple[str, tuple[int, int]]:
    if path.endswith("-stream"):
        return _from_events(path, [event async for event in result])
    if path.endswith("-helper"):
        async with result as stream:
            if path == "chat-helper":
                return _from_final(path, await stream.get_final_completion())
            if path == "responses-helper":
                return _from_final(path, await stream.get_final_response())
            return _from_final(path, await stream.get_final_message())
    return _from_final(path, result)


def _stack(provider: str, name: str, waits: list[float], **storage: Any) -> Any:
    """The README's first example: every policy, in its order."""
    default, cheap, fallback = MODELS[provider]

    def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    def stack(fn: Any) -> Any:
        fn = llmguard.rate_limited(
            "600/minute", tokens="1000000/minute", sleep=sleep, async_sleep=async_sleep, **storage
        )(fn)
        fn = llmguard.retry_on_rate_limit(
            max_tries=3, jitter=None, sleep=sleep, async_sleep=async_sleep
        )(fn)
        fn = llmguard.budget(usd=5, per="day", name=name, **storage)(fn)
        fn = llmguard.route_model(
            default,
            cheap=cheap,
            when=lambda question, **_: len(question) < 40,
            fallbacks=(fallback,),
        )(fn)
        return llmguard.cached(ttl="7d", **storage)(fn)

    return stack


def _assert_ledger(name: str, events: CapturedEvents) -> None:
    """The ledger holds exactly what the events cost, nothing reserved."""
    status = llmguard.budget_status(name)
    assert status.reserved_usd == 0
    charged = (e.get("budget_charged_usd", e["cost_usd"]) for e in events.calls)
    assert status.spent_usd == sum((Decimal(str(c)) for c in charged), Decimal(0))


def _assert_paid(event: dict[str, Any], model: str, tokens: tuple[int, int]) -> None:
    assert event["cost_source"] == "usage"
    assert event["outcome"] == "ok"
    assert event["model"] == model
    assert (event["input_tokens"], event["output_tokens"]) == tokens
    cost = llmguard.calc_cost(model, *tokens)
    assert cost is not None
    assert event["cost_usd"] == float(cost) > 0


@pytest.mark.parametrize("path", PATHS)
def test_every_policy_stacked_on_every_path(
    path: str, flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    provider = _provider(path)
    default, cheap, fallback = MODELS[provider]
    aio = flavour == "async"
    make = fake_llm.anthropic_client if provider == "anthropic" else fake_llm.openai_client
    name = f"paths-{path}-{flavour}"
    waits: list[float] = []
    stack = _stack(provider, name, waits)

    if aio:
        aclients: list[Any] = []  # one per event loop: each call below runs its own

        @stack
        async def aask(question: str, *, model: str = default, max_tokens: int = 60) -> Any:
            result = _sdk_call(path, aclients[-1], model, question, max_tokens)
            return (await result) if inspect.isawaitable(result) else result

        async def ask_and_read(question: str) -> tuple[str, tuple[int, int]]:
            aclients.append(llmguard.instrument(make(async_client=True)))
            try:
                return await _aread(path, await aask(question))
            finally:
                await aclients[-1].close()

        def call(question: str) -> tuple[str, tuple[int, int]]:
            return asyncio.run(ask_and_read(question))
    else:
        client = llmguard.instrument(make())

        @stack
        def ask(question: str, *, model: str = default, max_tokens: int = 60) -> Any:
            return _sdk_call(path, client, model, question, max_tokens)

        def call(question: str) -> tuple[str, tuple[int, int]]:
            return _read(path, ask(question))

    helper = path.endswith("-helper")
    fake_llm.fail_next(1, 429, retry_after=1)
    if helper:
        # A helper sends its request when its block is entered, in the caller's hands: the
        # 429 reaches the caller (one event, nothing charged, the reservation released),
        # who calls again.
        import anthropic
        import openai

        with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)):
            call(SHORT)
        [refused] = events.calls
        assert (refused["outcome"], refused["cost_usd"]) == ("error", 0)
        _assert_ledger(name, events)
    text, tokens = call(SHORT)
    paid = events.calls[-1]
    _assert_paid(paid, cheap, tokens)
    assert (paid["cache"], paid["route"]) == ("miss", "cheap:when")
    if not helper:  # retried inside the call, as the provider asked
        assert paid["attempts"] == 2
        assert waits == [1.0]
    _assert_ledger(name, events)

    # the same question again: served from the cache, nothing sent, $0
    sent = len(fake_llm.requests)
    assert call(SHORT) == (text, tokens)
    hit = events.calls[-1]
    assert (hit["cache"], hit["cost_usd"], hit["saved_usd"]) == ("hit", 0, paid["cost_usd"])
    assert len(fake_llm.requests) == sent
    _assert_ledger(name, events)

    calls = 3 if helper else 2
    if not helper:
        # the default model keeps failing: retried, then the fallback answers
        fake_llm.fail_next(3, 500)
        text, tokens = call(LONG)
        failed_over = events.calls[-1]
        _assert_paid(failed_over, fallback, tokens)
        assert failed_over["route"] == "fallback:1"
        assert [r.model for r in fake_llm.requests[-4:]] == [default] * 3 + [fallback]
        calls += 1
    assert len(events.calls) == calls  # one event per call
    _assert_ledger(name, events)


CHUNK_DELAY = 0.05


def _latency(request: Any) -> float:
    """The provider is slow to answer questions about slowness."""
    return 1.0 if "slow" in str(request.body.get("messages")) else 0.0


def test_an_async_server_whose_requests_time_out_or_are_cancelled_mid_stream(
    events: CapturedEvents, redis_uri: str
) -> None:
    """Requests served concurrently, each streaming its answer: one times out before the
    provider answers, one times out mid-stream (``asyncio.wait_for`` around the consumer),
    one is cancelled mid-stream, two complete. Each logs one event; every reservation is
    released and the ledger (on Redis) holds what the events cost."""
    with FakeLLMServer(chunk_delay=CHUNK_DELAY, latency=_latency) as fake:
        aclient = llmguard.instrument(fake.openai_client(async_client=True))
        waits: list[float] = []

        @_stack("openai", "server", waits, storage=redis_uri)
        async def answer(question: str, *, model: str = "gpt-4o", max_tokens: int = 60) -> Any:
            return await aclient.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                stream=True,
                stream_options=INCLUDE_USAGE,
            )

        async def consume(stream: Any, reading: asyncio.Event | None = None) -> str:
            parts = []
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                if reading is not None and len(parts) == 2:
                    reading.set()
            return "".join(parts)

        async def handle(question: str, reading: asyncio.Event | None = None) -> str:
            """A request handler: streams the answer to its client."""
            return await consume(await answer(question), reading)

        async def handle_in_time(question: str) -> str:
            """A handler that gives the stream a deadline once it has started."""
            stream = await answer(question)
            return await asyncio.wait_for(consume(stream), 3 * CHUNK_DELAY)

        async def main() -> list[Any]:
            # a first request read to its end: the budget has seen what this function costs
            first = await handle("a first answer, read to its end")
            slow = asyncio.create_task(asyncio.wait_for(handle("a slow answer"), 0.3))
            timed_out = asyncio.create_task(handle_in_time("an answer cut by a timeout"))
            reading = asyncio.Event()
            cancelled = asyncio.create_task(handle("an answer that is cancelled", reading))
            complete = asyncio.create_task(handle("another answer read to its end"))
            await asyncio.wait_for(reading.wait(), 10)
            cancelled.cancel()
            rest = await asyncio.gather(
                slow, timed_out, cancelled, complete, return_exceptions=True
            )
            await aclient.close()
            return [first, *rest]

        outcomes = asyncio.run(main())
        settle_dropped_streams()
    assert [type(o) for o in outcomes[1:4]] == [
        asyncio.TimeoutError,
        asyncio.TimeoutError,
        asyncio.CancelledError,
    ]
    assert outcomes[0] == "Fake reply about: a first answer, read to its end"
    assert outcomes[4] == "Fake reply about: another answer read to its end"
    assert len(events.calls) == 5  # one event per request
    done = [e for e in events.calls if e["outcome"] == "ok"]
    assert [e["cost_source"] for e in done] == ["usage", "usage"]
    errors = [e for e in events.calls if e["outcome"] == "error"]
    assert [e["error"] for e in errors] == ["CancelledError"] * 3
    cut = [e for e in errors if e.get("stream_chunks")]
    assert len(cut) == 2  # cut mid-stream: what was read is estimated, and charged
    assert all(e["cost_source"] == "estimate" and e["cost_usd"] > 0 for e in cut)
    [unanswered] = [e for e in errors if not e.get("stream_chunks")]
    assert unanswered["cost_usd"] == 0  # timed out before any answer: its cost is unknown
    assert unanswered["cost_source"] == "unanswered"  # but the request was sent: the budget
    assert unanswered["budget_charged_usd"] > 0  # charges its worst case (a hard cap)
    _assert_ledger("server", events)

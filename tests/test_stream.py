"""Streams returned by decorated functions are metered when consumed (issue 7, first part)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

MESSAGES = [{"role": "user", "content": "stream me a reply please"}]
REPLY = "Fake reply about: stream me a reply please"


def test_a_returned_openai_stream_is_metered_when_consumed(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    options: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if flavour == "sync":
        client = fake_llm.openai_client()

        @llmguard.track
        def ask() -> Any:
            return client.chat.completions.create(**options)

        stream = ask()
        assert events.calls == []  # nothing is known until it is consumed
        chunks = list(stream)
    else:
        aclient = fake_llm.openai_client(async_client=True)

        @llmguard.track
        async def aask() -> Any:
            return await aclient.chat.completions.create(**options)

        async def main() -> list[Any]:
            stream = await aask()
            assert events.calls == []
            return [chunk async for chunk in stream]

        chunks = asyncio.run(main())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    [event] = events.calls
    usage = chunks[-1].usage
    assert event["cost_source"] == "usage"
    assert (event["input_tokens"], event["output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert event["model"] == "gpt-4o-mini"
    assert event["stream_chunks"] == len(chunks)
    assert event["cost_usd"] == float(
        llmguard.calc_cost("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
    )  # type: ignore[arg-type]


def test_without_a_usage_chunk_the_deltas_are_estimated(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = fake_llm.openai_client()

    @llmguard.track
    def ask(messages: list[dict[str, str]], model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(model=model, messages=messages, stream=True)

    text = "".join(c.choices[0].delta.content or "" for c in ask(MESSAGES) if c.choices)
    [event] = events.calls
    assert event["cost_source"] == "estimate"
    assert event["output_tokens"] == llmguard.count_tokens(text, "gpt-4o")
    assert event["input_tokens"] == llmguard.count_message_tokens(MESSAGES, "gpt-4o")


def test_anthropic_raw_event_streams(fake_llm: FakeLLMServer, events: CapturedEvents) -> None:
    client = fake_llm.anthropic_client()

    @llmguard.track
    def ask() -> Any:
        return client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": "stream this"}],
            stream=True,
        )

    pieces = [e.delta.text for e in ask() if e.type == "content_block_delta"]
    assert "".join(pieces) == "Fake reply about: stream this"
    [event] = events.calls
    assert event["cost_source"] == "usage"
    assert event["model"] == "claude-3-5-haiku-latest"
    assert event["output_tokens"] == llmguard.count_tokens(
        "Fake reply about: stream this", "claude-3-5-haiku-latest"
    )


def test_closed_early_is_metered_with_what_was_consumed(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = fake_llm.openai_client()

    @llmguard.track
    def ask() -> Any:
        return client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)

    stream = ask()
    consumed = [next(stream), next(stream), next(stream)]
    stream.close()
    text = "".join(c.choices[0].delta.content or "" for c in consumed)
    [event] = events.calls
    assert (event["outcome"], event["stream_chunks"]) == ("ok", 3)
    assert event["output_tokens"] == llmguard.count_tokens(text, "gpt-4o")
    stream.close()  # closing twice logs nothing more
    assert len(events.calls) == 1


def test_generators_and_failures(flavour: str, events: CapturedEvents) -> None:
    if flavour == "sync":

        @llmguard.track(model="gpt-4o")
        def pieces(fail: bool) -> Iterator[str]:
            yield "Hello "
            if fail:
                raise ConnectionError("stream cut")
            yield "world"

        assert "".join(pieces(False)) == "Hello world"
        with pytest.raises(ConnectionError):
            list(pieces(True))
    else:

        @llmguard.track(model="gpt-4o")
        async def apieces(fail: bool) -> Any:
            yield "Hello "
            if fail:
                raise ConnectionError("stream cut")
            yield "world"

        async def main() -> str:
            text = "".join([p async for p in apieces(False)])
            with pytest.raises(ConnectionError):
                [p async for p in apieces(True)]
            return text

        assert asyncio.run(main()) == "Hello world"
    ok, failed = events.calls
    assert (ok["outcome"], ok["output_tokens"]) == (
        "ok",
        llmguard.count_tokens("Hello world", "gpt-4o"),
    )
    assert (failed["outcome"], failed["error"]) == ("error", "ConnectionError")


def test_instrument_meters_streams_consumed_inside(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = llmguard.instrument(fake_llm.openai_client())

    @llmguard.track
    def ask() -> str:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert ask() == REPLY
    [event] = events.calls
    assert event["cost_source"] == "usage"
    assert event["output_tokens"] == llmguard.count_tokens(REPLY, "gpt-4o")


def test_cached_streams_replay_the_same_chunk_types(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    options: dict[str, Any] = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    cache = llmguard.cached(storage=f"file://{tmp_path}/c")
    if flavour == "sync":
        client = fake_llm.openai_client()

        @cache
        def ask(question: str) -> Any:
            return client.chat.completions.create(
                messages=[{"role": "user", "content": question}], **options
            )

        first, second = list(ask("q")), list(ask("q"))
    else:
        aclient = fake_llm.openai_client(async_client=True)

        @cache
        async def aask(question: str) -> Any:
            return await aclient.chat.completions.create(
                messages=[{"role": "user", "content": question}], **options
            )

        async def main() -> tuple[list[Any], list[Any]]:
            one = [chunk async for chunk in await aask("q")]
            two = [chunk async for chunk in await aask("q")]
            return one, two

        first, second = asyncio.run(main())
    assert len(fake_llm.requests) == 1
    assert [type(c) for c in second] == [type(c) for c in first]
    assert [c.model_dump() for c in second] == [c.model_dump() for c in first]
    text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    assert text == "Fake reply about: q"
    miss, hit = events.calls
    assert (miss["cache"], hit["cache"], hit["cost_usd"]) == ("miss", "hit", 0.0)
    assert hit["saved_usd"] == miss["cost_usd"] > 0
    assert hit["stream_chunks"] == len(first)


def test_a_stream_abandoned_half_way_is_never_cached(
    fake_llm: FakeLLMServer, tmp_path: Any
) -> None:
    client = fake_llm.openai_client()

    @llmguard.cached(storage=f"file://{tmp_path}/c")
    def ask(question: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True
        )

    stream = ask("q")
    next(stream)
    stream.close()
    assert ask.cache_info().entries == 0
    list(ask("q"))
    assert ask.cache_info().entries == 1
    assert len(fake_llm.requests) == 2


def test_concurrent_identical_streams_make_one_upstream_call(tmp_path: Any) -> None:
    import threading

    with FakeLLMServer(chunk_delay=0.01) as fake:
        client = fake.openai_client()

        @llmguard.cached(storage=f"file://{tmp_path}/c")
        def ask(question: str) -> Any:
            return client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True
            )

        texts: list[str] = []
        gate = threading.Barrier(16)

        def worker() -> None:
            gate.wait()
            texts.append(
                "".join(c.choices[0].delta.content or "" for c in ask("same") if c.choices)
            )

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(fake.requests) == 1
    assert texts == ["Fake reply about: same"] * 16


def test_budget_holds_the_reservation_until_the_stream_ends(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    from decimal import Decimal

    options: dict[str, Any] = {
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 100,
    }
    budget = llmguard.budget(usd="1", name=f"streamed-{flavour}", storage=f"file://{tmp_path}/l")
    if flavour == "sync":
        client = fake_llm.openai_client()

        @budget
        def ask(*, model: str = "gpt-4o", max_tokens: int = 100) -> Any:
            return client.chat.completions.create(model=model, **options)

        stream = ask()
        held = llmguard.budget_status(f"streamed-{flavour}")
        chunks = list(stream)
    else:
        aclient = fake_llm.openai_client(async_client=True)

        @budget
        async def aask(*, model: str = "gpt-4o", max_tokens: int = 100) -> Any:
            return await aclient.chat.completions.create(model=model, **options)

        async def main() -> tuple[Any, list[Any]]:
            stream = await aask()
            status = llmguard.budget_status(f"streamed-{flavour}")
            return status, [chunk async for chunk in stream]

        held, chunks = asyncio.run(main())
    assert held.reserved_usd > 0  # reserved while the stream is open
    assert held.spent_usd == 0
    done = llmguard.budget_status(f"streamed-{flavour}")
    [event] = events.calls
    assert done.reserved_usd == 0
    assert done.spent_usd == Decimal(str(event["cost_usd"])) > 0  # settled at the real cost
    assert event["budget_spent_usd"] == event["cost_usd"]
    assert chunks[-1].usage is not None


def test_anthropic_async_raw_event_streams(fake_llm: FakeLLMServer, events: CapturedEvents) -> None:
    aclient = fake_llm.anthropic_client(async_client=True)

    @llmguard.track
    async def ask() -> Any:
        return await aclient.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": "stream this"}],
            stream=True,
        )

    async def main() -> str:
        return "".join([e.delta.text async for e in await ask() if e.type == "content_block_delta"])

    assert asyncio.run(main()) == "Fake reply about: stream this"
    [event] = events.calls
    assert (event["cost_source"], event["model"]) == ("usage", "claude-3-5-haiku-latest")
    assert event["input_tokens"] > 0


def test_anthropic_stream_helper_is_metered_when_its_block_exits(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    request: dict[str, Any] = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "stream this"}],
    }
    if flavour == "sync":
        client = fake_llm.anthropic_client()

        @llmguard.track
        def ask() -> Any:
            return client.messages.stream(**request)

        with ask() as stream:
            assert events.calls == []
            text = "".join(stream.text_stream)
    else:
        aclient = fake_llm.anthropic_client(async_client=True)

        @llmguard.track
        def aask() -> Any:
            return aclient.messages.stream(**request)

        async def main() -> str:
            async with aask() as stream:
                return "".join([piece async for piece in stream.text_stream])

        text = asyncio.run(main())
    assert text == "Fake reply about: stream this"
    [event] = events.calls
    assert (event["cost_source"], event["model"]) == ("usage", "claude-3-5-haiku-latest")
    assert event["output_tokens"] == llmguard.count_tokens(text, "claude-3-5-haiku-latest")


def test_instrumented_anthropic_stream_helper_inside_a_function(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = llmguard.instrument(fake_llm.anthropic_client())

    @llmguard.track
    def ask() -> str:
        with client.messages.stream(
            model="claude-3-5-haiku-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": "stream this"}],
        ) as stream:
            return "".join(stream.text_stream)

    assert ask() == "Fake reply about: stream this"
    [event] = events.calls
    assert event["cost_source"] == "usage"
    assert event["input_tokens"] > 0


def test_async_stream_closed_early_is_metered_and_closes_its_source(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    aclient = fake_llm.openai_client(async_client=True)
    finished: list[str] = []

    @llmguard.track
    async def ask() -> Any:
        return await aclient.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)

    @llmguard.track(model="gpt-4o")
    async def pieces() -> Any:
        try:
            for piece in ("Hello ", "wide ", "world"):
                yield piece
        finally:
            finished.append("generator closed")

    async def main() -> tuple[list[Any], str]:
        stream = await ask()
        consumed = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()  # the SDK's stream has an async close(): awaited
        assert stream.response.is_closed  # the HTTP response was released
        await stream.aclose()  # closing twice logs nothing more
        async with pieces() as generator:  # __aexit__ closes it: the generator's aclose()
            first = await generator.__anext__()
        assert finished == ["generator closed"]  # now, not when the loop shuts down
        return consumed, first

    consumed, first = asyncio.run(main())
    text = "".join(c.choices[0].delta.content or "" for c in consumed)
    sdk_event, generator_event = events.calls
    assert (sdk_event["outcome"], sdk_event["stream_chunks"]) == ("ok", 3)
    assert sdk_event["output_tokens"] == llmguard.count_tokens(text, "gpt-4o")
    assert (generator_event["outcome"], generator_event["stream_chunks"]) == ("ok", 1)
    assert generator_event["output_tokens"] == llmguard.count_tokens(first, "gpt-4o")


def test_async_stream_with_a_plain_close_is_metered_when_closed(events: CapturedEvents) -> None:
    closed: list[bool] = []

    class Source:  # an async iterator whose close() is a plain function
        def __init__(self) -> None:
            self.pieces = iter(["Hello ", "world"])

        def __aiter__(self) -> Source:
            return self

        async def __anext__(self) -> str:
            try:
                return next(self.pieces)
            except StopIteration:
                raise StopAsyncIteration from None

        def close(self) -> None:
            closed.append(True)

    @llmguard.track(model="gpt-4o")
    async def ask() -> Any:
        return Source()

    async def main() -> str:
        stream = await ask()
        first: str = await stream.__anext__()
        await stream.close()  # the async wrapper's close is its aclose
        return first

    assert asyncio.run(main()) == "Hello "
    assert closed == [True]
    [event] = events.calls
    assert (event["outcome"], event["stream_chunks"]) == ("ok", 1)

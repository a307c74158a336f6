"""Streams returned by decorated functions are metered when consumed (issue 7, first part)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer, settle_dropped_streams

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


# -- issue 11: one stream is one usage; stream helpers metered, cached; abandoned streams ----
CLAUDE = "claude-3-5-haiku-latest"


def _decorated(flavour: str, decorator: Any, body: Any) -> Any:
    """``body`` as a sync or async function (same signature) under ``decorator``."""
    import inspect

    if flavour == "sync":

        def fn(*args: Any, **kwargs: Any) -> Any:
            return body(*args, **kwargs)

    else:

        async def fn(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            return body(*args, **kwargs)

    fn.__signature__ = inspect.signature(body)  # type: ignore[attr-defined]
    fn.__qualname__ = f"{body.__qualname__}_{flavour}"
    return decorator(fn)


def _budget(tmp_path: Any, name: str) -> Any:
    return llmguard.budget(usd="1", name=name, storage=f"file://{tmp_path}/ledger")


def _assert_settled(name: str, event: dict[str, Any]) -> None:
    """The budget holds no reservation and spent exactly what the event says."""
    from decimal import Decimal

    status = llmguard.budget_status(name)
    assert status.reserved_usd == 0
    assert status.spent_usd == Decimal(str(event["cost_usd"])) > 0
    assert event["budget_spent_usd"] == event["cost_usd"]


def _usage_of(chunks: list[Any]) -> tuple[int, int]:
    """(input, output) tokens as the provider reported them in a raw stream's chunks."""
    if chunks[0].__class__.__name__ == "ChatCompletionChunk":
        return chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens
    start = next(c for c in chunks if c.type == "message_start").message.usage
    delta = next(c for c in chunks if c.type == "message_delta").usage
    return start.input_tokens, delta.output_tokens


async def _alist(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_an_instrumented_stream_returned_by_the_function_is_counted_once(
    provider: str, flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    aio = flavour == "async"
    name = f"once-{provider}-{flavour}"
    if provider == "openai":
        client = llmguard.instrument(fake_llm.openai_client(async_client=aio))
        model = "gpt-4o"
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}}
        create = client.chat.completions.create
    else:
        client = llmguard.instrument(fake_llm.anthropic_client(async_client=aio))
        model, extra, create = CLAUDE, {}, client.messages.create

    def ask(messages: list[dict[str, str]], model: str = model, max_tokens: int = 100) -> Any:
        return create(model=model, messages=messages, max_tokens=max_tokens, stream=True, **extra)

    if aio:

        async def aask(messages: list[dict[str, str]], model: str = model) -> Any:
            return await ask(messages, model)

        fn = _budget(tmp_path, name)(aask)

        async def main() -> list[Any]:
            return await _alist(await fn(MESSAGES))

        chunks = asyncio.run(main())
    else:
        chunks = list(_budget(tmp_path, name)(ask)(MESSAGES))
    [event] = events.calls
    inputs, outputs = _usage_of(chunks)
    assert (event["input_tokens"], event["output_tokens"]) == (inputs, outputs)
    assert event["cost_usd"] == float(llmguard.calc_cost(model, inputs, outputs))  # type: ignore[arg-type]
    _assert_settled(name, event)


def test_a_stream_returned_through_nested_calls_is_counted_once(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = fake_llm.openai_client()

    @llmguard.track
    def inner(messages: list[dict[str, str]], model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
        )

    @llmguard.track
    def outer(messages: list[dict[str, str]]) -> Any:
        return inner(messages)

    chunks = list(outer(MESSAGES))
    inner_event, outer_event = events.calls
    assert (inner_event["input_tokens"], inner_event["output_tokens"]) == _usage_of(chunks)
    assert (outer_event["cost_source"], outer_event["cost_usd"]) == ("children", 0.0)
    assert outer_event["children_cost_usd"] == inner_event["cost_usd"] > 0


def _read_openai_helper(stream: Any, how: str) -> tuple[str, Any]:
    """Read a ChatCompletionStream as an application would: (text read, usage if read)."""
    if how == "events":
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        return text, stream.current_completion_snapshot.usage
    if how == "get_final_completion":
        completion = stream.get_final_completion()
        return completion.choices[0].message.content, completion.usage
    if how == "until_done":
        snapshot = stream.until_done().current_completion_snapshot
        return snapshot.choices[0].message.content, snapshot.usage
    for event in stream:  # left early: after the first piece of text
        if event.type == "content.delta" and event.delta:
            return event.delta, None
    raise AssertionError("no text")


async def _aread_openai_helper(stream: Any, how: str) -> tuple[str, Any]:
    if how == "events":
        text = "".join([e.delta async for e in stream if e.type == "content.delta"])
        return text, stream.current_completion_snapshot.usage
    if how == "get_final_completion":
        completion = await stream.get_final_completion()
        return completion.choices[0].message.content, completion.usage
    if how == "until_done":
        snapshot = (await stream.until_done()).current_completion_snapshot
        return snapshot.choices[0].message.content, snapshot.usage
    async for event in stream:
        if event.type == "content.delta" and event.delta:
            return event.delta, None
    raise AssertionError("no text")


def _assert_metered(event: dict[str, Any], model: str, text: str, usage: Any) -> None:
    """The event has the provider's usage, or (left early, none sent) an estimate of the
    prompt and of the text read."""
    if usage is None:
        assert event["cost_source"] == "estimate"
        expected = (
            llmguard.count_message_tokens(MESSAGES, model),
            llmguard.count_tokens(text, model),
        )
    else:
        assert event["cost_source"] == "usage"
        expected = (usage.prompt_tokens, usage.completion_tokens)
    assert (event["input_tokens"], event["output_tokens"]) == expected
    assert event["cost_usd"] == float(llmguard.calc_cost(model, *expected))  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["events", "get_final_completion", "until_done", "left_early"])
@pytest.mark.parametrize("resource", ["chat", "beta.chat"])
def test_openai_stream_helper_returned_is_metered_once_and_budgeted(
    how: str,
    resource: str,
    flavour: str,
    fake_llm: FakeLLMServer,
    events: CapturedEvents,
    tmp_path: Any,
) -> None:
    aio = flavour == "async"
    client = fake_llm.openai_client(async_client=aio)
    completions = (client.beta if resource == "beta.chat" else client).chat.completions
    name = f"helper-{resource}-{how}-{flavour}"

    def ask(messages: list[dict[str, str]], model: str = "gpt-4o", max_tokens: int = 100) -> Any:
        return completions.stream(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            stream_options={"include_usage": True},
        )

    fn = _decorated(flavour, _budget(tmp_path, name), ask)
    if aio:

        async def main() -> tuple[Any, str, Any]:
            async with await fn(MESSAGES) as stream:
                held = llmguard.budget_status(name)
                text, usage = await _aread_openai_helper(stream, how)
            return held, text, usage

        held, text, usage = asyncio.run(main())
    else:
        with fn(MESSAGES) as stream:
            held = llmguard.budget_status(name)
            text, usage = _read_openai_helper(stream, how)
    assert held.reserved_usd > 0  # held while the stream is open
    assert held.spent_usd == 0
    [event] = events.calls
    _assert_metered(event, "gpt-4o", text, usage)
    if how == "left_early":  # the role chunk and the first piece of text
        assert event["stream_chunks"] == 2
    _assert_settled(name, event)
    assert len(fake_llm.requests) == 1


def _read_claude_helper(stream: Any, how: str) -> tuple[str, Any]:
    if how == "text_stream":
        return "".join(stream.text_stream), stream.current_message_snapshot.usage
    if how == "events":
        text = "".join(e.text for e in stream if e.type == "text")
        return text, stream.current_message_snapshot.usage
    if how == "get_final_message":
        message = stream.get_final_message()
        return message.content[0].text, message.usage
    if how == "until_done":
        stream.until_done()
        return stream.get_final_text(), stream.current_message_snapshot.usage
    return next(stream.text_stream), None


async def _aread_claude_helper(stream: Any, how: str) -> tuple[str, Any]:
    if how == "text_stream":
        text = "".join([piece async for piece in stream.text_stream])
        return text, stream.current_message_snapshot.usage
    if how == "events":
        text = "".join([e.text async for e in stream if e.type == "text"])
        return text, stream.current_message_snapshot.usage
    if how == "get_final_message":
        message = await stream.get_final_message()
        return message.content[0].text, message.usage
    if how == "until_done":
        await stream.until_done()
        return await stream.get_final_text(), stream.current_message_snapshot.usage
    return await stream.text_stream.__anext__(), None


def _assert_claude_metered(event: dict[str, Any], text: str, usage: Any) -> None:
    """The provider's usage; left early, the input from ``message_start`` and the output
    counted from the text read."""
    assert event["cost_source"] == "usage"
    output = llmguard.count_tokens(text, CLAUDE) if usage is None else usage.output_tokens
    prompt = llmguard.count_message_tokens(MESSAGES, CLAUDE)
    assert (event["input_tokens"], event["output_tokens"]) == (prompt, output)
    assert event["cost_usd"] == float(llmguard.calc_cost(CLAUDE, prompt, output))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "how", ["text_stream", "events", "get_final_message", "until_done", "left_early"]
)
@pytest.mark.parametrize("resource", ["messages", "beta.messages"])
def test_instrumented_anthropic_stream_helper_returned_is_metered_once_and_budgeted(
    how: str,
    resource: str,
    flavour: str,
    fake_llm: FakeLLMServer,
    events: CapturedEvents,
    tmp_path: Any,
) -> None:
    aio = flavour == "async"
    client = llmguard.instrument(fake_llm.anthropic_client(async_client=aio))
    messages_api = client.beta.messages if resource == "beta.messages" else client.messages
    name = f"claude-{resource}-{how}-{flavour}"

    def ask(messages: list[dict[str, str]], model: str = CLAUDE, max_tokens: int = 100) -> Any:
        return messages_api.stream(model=model, messages=messages, max_tokens=max_tokens)

    fn = _decorated(flavour, _budget(tmp_path, name), ask)
    if aio:

        async def main() -> tuple[Any, str, Any]:
            async with await fn(MESSAGES) as stream:
                held = llmguard.budget_status(name)
                text, usage = await _aread_claude_helper(stream, how)
            return held, text, usage

        held, text, usage = asyncio.run(main())
    else:
        with fn(MESSAGES) as stream:
            held = llmguard.budget_status(name)
            text, usage = _read_claude_helper(stream, how)
    assert held.reserved_usd > 0
    assert held.spent_usd == 0
    [event] = events.calls
    _assert_claude_metered(event, text, usage)
    _assert_settled(name, event)


@pytest.mark.parametrize("how", ["whole", "left_early"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_instrumented_stream_helpers_read_inside_the_function_count_once(
    how: str,
    provider: str,
    flavour: str,
    fake_llm: FakeLLMServer,
    events: CapturedEvents,
    tmp_path: Any,
) -> None:
    aio = flavour == "async"
    name = f"inside-{provider}-{how}-{flavour}"
    if provider == "openai":
        client = llmguard.instrument(fake_llm.openai_client(async_client=aio))
        model = "gpt-4o"

        def open_stream(messages: Any, model: str, max_tokens: int) -> Any:
            return client.chat.completions.stream(
                model=model,
                messages=messages,
                max_tokens=max_tokens,
                stream_options={"include_usage": True},
            )

        read, aread = _read_openai_helper, _aread_openai_helper
        whole = "get_final_completion"
    else:
        client = llmguard.instrument(fake_llm.anthropic_client(async_client=aio))
        model = CLAUDE

        def open_stream(messages: Any, model: str, max_tokens: int) -> Any:
            return client.messages.stream(model=model, messages=messages, max_tokens=max_tokens)

        read, aread = _read_claude_helper, _aread_claude_helper
        whole = "get_final_message"
    mode = whole if how == "whole" else how
    seen: list[Any] = []
    if aio:

        async def aask(messages: list[dict[str, str]], model: str = model) -> str:
            async with open_stream(messages, model, 100) as stream:
                text, usage = await aread(stream, mode)
            seen.append(usage)
            return text

        text = asyncio.run(_budget(tmp_path, name)(aask)(MESSAGES))
    else:

        def ask(messages: list[dict[str, str]], model: str = model) -> str:
            with open_stream(messages, model, 100) as stream:
                text, usage = read(stream, mode)
            seen.append(usage)
            return text  # type: ignore[no-any-return]

        text = _budget(tmp_path, name)(ask)(MESSAGES)
    [event] = events.calls
    if provider == "anthropic":
        _assert_claude_metered(event, text, seen[0])
    else:  # left early, OpenAI has sent no usage yet: the answer is estimated
        _assert_metered(event, model, text, seen[0])
    _assert_settled(name, event)


class Answer(BaseModel):
    answer: str
    confidence: float


def _helper_asker(provider: str, fake: FakeLLMServer, aio: bool, **options: Any) -> Any:
    """A function returning a stream helper's manager for ``question``."""
    if provider == "openai":
        client = fake.openai_client(async_client=aio)

        def ask_openai(question: str) -> Any:
            return client.chat.completions.stream(
                model="gpt-4o",
                messages=[{"role": "user", "content": question}],
                stream_options={"include_usage": True},
                **options,
            )

        return ask_openai
    client = fake.anthropic_client(async_client=aio)
    if provider == "anthropic-instrumented":
        client = llmguard.instrument(client)

    def ask_claude(question: str) -> Any:
        return client.messages.stream(
            model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": question}]
        )

    return ask_claude


def _final(stream: Any) -> Any:
    final = getattr(stream, "get_final_message", None) or stream.get_final_completion
    return final()


async def _afinal(stream: Any) -> Any:
    final = getattr(stream, "get_final_message", None) or stream.get_final_completion
    return await final()


@pytest.mark.parametrize("provider", ["openai", "anthropic", "anthropic-instrumented"])
def test_cached_stream_helpers_replay_like_the_sdk(
    provider: str, flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    aio = flavour == "async"
    cache = llmguard.cached(storage=f"file://{tmp_path}/c")
    fn = _decorated(flavour, cache, _helper_asker(provider, fake_llm, aio))
    dumps: list[tuple[list[Any], Any]] = []
    if aio:

        async def main() -> None:
            for _ in range(3):  # a miss, then two replays
                async with await fn("q") as stream:
                    seen = [e.model_dump() async for e in stream]
                    dumps.append((seen, (await _afinal(stream)).model_dump()))
            async with await fn("q") as stream:  # a replay read another way, and left early
                assert (await stream.__anext__()).type in ("chunk", "message_start")

        asyncio.run(main())
    else:
        for _ in range(3):
            with fn("q") as stream:
                dumps.append(([e.model_dump() for e in stream], _final(stream).model_dump()))
        with fn("q") as stream:
            assert next(iter(stream)).type in ("chunk", "message_start")
    assert len(fake_llm.requests) == 1
    assert dumps[1] == dumps[0]  # the same events, the same final message
    assert dumps[2] == dumps[0]
    miss, *hits = events.calls
    assert (miss["cache"], miss["cost_source"]) == ("miss", "usage")
    assert [(h["cache"], h["cost_usd"], h["saved_usd"]) for h in hits] == [
        ("hit", 0.0, miss["cost_usd"])
    ] * 3
    assert hits[0]["stream_chunks"] == hits[1]["stream_chunks"] == miss["stream_chunks"]


def test_a_cached_anthropic_helper_replays_its_text_stream(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    ask = llmguard.cached(storage=f"file://{tmp_path}/c")(
        _helper_asker("anthropic", fake_llm, False)
    )
    with ask("hello there") as first:
        text = "".join(first.text_stream)
    with ask("hello there") as second:
        assert "".join(second.text_stream) == text == "Fake reply about: hello there"
        assert second.get_final_text() == text
    assert len(fake_llm.requests) == 1


def test_a_cached_openai_helper_replays_its_parsed_response_format(
    flavour: str, events: CapturedEvents, tmp_path: Any
) -> None:
    with FakeLLMServer(reply=lambda request: '{"answer": "forty two", "confidence": 0.5}') as fake:
        fn = _decorated(
            flavour,
            llmguard.cached(storage=f"file://{tmp_path}/c"),
            _helper_asker("openai", fake, flavour == "async", response_format=Answer),
        )

        if flavour == "async":

            async def main() -> list[Any]:
                parsed = []
                for _ in range(2):
                    async with await fn("q") as stream:
                        parsed.append((await stream.get_final_completion()).choices[0].message)
                return parsed

            first, second = asyncio.run(main())
        else:
            with fn("q") as stream:
                first = stream.get_final_completion().choices[0].message
            with fn("q") as stream:
                second = stream.get_final_completion().choices[0].message
        assert len(fake.requests) == 1
    assert first.parsed == second.parsed == Answer(answer="forty two", confidence=0.5)
    assert isinstance(second.parsed, Answer)


def test_a_cached_anthropic_helper_replays_its_parsed_output_format(tmp_path: Any) -> None:
    with FakeLLMServer(reply=lambda request: '{"answer": "yes", "confidence": 1}') as fake:
        client = fake.anthropic_client()

        @llmguard.cached(storage=f"file://{tmp_path}/c")
        def ask(question: str) -> Any:
            return client.messages.stream(
                model=CLAUDE,
                max_tokens=50,
                messages=[{"role": "user", "content": question}],
                output_format=Answer,
            )

        outputs = []
        for _ in range(2):
            with ask("q") as stream:
                outputs.append(stream.get_final_message().parsed_output)
        assert len(fake.requests) == 1
    assert outputs == [Answer(answer="yes", confidence=1)] * 2


def test_cached_refuses_a_stream_helper_it_cannot_replay_before_sending_it(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    import openai
    from pydantic import BaseModel

    class Lookup(BaseModel):
        city: str

    tool = openai.pydantic_function_tool(Lookup)  # parses arguments into Lookup: no replay
    client = fake_llm.openai_client(async_client=flavour == "async")

    def ask(messages: list[dict[str, str]], model: str = "gpt-4o", max_tokens: int = 100) -> Any:
        return client.chat.completions.stream(
            model=model, messages=messages, max_tokens=max_tokens, tools=[tool]
        )

    cached = llmguard.cached(storage=f"file://{tmp_path}/c")
    fn = _decorated(flavour, lambda f: cached(_budget(tmp_path, "refused")(f)), ask)
    run = (lambda: asyncio.run(fn(MESSAGES))) if flavour == "async" else (lambda: fn(MESSAGES))
    with pytest.raises(TypeError, match=r"tools option .* Nothing was sent"):
        run()
    assert fake_llm.requests == []
    status = llmguard.budget_status("refused")
    assert (status.spent_usd, status.reserved_usd) == (0, 0)  # nothing charged, nothing held
    [event] = events.calls
    assert (event["outcome"], event["error"], event["cost_usd"]) == ("error", "TypeError", 0.0)


def test_bypass_cache_stores_a_stream_read_to_its_end(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    client = fake_llm.openai_client()

    @llmguard.cached(storage=f"file://{tmp_path}/c")
    def ask(question: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True
        )

    with llmguard.bypass_cache():
        fresh = [c.model_dump() for c in ask("q")]
    assert [c.model_dump() for c in ask("q")] == fresh
    assert len(fake_llm.requests) == 1
    assert [e["cache"] for e in events.calls] == ["bypass", "hit"]


def test_a_stale_stream_is_replayed_when_the_call_fails(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    now = [1000.0]
    client = fake_llm.openai_client()

    @llmguard.cached(
        storage=f"file://{tmp_path}/c", ttl=60, stale_if_error=True, clock=lambda: now[0]
    )
    def ask(question: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True
        )

    fresh = [c.model_dump() for c in ask("q")]
    now[0] += 120
    fake_llm.fail_next(1, 500)
    assert [c.model_dump() for c in ask("q")] == fresh
    assert events.calls[-1]["cache"] == "stale"


# -- streams left unfinished are settled when dropped ---------------------------------------
@pytest.mark.parametrize("ledger", ["file", "redis"])
def test_a_stream_left_with_break_is_settled_when_dropped(
    ledger: str,
    flavour: str,
    fake_llm: FakeLLMServer,
    events: CapturedEvents,
    tmp_path: Any,
    request: pytest.FixtureRequest,
) -> None:
    import gc

    storage = f"file://{tmp_path}/ledger"
    if ledger == "redis":
        storage = request.getfixturevalue("redis_uri")  # this test's own key prefix
    name = f"left-{ledger}-{flavour}"
    budget = llmguard.budget(usd="1", name=name, storage=storage)
    aio = flavour == "async"
    client = fake_llm.openai_client(async_client=aio)
    options = {"stream": True, "stream_options": {"include_usage": True}}

    def ask(messages: list[dict[str, str]], model: str = "gpt-4o", max_tokens: int = 100) -> Any:
        return client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, **options
        )

    async def aask(messages: list[dict[str, str]], model: str = "gpt-4o") -> Any:
        return await ask(messages, model)

    fn = budget(aask if aio else ask)
    text = ""
    if aio:

        async def main() -> str:
            read = ""
            stream = await fn(MESSAGES)
            async for chunk in stream:
                read += chunk.choices[0].delta.content or ""
                if read:
                    break
            del stream
            gc.collect()
            assert settle_dropped_streams()
            assert len(events.calls) == 1  # settled without this (blocked) event loop
            return read

        text = asyncio.run(main())
    else:
        stream = fn(MESSAGES)
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if text:
                break
        assert llmguard.budget_status(name).reserved_usd > 0
        del stream, chunk
        gc.collect()
        assert settle_dropped_streams()
    [event] = events.calls
    assert (event["outcome"], event["stream_chunks"], event["stream_abandoned"]) == ("ok", 2, True)
    _assert_metered(event, "gpt-4o", text, None)  # the prompt and the text read, estimated
    _assert_settled(name, event)


def test_an_anthropic_stream_left_unfinished_counts_its_real_input(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    import gc

    client = fake_llm.anthropic_client()

    def ask(messages: list[dict[str, str]], model: str = CLAUDE, max_tokens: int = 100) -> Any:
        return client.messages.create(
            model=model, messages=messages, max_tokens=max_tokens, stream=True
        )

    fn = _budget(tmp_path, "claude-left")(ask)
    stream = fn(MESSAGES)
    text = ""
    for event in stream:
        if event.type == "content_block_delta":
            text += event.delta.text
            break
    del stream, event
    gc.collect()
    assert settle_dropped_streams()
    [logged] = events.calls
    _assert_claude_metered(logged, text, None)
    _assert_settled("claude-left", logged)


def test_a_stream_helper_never_entered_is_settled_unsent_when_dropped(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    import gc

    fn = _decorated(
        flavour,
        _budget(tmp_path, f"unentered-{flavour}"),
        lambda messages, model="gpt-4o", max_tokens=100: fake_llm.openai_client(
            async_client=flavour == "async"
        ).chat.completions.stream(model=model, messages=messages, max_tokens=max_tokens),
    )
    if flavour == "async":

        async def main() -> None:
            manager = await fn(MESSAGES)
            assert llmguard.budget_status(f"unentered-{flavour}").reserved_usd > 0
            del manager
            gc.collect()
            assert settle_dropped_streams()

        asyncio.run(main())
    else:
        manager = fn(MESSAGES)
        assert llmguard.budget_status(f"unentered-{flavour}").reserved_usd > 0
        del manager
        gc.collect()
        assert settle_dropped_streams()
    [event] = events.calls
    assert (event["cost_source"], event["cost_usd"], event["input_tokens"]) == ("none", 0.0, 0)
    status = llmguard.budget_status(f"unentered-{flavour}")
    assert (status.spent_usd, status.reserved_usd) == (0, 0)
    assert fake_llm.requests == []


def test_an_async_stream_whose_task_is_cancelled_is_settled(
    events: CapturedEvents, tmp_path: Any
) -> None:
    with FakeLLMServer(chunk_delay=0.05) as fake:
        client = fake.openai_client(async_client=True)

        @_budget(tmp_path, "cancelled")
        async def ask(
            messages: list[dict[str, str]], model: str = "gpt-4o", max_tokens: int = 100
        ) -> Any:
            return await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, stream=True
            )

        read: list[str] = []

        async def consume(started: asyncio.Event) -> None:
            async for chunk in await ask(MESSAGES):
                read.append(chunk.choices[0].delta.content or "")
                if len(read) == 2:
                    started.set()

        async def main() -> None:
            started = asyncio.Event()
            task = asyncio.create_task(consume(started))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
    [event] = events.calls
    assert (event["outcome"], event["error"]) == ("error", "CancelledError")
    assert event["stream_chunks"] == len(read)
    _assert_metered(event, "gpt-4o", "".join(read), None)
    _assert_settled("cancelled", event)


def test_waiters_on_a_stream_another_process_is_storing_get_replays(
    fake_llm: FakeLLMServer, tmp_path: Any
) -> None:
    import threading
    import time

    client = fake_llm.openai_client()

    def decorate() -> Any:  # two decorations of one function: two processes' worth of state
        @llmguard.cached(storage=f"file://{tmp_path}/c")
        def ask(question: str) -> Any:
            return client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True
            )

        return ask

    other, mine = decorate(), decorate()
    elsewhere = other("q")  # holds the storage lock until its stream has been read
    results: list[list[Any]] = []
    threads = [threading.Thread(target=lambda: results.append(list(mine("q")))) for _ in "ab"]
    for thread in threads:  # one waits on the lock, the other on the first
        thread.start()
        time.sleep(0.1)
    original = list(elsewhere)
    for thread in threads:
        thread.join()
    assert len(fake_llm.requests) == 1
    assert [[c.model_dump() for c in chunks] for chunks in results] == [
        [c.model_dump() for c in original]
    ] * 2


def test_a_generator_reading_an_instrumented_stream_reports_its_real_usage(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    """A decorated generator (a streaming endpoint's body) runs as the caller reads it: its
    instrumented provider call reports to the call, once, and the budget agrees."""
    budget = _budget(tmp_path, f"generator-{flavour}")
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    seen: list[Any] = []
    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        @budget
        def answer(messages: list[dict[str, str]], model: str = "gpt-4o") -> Iterator[str]:
            for chunk in client.chat.completions.create(model=model, messages=messages, **options):
                seen.append(chunk)
                if chunk.choices:
                    yield chunk.choices[0].delta.content or ""

        text = "".join(answer(MESSAGES))
    else:
        aclient = llmguard.instrument(fake_llm.openai_client(async_client=True))

        @budget
        async def aanswer(messages: list[dict[str, str]], model: str = "gpt-4o") -> Any:
            stream = await aclient.chat.completions.create(
                model=model, messages=messages, **options
            )
            async for chunk in stream:
                seen.append(chunk)
                if chunk.choices:
                    yield chunk.choices[0].delta.content or ""

        async def main() -> str:
            return "".join([piece async for piece in aanswer(MESSAGES)])

        text = asyncio.run(main())
    assert text == REPLY
    [event] = events.calls
    assert event["cost_source"] == "usage"
    assert (event["input_tokens"], event["output_tokens"]) == _usage_of(seen)
    _assert_settled(f"generator-{flavour}", event)


def test_a_stream_dropped_where_settling_would_deadlock_is_settled_by_another_thread(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    """The collector may find a dropped stream while its thread holds a lock that settling
    needs (here the cache's own): the finalizer only queues it."""
    import gc
    import threading

    client = fake_llm.openai_client()

    @llmguard.cached(storage=f"file://{tmp_path}/c")
    def ask(question: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True
        )

    cache_lock = ask.__llmguard__.layers[0]._lock
    outcome: list[int] = []

    def drop_under_the_lock() -> None:
        stream = ask("q")
        next(stream)
        with cache_lock:  # as if the collector ran inside the cache's bookkeeping
            del stream
            gc.collect()
            outcome.append(len(events.calls))

    worker = threading.Thread(target=drop_under_the_lock, daemon=True)
    worker.start()
    worker.join(10)
    assert outcome == [0]  # did not deadlock; queued, not settled under the lock
    assert settle_dropped_streams()
    [event] = events.calls
    assert (event["stream_abandoned"], event["stream_chunks"], event["cache"]) == (True, 1, "miss")
    assert ask.cache_info().entries == 0  # half a stream is never stored


_SDK_STREAM_AT_EXIT = """
import sys
import llmguard
from llmguard.testing import FakeLLMServer

fake = FakeLLMServer().start()
client = fake.openai_client()

@llmguard.budget(usd=1, name="at-exit", storage=sys.argv[1])
def ask(messages, model="gpt-4o", max_tokens=100):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True
    )

stream = ask([{"role": "user", "content": "hello there"}])
next(stream), next(stream)
print("reserved", llmguard.budget_status("at-exit").reserved_usd > 0, flush=True)
"""

_GENERATOR_AT_EXIT = """
import sys
import llmguard

@llmguard.budget(usd=1, name="at-exit", storage=sys.argv[1])
def ask(text, model="gpt-4o", max_tokens=100):
    yield from ("Fake ", "reply ", "about ", text)

stream = ask("hello there")
next(stream), next(stream)
print("reserved", llmguard.budget_status("at-exit").reserved_usd > 0, flush=True)
"""


@pytest.mark.parametrize("kind", ["sdk", "generator"])
def test_a_stream_still_open_at_exit_is_settled_before_the_interpreter_goes(
    tmp_path: Any, kind: str
) -> None:
    import os
    import subprocess
    import sys

    if kind == "sdk" and sys.version_info >= (3, 13):
        pytest.skip(
            "CPython 3.13 with httpx2: any openai stream left open at exit segfaults while "
            "the interpreter finalizes, with or without llmguard (reproduced without it)"
        )
    ledger = f"file://{tmp_path}/ledger"
    script = _SDK_STREAM_AT_EXIT if kind == "sdk" else _GENERATOR_AT_EXIT
    done = subprocess.run(
        [sys.executable, "-c", script, ledger],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLMGUARD_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    assert "reserved True" in done.stdout
    assert "stream_abandoned=True" in done.stderr  # its event, emitted at exit (stderr)
    assert "Exception ignored" not in done.stderr
    llmguard.budget(usd=1, name="at-exit", storage=ledger)(lambda: None)
    status = llmguard.budget_status("at-exit")
    assert status.reserved_usd == 0
    assert status.spent_usd > 0


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

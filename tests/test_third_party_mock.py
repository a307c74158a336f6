"""llmguard's stream and usage metering against a third-party mock provider (llm-mock-api).

The mock is someone else's reading of the OpenAI and Anthropic wire formats, served by uvicorn
on a free loopback port; each answer reports the usage its rule sets (123 input, 45 output
tokens here), so whatever llmguard meters can be compared with exact numbers. A library bug it
shows is marked ``xfail(strict=True)`` until it is fixed (the marker then fails: drop it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents

pytest.importorskip(
    "llm_mock_api",
    reason="the third-party mock provider llm-mock-api is not installed (pip install -e .[dev])",
)

from llm_mock_api import MockServer, MockServerOptions
from llm_mock_api.types.reply import ReplyObject, Usage

TEXT = "The mock answers in several chunks of seven characters."
INPUT, OUTPUT = 123, 45
MESSAGES = [{"role": "user", "content": "hello there"}]
GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"


class Mock:
    """llm-mock-api's server on its own event loop in a thread, so sync tests can use it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = MockServer(MockServerOptions(port=0, default_latency=0, default_chunk_size=7))

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def __enter__(self) -> Mock:
        self.thread.start()
        self.run(self.server.start())
        self.url = self.server.url
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()

    def openai(self, *, async_client: bool = False) -> Any:
        import openai

        cls = openai.AsyncOpenAI if async_client else openai.OpenAI
        return llmguard.instrument(cls(base_url=f"{self.url}/v1", api_key="test", max_retries=0))

    def anthropic(self, *, async_client: bool = False) -> Any:
        import anthropic

        cls = anthropic.AsyncAnthropic if async_client else anthropic.Anthropic
        return llmguard.instrument(cls(base_url=self.url, api_key="test", max_retries=0))


@pytest.fixture(scope="module")
def running_mock() -> Iterator[Mock]:
    with Mock() as mock:
        yield mock


@pytest.fixture
def mock(running_mock: Mock) -> Mock:
    running_mock.server.reset()
    running_mock.server.fallback(ReplyObject(text=TEXT, usage=Usage(input=INPUT, output=OUTPUT)))
    return running_mock


def assert_metered_once(events: CapturedEvents, model: str, calls: int = 1) -> dict[str, Any]:
    """One event, with exactly the usage the mock reported for ``calls`` answers."""
    [event] = events.calls
    assert event["cost_source"] == "usage"
    assert event["model"] == model
    assert (event["input_tokens"], event["output_tokens"]) == (INPUT * calls, OUTPUT * calls)
    cost = llmguard.calc_cost(model, INPUT * calls, OUTPUT * calls)
    assert cost is not None
    assert event["cost_usd"] == float(cost)
    return event


def run(flavour: str, sync: Any, asynchronous: Any) -> Any:
    return sync() if flavour == "sync" else asyncio.run(asynchronous())


STREAM = {"stream": True, "stream_options": {"include_usage": True}}


def test_chat_completion_usage(flavour: str, mock: Mock, events: CapturedEvents) -> None:
    client, aclient = mock.openai(), mock.openai(async_client=True)

    @llmguard.track
    def ask() -> str:
        return str(
            client.chat.completions.create(model=GPT, messages=MESSAGES).choices[0].message.content
        )

    @llmguard.track
    async def aask() -> str:
        reply = await aclient.chat.completions.create(model=GPT, messages=MESSAGES)
        return str(reply.choices[0].message.content)

    assert run(flavour, ask, aask) == TEXT
    assert_metered_once(events, GPT)


def test_chat_stream_with_include_usage(flavour: str, mock: Mock, events: CapturedEvents) -> None:
    client, aclient = mock.openai(), mock.openai(async_client=True)

    @llmguard.track
    def ask() -> str:
        stream = client.chat.completions.create(model=GPT, messages=MESSAGES, **STREAM)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    @llmguard.track
    async def aask() -> str:
        stream = await aclient.chat.completions.create(model=GPT, messages=MESSAGES, **STREAM)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert run(flavour, ask, aask) == TEXT
    assert_metered_once(events, GPT)


def test_two_streams_in_one_call_are_summed(mock: Mock, events: CapturedEvents) -> None:
    client = mock.openai()

    @llmguard.track
    def ask_twice() -> list[str]:
        answers = []
        for _ in range(2):
            with client.chat.completions.create(model=GPT, messages=MESSAGES, **STREAM) as stream:
                answers.append(
                    "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                )
        return answers

    assert ask_twice() == [TEXT, TEXT]
    assert_metered_once(events, GPT, calls=2)


def test_returned_stream_of_an_instrumented_client(
    flavour: str, mock: Mock, events: CapturedEvents
) -> None:
    client, aclient = mock.openai(), mock.openai(async_client=True)

    @llmguard.track
    def ask() -> Any:
        return client.chat.completions.create(model=GPT, messages=MESSAGES, **STREAM)

    @llmguard.track
    async def aask() -> Any:
        return await aclient.chat.completions.create(model=GPT, messages=MESSAGES, **STREAM)

    async def consume() -> list[Any]:
        return [chunk async for chunk in await aask()]

    chunks = run(flavour, lambda: list(ask()), consume)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert assert_metered_once(events, GPT)["stream_chunks"] == len(chunks)


def test_responses_api_usage(mock: Mock, events: CapturedEvents) -> None:
    client = mock.openai()

    @llmguard.track
    def ask() -> str:
        return str(client.responses.create(model=GPT, input="hello there").output_text)

    assert ask() == TEXT
    assert_metered_once(events, GPT)


def test_responses_api_stream(flavour: str, mock: Mock, events: CapturedEvents) -> None:
    client, aclient = mock.openai(), mock.openai(async_client=True)

    @llmguard.track
    def ask() -> str:
        stream = client.responses.create(model=GPT, input="hello there", stream=True)
        return "".join(e.delta for e in stream if e.type == "response.output_text.delta")

    @llmguard.track
    async def aask() -> str:
        stream = await aclient.responses.create(model=GPT, input="hello there", stream=True)
        return "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])

    assert run(flavour, ask, aask) == TEXT
    assert_metered_once(events, GPT)


def test_returned_responses_api_stream_and_helper(
    flavour: str, mock: Mock, events: CapturedEvents
) -> None:
    client, aclient = mock.openai(), mock.openai(async_client=True)

    @llmguard.track
    def ask() -> Any:
        return client.responses.create(model=GPT, input="hello there", stream=True)

    @llmguard.track
    def ask_helper() -> Any:
        return client.responses.stream(model=GPT, input="hello there")

    @llmguard.track
    async def aask() -> Any:
        return await aclient.responses.create(model=GPT, input="hello there", stream=True)

    @llmguard.track
    def aask_helper() -> Any:
        return aclient.responses.stream(model=GPT, input="hello there")

    def read() -> tuple[str, str]:
        text = "".join(e.delta for e in ask() if e.type == "response.output_text.delta")
        with ask_helper() as stream:
            return text, stream.get_final_response().output_text

    async def aread() -> tuple[str, str]:
        stream = await aask()
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        async with aask_helper() as helper:
            return text, (await helper.get_final_response()).output_text

    assert run(flavour, read, aread) == (TEXT, TEXT)
    for event in events.calls:
        assert event["cost_source"] == "usage"
        assert (event["model"], event["input_tokens"], event["output_tokens"]) == (
            GPT,
            INPUT,
            OUTPUT,
        )
    assert len(events.calls) == 2


def test_a_cached_responses_api_answer_is_served_what_the_provider_sent(
    mock: Mock, events: CapturedEvents
) -> None:
    client = mock.openai()

    @llmguard.cached
    def ask(question: str) -> Any:
        return client.responses.create(model=GPT, input=question)

    first, again = ask("hello there"), ask("hello there")
    assert again.output_text == first.output_text == TEXT
    assert again.usage.input_tokens == INPUT
    assert [e["cache"] for e in events.calls] == ["miss", "hit"]
    assert mock.server.history.count() == 1


def test_a_cached_responses_api_stream_replays_what_the_provider_sent(
    flavour: str, mock: Mock, events: CapturedEvents
) -> None:
    """The mock leaves out fields the SDK's models declare required (the SDK builds events
    without validating): the replay is built the same way, not refused half-way."""
    client, aclient = mock.openai(), mock.openai(async_client=True)

    @llmguard.cached
    def ask(question: str) -> Any:
        return client.responses.create(model=GPT, input=question, stream=True)

    @llmguard.cached
    async def aask(question: str) -> Any:
        return await aclient.responses.create(model=GPT, input=question, stream=True)

    def twice() -> list[list[Any]]:
        return [list(ask("hello there")) for _ in range(2)]

    async def atwice() -> list[list[Any]]:
        answers = []
        for _ in range(2):
            answers.append([e async for e in await aask("hello there")])
        return answers

    first, again = run(flavour, twice, atwice)
    assert [e.type for e in again] == [e.type for e in first]
    assert again[-1].response.usage.input_tokens == INPUT
    assert "".join(e.delta for e in again if e.type == "response.output_text.delta") == TEXT
    miss, hit = events.calls
    assert (miss["cache"], miss["cost_source"], miss["input_tokens"]) == ("miss", "usage", INPUT)
    assert (hit["cache"], hit["cost_usd"]) == ("hit", 0.0)
    assert mock.server.history.count() == 1  # the hit sent nothing


ANTHROPIC = {"model": CLAUDE, "max_tokens": 100, "messages": MESSAGES}


def test_anthropic_message_usage(flavour: str, mock: Mock, events: CapturedEvents) -> None:
    client, aclient = mock.anthropic(), mock.anthropic(async_client=True)

    @llmguard.track
    def ask() -> str:
        return str(client.messages.create(**ANTHROPIC).content[0].text)

    @llmguard.track
    async def aask() -> str:
        return str((await aclient.messages.create(**ANTHROPIC)).content[0].text)

    assert run(flavour, ask, aask) == TEXT
    assert_metered_once(events, CLAUDE)


def test_anthropic_raw_event_stream(flavour: str, mock: Mock, events: CapturedEvents) -> None:
    client, aclient = mock.anthropic(), mock.anthropic(async_client=True)

    @llmguard.track
    def ask() -> str:
        stream = client.messages.create(**ANTHROPIC, stream=True)
        return "".join(e.delta.text for e in stream if e.type == "content_block_delta")

    @llmguard.track
    async def aask() -> str:
        stream = await aclient.messages.create(**ANTHROPIC, stream=True)
        return "".join([e.delta.text async for e in stream if e.type == "content_block_delta"])

    assert run(flavour, ask, aask) == TEXT
    assert_metered_once(events, CLAUDE)


def test_anthropic_stream_helper(flavour: str, mock: Mock, events: CapturedEvents) -> None:
    client, aclient = mock.anthropic(), mock.anthropic(async_client=True)

    @llmguard.track
    def ask() -> str:
        with client.messages.stream(**ANTHROPIC) as stream:
            return "".join(stream.text_stream)

    @llmguard.track
    async def aask() -> str:
        async with aclient.messages.stream(**ANTHROPIC) as stream:
            return "".join([piece async for piece in stream.text_stream])

    assert run(flavour, ask, aask) == TEXT
    assert_metered_once(events, CLAUDE)


def test_returned_anthropic_stream_of_an_instrumented_client(
    mock: Mock, events: CapturedEvents
) -> None:
    client = mock.anthropic()

    @llmguard.track
    def ask() -> Any:
        return client.messages.create(**ANTHROPIC, stream=True)

    assert "".join(e.delta.text for e in ask() if e.type == "content_block_delta") == TEXT
    assert_metered_once(events, CLAUDE)


def test_returned_anthropic_stream_manager_of_an_instrumented_client(
    mock: Mock, events: CapturedEvents
) -> None:
    client = mock.anthropic()

    @llmguard.track
    def ask() -> Any:
        return client.messages.stream(**ANTHROPIC)

    with ask() as stream:
        assert "".join(stream.text_stream) == TEXT
    assert_metered_once(events, CLAUDE)

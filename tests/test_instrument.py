"""instrument() and usage extraction with the real openai and anthropic SDKs, no mocks."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain prompt caching in one sentence please."},
]


def cost(
    model: str, input_tokens: int, output_tokens: int, cached: int = 0, write: int = 0
) -> float:
    value = llmguard.calc_cost(model, input_tokens, output_tokens, cached, write)
    assert value is not None
    return float(value)


def test_openai_chat_sync_returns_text_usage_is_real(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = llmguard.instrument(fake_llm.openai_client())

    @llmguard.track
    def answer(question: str) -> str:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        return str(reply.choices[0].message.content)

    text = answer("ignored for usage")
    assert text.startswith("Fake reply about: Explain")
    [event] = events.calls
    prompt = llmguard.count_message_tokens(MESSAGES, "gpt-4o-mini")
    completion = llmguard.count_tokens(text, "gpt-4o-mini")
    assert (event["model"], event["input_tokens"], event["output_tokens"]) == (
        "gpt-4o-mini",
        prompt,
        completion,
    )
    assert event["cost_source"] == "usage"
    assert event["cost_usd"] == cost("gpt-4o-mini", prompt, completion)


def test_openai_chat_async_two_calls_summed(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    async def main() -> str:
        client = llmguard.instrument(fake_llm.openai_client(async_client=True))

        @llmguard.track
        async def two_step(question: str) -> str:
            first = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            second = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            return f"{first.choices[0].message.content} / {second.choices[0].message.content}"

        return await two_step("q")

    asyncio.run(main())
    [event] = events.calls
    prompt = llmguard.count_message_tokens(MESSAGES, "gpt-4o")
    completion = llmguard.count_tokens(
        "Fake reply about: Explain prompt caching in one sentence please.", "gpt-4o"
    )
    assert event["input_tokens"] == 2 * prompt
    assert event["output_tokens"] == 2 * completion
    assert Decimal(str(event["cost_usd"])) == 2 * llmguard.calc_cost("gpt-4o", prompt, completion)  # type: ignore[operator]


def test_returning_the_response_is_not_counted_twice(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = llmguard.instrument(fake_llm.openai_client())

    @llmguard.track
    def raw(question: str) -> Any:
        return client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    response = raw("q")
    assert events.calls[0]["input_tokens"] == response.usage.prompt_tokens


def test_openai_response_object_without_instrument(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    fake = FakeLLMServer(cached_tokens=16).start()
    try:
        client = fake.openai_client()

        @llmguard.track
        def raw(messages: list[dict[str, str]], model: str = "gpt-4o") -> Any:
            return client.chat.completions.create(model=model, messages=messages)

        response = raw(MESSAGES)
    finally:
        fake.stop()
    [event] = events.calls
    usage = response.usage
    assert event["cached_input_tokens"] == 16
    assert event["cost_usd"] == cost(
        "gpt-4o", usage.prompt_tokens, usage.completion_tokens, cached=16
    )


def test_openai_responses_api(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        @llmguard.track
        def ask(question: str) -> str:
            return str(
                client.responses.create(
                    model="gpt-4o", input=question, instructions="Be brief."
                ).output_text
            )

        text = ask("What is a token?")
    else:

        async def main() -> str:
            client = llmguard.instrument(fake_llm.openai_client(async_client=True))

            @llmguard.track
            async def ask(question: str) -> str:
                response = await client.responses.create(model="gpt-4o", input=question)
                return str(response.output_text)

            return await ask("What is a token?")

        text = asyncio.run(main())
    assert text == "Fake reply about: What is a token?"
    [event] = events.calls
    assert event["cost_source"] == "usage"
    assert fake_llm.requests[0].path == "/v1/responses"
    assert event["output_tokens"] == llmguard.count_tokens(text, "gpt-4o")


def test_anthropic_messages(flavour: str, events: CapturedEvents) -> None:
    request: dict[str, Any] = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 100,
        "system": "Be brief.",
    }
    with FakeLLMServer(cached_tokens=10) as fake:
        if flavour == "sync":
            client = llmguard.instrument(fake.anthropic_client())

            @llmguard.track
            def ask(question: str) -> str:
                content = [{"role": "user", "content": question}]
                return str(client.messages.create(**request, messages=content).content[0].text)

            text = ask("Why cache prompts?")
        else:
            aclient = llmguard.instrument(fake.anthropic_client(async_client=True))

            @llmguard.track
            async def aask(question: str) -> str:
                content = [{"role": "user", "content": question}]
                message = await aclient.messages.create(**request, messages=content)
                return str(message.content[0].text)

            text = asyncio.run(aask("Why cache prompts?"))
    assert text == "Fake reply about: Why cache prompts?"
    [event] = events.calls
    prompt = llmguard.count_message_tokens(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why cache prompts?"},
        ],
        "claude-3-5-haiku-latest",
    )
    assert event["model"] == "claude-3-5-haiku-latest"
    assert (event["input_tokens"], event["cached_input_tokens"]) == (prompt, 10)
    completion = llmguard.count_tokens(text, "claude-3-5-haiku-latest")
    assert event["cost_usd"] == cost("claude-3-5-haiku-latest", prompt, completion, cached=10)


def test_calls_outside_a_decorated_function_are_untouched(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = llmguard.instrument(llmguard.instrument(fake_llm.openai_client()))
    reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.usage is not None
    assert events.calls == []


def test_nested_decorated_call_gets_the_usage(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = llmguard.instrument(fake_llm.openai_client())

    @llmguard.track
    def inner(question: str) -> str:
        return str(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            .choices[0]
            .message.content
        )

    @llmguard.track
    def outer(question: str) -> str:
        return inner(question)

    outer("q")
    inner_event, outer_event = events.calls
    assert inner_event["cost_source"] == "usage"
    assert outer_event["cost_source"] == "children"
    assert outer_event["children_cost_usd"] == inner_event["cost_usd"]


def test_instrument_rejects_unknown_clients() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="record_usage"):
        llmguard.instrument(object())


def test_provider_error_is_logged_as_error(fake_llm: FakeLLMServer, events: CapturedEvents) -> None:
    import openai

    client = llmguard.instrument(fake_llm.openai_client())

    @llmguard.track
    def broken(question: str) -> Any:
        return client.chat.completions.create(model="", messages=MESSAGES)

    with pytest.raises(openai.BadRequestError):
        broken("q")
    assert events.calls[0]["error"] == "BadRequestError"


def test_log_content_reads_sdk_responses(fake_llm: FakeLLMServer, events: CapturedEvents) -> None:
    openai_client = fake_llm.openai_client()
    anthropic_client = fake_llm.anthropic_client()

    @llmguard.track(log_content=True)
    def chat(messages: list[dict[str, str]], model: str = "gpt-4o") -> Any:
        return openai_client.chat.completions.create(model=model, messages=messages)

    @llmguard.track(log_content=True)
    def responses(text: str) -> Any:
        return openai_client.responses.create(model="gpt-4o", input=text)

    @llmguard.track(log_content=True)
    def claude(text: str) -> Any:
        return anthropic_client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": text}],
        )

    chat([{"role": "user", "content": "one two"}])
    responses("three four")
    claude("five six")
    assert [e["completion"] for e in events.calls] == [
        "Fake reply about: one two",
        "Fake reply about: three four",
        "Fake reply about: five six",
    ]
    assert events.calls[1]["prompt"] == "three four"


def test_beta_chat_completions_are_instrumented_too(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    """``client.beta.chat`` is another resource object than ``client.chat``: patched too."""
    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        @llmguard.track
        def ask(question: str) -> str:
            reply = client.beta.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            return str(reply.choices[0].message.content)

        text = ask("q")
    else:
        aclient = llmguard.instrument(fake_llm.openai_client(async_client=True))

        @llmguard.track
        async def aask(question: str) -> str:
            reply = await aclient.beta.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            return str(reply.choices[0].message.content)

        text = asyncio.run(aask("q"))
    [event] = events.calls
    assert event["cost_source"] == "usage"
    prompt = llmguard.count_message_tokens(MESSAGES, "gpt-4o")
    assert (event["input_tokens"], event["output_tokens"]) == (
        prompt,
        llmguard.count_tokens(text, "gpt-4o"),
    )

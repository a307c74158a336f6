"""OpenAI Responses API streams (``responses.create(stream=True)`` and the
``responses.stream(...)`` helper) are metered from the usage of their ``response.completed``
event, with the model of the response, once, wherever they are read; ``@budget`` charges
their real cost and ``@cached`` stores and replays them (issue 11)."""

from __future__ import annotations

import asyncio
import inspect
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer, capture_calls

MODEL = "gpt-4o-mini"
QUESTION = "what does a response stream report at its end"
REPLY = "Fake reply about: what does a response stream report at its end"


class Answer(BaseModel):
    answer: str


def _text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def _alist(stream: Any) -> list[Any]:
    return [event async for event in stream]


def _read(way: str, opened: Any) -> tuple[str, Any]:
    """(text, usage the provider reported) of a raw stream or a helper's manager."""
    if way == "create":
        events = list(opened)
        assert events[-1].type == "response.completed"
        return _text(events), events[-1].response.usage
    with opened as stream:
        response = stream.get_final_response()
    return response.output_text, response.usage


async def _aread(way: str, opened: Any) -> tuple[str, Any]:
    if way == "create":
        events = [event async for event in opened]
        assert events[-1].type == "response.completed"
        return _text(events), events[-1].response.usage
    async with opened as stream:
        response = await stream.get_final_response()
    return response.output_text, response.usage


def _open(way: str, client: Any, question: str, model: str, max_output_tokens: int) -> Any:
    """The SDK call: a raw stream (a coroutine of one, for an async client) or a manager."""
    if way == "create":
        return client.responses.create(
            model=model, input=question, max_output_tokens=max_output_tokens, stream=True
        )
    return client.responses.stream(model=model, input=question, max_output_tokens=max_output_tokens)


def _assert_usage(event: dict[str, Any], usage: Any) -> None:
    assert usage.input_tokens == llmguard.count_message_tokens(
        [{"role": "user", "content": QUESTION}], MODEL
    )
    assert event["cost_source"] == "usage"
    assert (event["model"], event["input_tokens"], event["output_tokens"]) == (
        MODEL,
        usage.input_tokens,
        usage.output_tokens,
    )
    cost = llmguard.calc_cost(MODEL, usage.input_tokens, usage.output_tokens)
    assert cost is not None
    assert event["cost_usd"] == float(cost) > 0


def _assert_settled(name: str, event: dict[str, Any]) -> None:
    status = llmguard.budget_status(name)
    assert status.reserved_usd == 0
    assert status.spent_usd == Decimal(str(event["cost_usd"])) > 0
    assert event["budget_spent_usd"] == event["cost_usd"]


@pytest.mark.parametrize("way", ["create", "stream"])
@pytest.mark.parametrize("where", ["returned", "returned-instrumented", "read-inside"])
def test_a_responses_stream_is_metered_from_its_completed_event_and_budgeted(
    way: str,
    where: str,
    flavour: str,
    fake_llm: FakeLLMServer,
    events: CapturedEvents,
    tmp_path: Any,
) -> None:
    aio = flavour == "async"
    client = fake_llm.openai_client(async_client=aio)
    if where != "returned":
        client = llmguard.instrument(client)
    name = f"responses-{way}-{where}-{flavour}"
    budget = llmguard.budget(usd="1", name=name, storage=f"file://{tmp_path}/ledger")
    held: list[Any] = []

    if not aio:

        @budget
        def ask(question: str, *, model: str = MODEL, max_output_tokens: int = 200) -> Any:
            opened = _open(way, client, question, model, max_output_tokens)
            return _read(way, opened) if where == "read-inside" else opened

        result = ask(QUESTION)
        if where != "read-inside":
            held.append(llmguard.budget_status(name))
            result = _read(way, result)
    else:

        @budget
        async def aask(question: str, *, model: str = MODEL, max_output_tokens: int = 200) -> Any:
            opened = _open(way, client, question, model, max_output_tokens)
            if inspect.isawaitable(opened):
                opened = await opened
            return (await _aread(way, opened)) if where == "read-inside" else opened

        async def main() -> Any:
            result = await aask(QUESTION)
            if where == "read-inside":
                return result
            held.append(llmguard.budget_status(name))
            return await _aread(way, result)

        result = asyncio.run(main())
    text, usage = result
    assert text == REPLY
    [event] = events.calls  # one event, the stream counted once
    _assert_usage(event, usage)
    _assert_settled(name, event)
    if held:  # a returned stream holds its reservation until it has been read
        assert held[0].reserved_usd > 0
        assert held[0].spent_usd == 0
    assert len(fake_llm.requests) == 1


@pytest.mark.parametrize("way", ["create", "stream"])
def test_a_responses_stream_left_early_is_estimated_and_settled(
    way: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    client = fake_llm.openai_client()
    budget = llmguard.budget(usd="1", name=f"left-{way}", storage=f"file://{tmp_path}/ledger")

    @budget
    def ask(question: str, *, model: str = MODEL, max_output_tokens: int = 200) -> Any:
        return _open(way, client, question, model, max_output_tokens)

    if way == "create":
        stream = ask(QUESTION)
        read = [next(stream) for _ in range(6)]  # lifecycle events, then two text deltas
        stream.close()
    else:
        with ask(QUESTION) as helper:
            read = [next(helper) for _ in range(6)]
    text = _text(read)
    assert text  # some text was read, no usage
    [event] = events.calls
    assert event["cost_source"] == "estimate"
    assert event["model"] == MODEL
    assert event["output_tokens"] == llmguard.count_tokens(text, MODEL)
    _assert_settled(f"left-{way}", event)


def test_cached_responses_streams_replay_like_the_sdk(flavour: str, tmp_path: Any) -> None:
    """A raw stream is stored as its events; a helper as its raw events and its
    ``text_format``: a hit opens the SDK's own helper over them (``output_parsed`` too)."""
    with FakeLLMServer(reply=lambda request: '{"answer": "42"}') as fake:
        aio = flavour == "async"
        client = llmguard.instrument(fake.openai_client(async_client=aio))
        storage = f"file://{tmp_path}/cache"

        if not aio:

            @llmguard.cached(storage=storage)
            def raw(question: str) -> Any:
                return client.responses.create(model=MODEL, input=question, stream=True)

            @llmguard.cached(storage=storage)
            def helper(question: str) -> Any:
                return client.responses.stream(model=MODEL, input=question, text_format=Answer)

            def read_helper() -> tuple[Any, Any, list[str]]:
                with helper(QUESTION) as stream:
                    kinds = [event.type for event in stream]
                    response = stream.get_final_response()
                return response.output_parsed, response.usage, kinds

            with capture_calls() as events:
                raws = [list(raw(QUESTION)) for _ in range(2)]
                helpers = [read_helper() for _ in range(2)]
        else:

            @llmguard.cached(storage=storage)
            async def araw(question: str) -> Any:
                return await client.responses.create(model=MODEL, input=question, stream=True)

            @llmguard.cached(storage=storage)
            def ahelper(question: str) -> Any:
                return client.responses.stream(model=MODEL, input=question, text_format=Answer)

            async def aread_helper() -> tuple[Any, Any, list[str]]:
                async with ahelper(QUESTION) as stream:
                    kinds = [event.type async for event in stream]
                    response = await stream.get_final_response()
                return response.output_parsed, response.usage, kinds

            async def main() -> tuple[list[list[Any]], list[Any]]:
                raws = [await _alist(await araw(QUESTION)) for _ in range(2)]
                return raws, [await aread_helper() for _ in range(2)]

            with capture_calls() as events:
                raws, helpers = asyncio.run(main())
        assert len(fake.requests) == 2  # one per function: the hits sent nothing
    first, again = raws
    assert [type(e) for e in again] == [type(e) for e in first]
    assert [e.model_dump() for e in again] == [e.model_dump() for e in first]
    assert helpers[0] == helpers[1]
    assert helpers[1][0] == Answer(answer="42")
    raw_miss, raw_hit, helper_miss, helper_hit = events.calls
    for miss, usage in ((raw_miss, first[-1].response.usage), (helper_miss, helpers[0][1])):
        assert miss["cache"] == "miss"
        assert (miss["model"], miss["input_tokens"], miss["output_tokens"]) == (
            MODEL,
            usage.input_tokens,
            usage.output_tokens,
        )
        assert miss["cost_source"] == "usage"
    for hit, miss in ((raw_hit, raw_miss), (helper_hit, helper_miss)):
        assert (hit["cache"], hit["cost_usd"], hit["saved_usd"]) == ("hit", 0.0, miss["cost_usd"])

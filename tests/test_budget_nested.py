"""``@budget`` over a function whose provider calls are made by nested decorated calls
charges what they spent, once: a budget with the same name (and key) inside already charged
its part, and is not charged again by the one outside (issue 11)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

MODEL = "gpt-4o-mini"


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _spent(name: str, key: str | None = None) -> Decimal:
    status = llmguard.budget_status(name, key=key)
    assert status.reserved_usd == 0  # everything settled
    return status.spent_usd


def _costs(events: CapturedEvents, *names: str) -> Decimal:
    """The sum of the cost of the events of the functions whose name ends with one of
    ``names`` (all of them if none given)."""
    return sum(
        (
            Decimal(str(e["cost_usd"]))
            for e in events.calls
            if not names or e["function"].endswith(names)
        ),
        Decimal(0),
    )


def _provider_costs(fake: FakeLLMServer) -> Decimal:
    """What the fake provider billed: each request's prompt and reply, as it counts them."""
    total = Decimal(0)
    for request in fake.requests:
        prompt = llmguard.count_message_tokens(request.body["messages"], MODEL)
        reply = llmguard.count_tokens(
            "Fake reply about: " + request.body["messages"][-1]["content"], MODEL
        )
        cost = llmguard.calc_cost(MODEL, prompt, reply)
        assert cost is not None
        total += cost
    return total


def test_an_outer_budget_charges_what_its_nested_calls_spent(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, backend: str
) -> None:
    team = llmguard.budget(usd=1, name="team", storage=backend, model=MODEL)
    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        @llmguard.track
        def summarize(text: str) -> str:
            reply = client.chat.completions.create(model=MODEL, messages=_messages(text))
            return str(reply.choices[0].message.content)

        @team
        def research(topic: str) -> list[str]:
            return [summarize(topic), summarize(topic + " in depth")]

        research("budgets over nested calls")
    else:
        aclient = llmguard.instrument(fake_llm.openai_client(async_client=True))

        @llmguard.track
        async def asummarize(text: str) -> str:
            reply = await aclient.chat.completions.create(model=MODEL, messages=_messages(text))
            return str(reply.choices[0].message.content)

        @team
        async def aresearch(topic: str) -> list[str]:
            return [await asummarize(topic), await asummarize(topic + " in depth")]

        asyncio.run(aresearch("budgets over nested calls"))
    assert len(events.calls) == 3
    outer = events.calls[-1]
    assert outer["cost_source"] == "children"  # the event counts its own calls only
    assert outer["cost_usd"] == 0
    spent = _spent("team")
    assert spent == _costs(events) == _provider_costs(fake_llm) > 0
    assert outer["children_cost_usd"] == float(spent)
    assert outer["budget_spent_usd"] == float(spent)


def _nested(fake: FakeLLMServer, inner_budget: Any, outer_budget: Any) -> Any:
    """An outer function (``outer_budget``) calling ``middle`` (tracked), which calls
    ``charged`` (``inner_budget``) and ``tracked``; and a direct call of its own."""
    client = llmguard.instrument(fake.openai_client())

    def ask(text: str) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=_messages(text))
        return str(reply.choices[0].message.content)

    @inner_budget
    def charged(text: str, user: str = "alice") -> str:
        return ask(text)

    @llmguard.track
    def tracked(text: str) -> str:
        return ask(text)

    @llmguard.track
    def middle(text: str, user: str) -> str:
        return charged(text + " first", user) + tracked(text + " second")

    @outer_budget
    def outer(text: str, user: str = "alice") -> str:
        return ask(text) + middle(text, user)

    return outer


def test_a_budget_with_the_same_name_inside_is_not_charged_twice(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    team = llmguard.budget(usd=1, name="team", storage=f"file://{tmp_path}/l", model=MODEL)
    _nested(fake_llm, team, team)("one budget, nested")
    assert len(fake_llm.requests) == 3
    assert len(events.calls) == 4
    assert _spent("team") == _costs(events) == _provider_costs(fake_llm)
    # the inner budget charged its call; the outer one its own call and the tracked one
    assert events.calls[0]["budget_spent_usd"] == float(_costs(events, ".charged"))


def test_budgets_with_other_names_or_keys_each_charge_everything_they_cover(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    storage = f"file://{tmp_path}/l"
    inner = llmguard.budget(usd=1, name="inner", storage=storage, model=MODEL)
    _nested(fake_llm, inner, llmguard.budget(usd=1, name="outer", storage=storage, model=MODEL))(
        "two budgets"
    )
    assert _spent("inner") == _costs(events, ".charged") > 0
    assert _spent("outer") == _costs(events) == _provider_costs(fake_llm)

    fake_llm.clear()
    events.clear()
    per_user = llmguard.budget(
        usd=1, name="per-user", key=lambda user, **_: user, storage=storage, model=MODEL
    )
    outer = _nested(fake_llm, per_user, per_user)
    outer("keyed", user="bob")  # one ledger: charged once
    assert _spent("per-user", key="bob") == _costs(events)
    events.clear()
    # the inner call charges alice's ledger, the outer one carol's: hers pays for it too
    client = llmguard.instrument(fake_llm.openai_client())

    @per_user
    def for_user(text: str, user: str) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=_messages(text))
        return str(reply.choices[0].message.content)

    @per_user
    def on_behalf(text: str, user: str) -> str:
        return for_user(text, "alice")

    on_behalf("another tenant's ledger", "carol")
    assert _spent("per-user", key="alice") == _costs(events) == _spent("per-user", key="carol")


def test_an_outer_call_that_fails_still_pays_for_its_nested_calls(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    team = llmguard.budget(usd=1, name="team", storage=f"file://{tmp_path}/l", model=MODEL)
    client = llmguard.instrument(fake_llm.openai_client(async_client=flavour == "async"))

    if flavour == "sync":

        @llmguard.track
        def draft(text: str) -> str:
            reply = client.chat.completions.create(model=MODEL, messages=_messages(text))
            return str(reply.choices[0].message.content)

        @team
        def review(text: str) -> str:
            draft(text)
            raise ValueError("the draft did not pass review")

        with pytest.raises(ValueError, match="review"):
            review("a draft to review")
    else:

        @llmguard.track
        async def adraft(text: str) -> str:
            reply = await client.chat.completions.create(model=MODEL, messages=_messages(text))
            return str(reply.choices[0].message.content)

        @team
        async def areview(text: str) -> str:
            await adraft(text)
            raise ValueError("the draft did not pass review")

        with pytest.raises(ValueError, match="review"):
            asyncio.run(areview("a draft to review"))
    assert events.calls[-1]["outcome"] == "error"
    assert _spent("team") == _costs(events) == _provider_costs(fake_llm) > 0


@pytest.mark.parametrize("inner_budget", [False, True])
def test_a_stream_returned_through_nested_budgets_is_charged_once(
    inner_budget: bool, flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    storage = f"file://{tmp_path}/l"
    team = llmguard.budget(usd=1, name="team", storage=storage, model=MODEL)
    inner = team if inner_budget else llmguard.track
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        @inner
        def stream(text: str) -> Any:
            return client.chat.completions.create(model=MODEL, messages=_messages(text), **options)

        @team
        def relay(text: str) -> Any:
            return stream(text)

        chunks = list(relay("relay this stream"))
    else:
        aclient = llmguard.instrument(fake_llm.openai_client(async_client=True))

        @inner
        async def astream(text: str) -> Any:
            return await aclient.chat.completions.create(
                model=MODEL, messages=_messages(text), **options
            )

        @team
        async def arelay(text: str) -> Any:
            return await astream(text)

        async def main() -> list[Any]:
            return [chunk async for chunk in await arelay("relay this stream")]

        chunks = asyncio.run(main())
    usage = chunks[-1].usage
    cost = llmguard.calc_cost(MODEL, usage.prompt_tokens, usage.completion_tokens)
    assert _spent("team") == _costs(events) == cost


def test_a_generator_pays_for_the_nested_calls_made_while_it_is_read(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Any
) -> None:
    client = llmguard.instrument(fake_llm.openai_client())

    @llmguard.track
    def answer(text: str) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=_messages(text))
        return str(reply.choices[0].message.content)

    @llmguard.budget(usd=1, name="team", storage=f"file://{tmp_path}/l", model=MODEL)
    def answers(questions: list[str]) -> Iterator[str]:
        for question in questions:
            yield answer(question)

    assert len(list(answers(["first question", "second question"]))) == 2
    assert len(events.calls) == 3
    assert _spent("team") == _costs(events) == _provider_costs(fake_llm) > 0


def test_an_outer_budget_without_a_model_says_what_to_do() -> None:
    @llmguard.budget(usd=1, name="team")
    def research(topic: str) -> str:
        return topic

    with pytest.raises(llmguard.PriceUnknown, match=r"names no model.*@budget\(model=\.\.\.\)"):
        research("anything")

"""Cost per tenant and per feature: tags and the budget key on every ``llm_call`` event."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

from .conftest import call, make


def _tags(events: CapturedEvents) -> list[dict[str, str] | None]:
    return [e.get("tags") for e in events.calls]


def test_tags_of_a_block_go_on_every_call_made_in_it(flavour: str, events: CapturedEvents) -> None:
    ask = make(flavour, lambda q, model="gpt-4o-mini": "answer")
    call(ask, "outside")
    with llmguard.tags(user="u42", feature="search") as in_force:
        assert dict(in_force) == {"user": "u42", "feature": "search"}
        call(ask, "inside")
        with llmguard.tags(feature="rerank", user=None, attempt=2, cached=False):
            call(ask, "nested block")
        call(ask, "after the nested block")
    call(ask, "outside again")
    assert _tags(events) == [
        None,  # no tags: no field
        {"user": "u42", "feature": "search"},
        {"feature": "rerank", "attempt": "2", "cached": "False"},  # None removes a name
        {"user": "u42", "feature": "search"},
        None,
    ]
    assert "tags" not in events.calls[0]


def test_tags_flow_into_asyncio_tasks_and_nested_calls(events: CapturedEvents) -> None:
    @llmguard.track(model="gpt-4o-mini")
    async def inner(q: str) -> str:
        return "x"

    @llmguard.track(model="gpt-4o-mini", tags={"feature": "outer"})
    async def outer(q: str) -> str:
        await inner("made inside")  # the outer function's tags hold for it
        with llmguard.tags(step="rerank", feature="rerank"):  # set inside: the innermost wins
            await inner("made in a block inside")
        return "y"

    async def request(user: str) -> None:
        with llmguard.tags(user=user):
            await asyncio.gather(
                asyncio.create_task(inner("in a task")), asyncio.to_thread(_sync_inner, "thread")
            )
            await outer("q")

    async def main() -> None:
        await asyncio.gather(request("alice"), request("bob"))

    asyncio.run(main())
    by_user: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for event in events.calls:
        tags = event["tags"]
        by_user.setdefault(tags["user"], []).append((event["function"].rsplit(".", 1)[-1], tags))
    for user in ("alice", "bob"):  # concurrent requests never see each other's tags
        assert sorted(by_user[user], key=lambda item: sorted(item[1].items())) == sorted(
            [
                ("inner", {"user": user}),
                ("_sync_inner", {"user": user}),
                ("inner", {"user": user, "feature": "outer"}),
                ("inner", {"user": user, "feature": "rerank", "step": "rerank"}),
                ("outer", {"user": user, "feature": "outer"}),
            ],
            key=lambda item: sorted(item[1].items()),
        )


@llmguard.track(model="gpt-4o-mini")
def _sync_inner(q: str) -> str:
    return "z"


def test_a_thread_started_by_hand_has_its_own_tags(events: CapturedEvents) -> None:
    """Threads do not inherit contextvars: documented; contextvars.copy_context().run does."""
    with llmguard.tags(user="u1"):
        plain = threading.Thread(target=_sync_inner, args=("plain",))
        context = contextvars.copy_context()
        copied = threading.Thread(target=context.run, args=(_sync_inner, "copied"))
        for thread in (plain, copied):
            thread.start()
            thread.join()
    assert _tags(events) == [None, {"user": "u1"}]


def test_decorator_tags_stack_and_the_outer_decorator_wins(events: CapturedEvents) -> None:
    @llmguard.track(tags={"feature": "outer-decorator", "team": "search"})
    @llmguard.cached(tags={"feature": "cached"})
    @llmguard.rate_limited("100/second", tags={"layer": "rate"})
    @llmguard.retry_on_rate_limit(tags={"layer": "retry"})
    def ask(q: str, model: str = "gpt-4o-mini") -> str:
        return "answer"

    with llmguard.tags(feature="block", user="u9"):  # the function's own tags win over it
        ask("q")
        ask("q")  # a cache hit carries them too
    assert (
        _tags(events)
        == [{"feature": "outer-decorator", "user": "u9", "team": "search", "layer": "rate"}] * 2
    )
    assert events.calls[1]["cache"] == "hit"
    spec = ask.__llmguard__  # type: ignore[attr-defined]
    assert sum(type(layer).__name__ == "TagsLayer" for layer in spec.layers) == 1


def test_guard_budget_route_and_debounced_take_tags(tmp_path: Any, events: CapturedEvents) -> None:
    storage = f"file://{tmp_path}/s"

    @llmguard.guard(
        budget={"usd": 1, "storage": storage, "name": "tagged"},
        cache={"storage": storage},
        tags={"feature": "guarded"},
    )
    def guarded(q: str, model: str = "gpt-4o-mini") -> str:
        return "a"

    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", tags={"feature": "routed"})
    def routed(q: str, model: str = "gpt-4o") -> str:
        return "b"

    @llmguard.budget(usd=1, storage=storage, name="direct", tags={"feature": "budgeted"})
    def budgeted(q: str, model: str = "gpt-4o-mini") -> str:
        return "c"

    @llmguard.debounced(wait=0.01, tags={"feature": "debounced"})
    def debounced(q: str, model: str = "gpt-4o-mini") -> str:
        return "d"

    guarded("q")
    routed("q")
    budgeted("q")
    debounced("q")
    assert [t and t["feature"] for t in _tags(events)] == [
        "guarded",
        "routed",
        "budgeted",
        "debounced",
    ]


def test_a_streams_event_has_the_tags_of_where_it_was_called(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = fake_llm.openai_client()

    @llmguard.track
    def ask() -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )

    with llmguard.tags(feature="streaming"):
        stream = ask()
    with llmguard.tags(feature="elsewhere"):
        list(stream)  # consumed outside the block: the call was made inside it
    assert _tags(events) == [{"feature": "streaming"}]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"feature-name": "x"}, "tag name 'feature-name'"),
        ({"9lives": "x"}, "tag name '9lives'"),
        ({"__name__": "x"}, "tag name '__name__'"),
        ({"user": {"id": 1}}, "must be text"),
        ({"user": ["a"]}, "must be text"),
        ({"doc": "x" * 201}, "201 characters long"),
    ],
)
def test_bad_tags_fail_where_they_are_given(tags: dict[str, Any], message: str) -> None:
    with pytest.raises(llmguard.ConfigurationError, match=message):
        llmguard.tags(**tags)
    for decorator in (
        lambda: llmguard.track(tags=tags),
        lambda: llmguard.cached(tags=tags),
        lambda: llmguard.budget(usd=1, tags=tags),
        lambda: llmguard.guard(retry=True, tags=tags),
        lambda: llmguard.retry_on_rate_limit(tags=tags),
    ):
        with pytest.raises(llmguard.ConfigurationError, match=message):
            decorator()
    with pytest.raises(llmguard.ConfigurationError, match="dict of tag names"):
        llmguard.track(tags=["feature"])  # type: ignore[arg-type]


def test_budgeted_events_carry_the_key_and_the_limit(tmp_path: Any, events: CapturedEvents) -> None:
    storage = f"file://{tmp_path}/s"

    @llmguard.budget(usd="2.5", storage=storage, key=lambda tenant, **_: tenant, name="tenants")
    def ask(tenant: str, q: str, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        return "ok"

    @llmguard.budget(usd=1, storage=storage, name="shared")
    def unkeyed(q: str, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        return "ok"

    ask("acme", "q")
    ask("globex", "q")
    ask("acme", "q")
    unkeyed("q")
    fields = [
        (e["budget"], e.get("budget_key"), e["budget_limit_usd"], e["budget_spent_usd"])
        for e in events.calls
    ]
    assert fields == [
        ("tenants", "acme", 2.5, 0.0035),
        ("tenants", "globex", 2.5, 0.0035),
        ("tenants", "acme", 2.5, 0.007),
        ("shared", None, 1.0, 0.0035),
    ]
    assert "budget_key" not in events.calls[3]


def test_tags_cost_nothing_when_none_are_set(events: CapturedEvents) -> None:
    @llmguard.track(model="gpt-4o-mini")
    def ask(q: str) -> str:
        return "x"

    spec = ask.__llmguard__  # type: ignore[attr-defined]
    assert spec.layers == ()  # no tags layer: the direct path
    ask("q")
    assert "tags" not in events.calls[0]

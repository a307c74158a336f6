from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from llmguard.testing import FakeLLMServer, FakeRequest


def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_request_log_echoes_model_and_redacts_keys(fake_llm: FakeLLMServer) -> None:
    client = fake_llm.openai_client(api_key="sk-very-secret")
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.model == "gpt-4o-mini"
    [request] = fake_llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.model == "gpt-4o-mini"
    assert request.body["messages"] == [{"role": "user", "content": "hi"}]
    assert "sk-very-secret" not in repr(request.headers)
    assert request.headers["authorization"] == "<redacted>"
    fake_llm.clear()
    assert fake_llm.requests == []


def test_deterministic_custom_reply_and_latency() -> None:
    def reply(request: FakeRequest) -> str:
        return f"model={request.model}"

    with FakeLLMServer(reply=reply, latency=0.05) as fake:
        client = fake.openai_client()
        started = time.perf_counter()
        first = client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "a"}]
        )
        elapsed = time.perf_counter() - started
        second = client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "a"}]
        )
    assert first.choices[0].message.content == second.choices[0].message.content == "model=gpt-4"
    assert elapsed >= 0.05


def test_errors_in_each_api_format(fake_llm: FakeLLMServer) -> None:
    status, body = post(f"{fake_llm.url}/v1/nowhere", {"model": "gpt-4o"})
    assert status == 404
    assert "nowhere" in body["error"]["message"]
    status, body = post(
        f"{fake_llm.url}/v1/messages", {"model": "claude-3-5-haiku-latest", "messages": []}
    )
    assert status == 400
    assert body["type"] == "error"
    assert "max_tokens" in body["error"]["message"]
    status, body = post(f"{fake_llm.url}/v1/chat/completions", {"messages": []})
    assert (status, body["error"]["message"]) == (400, "model is required")


def test_stopped_server_has_no_url() -> None:
    server = FakeLLMServer()
    with pytest.raises(RuntimeError, match="not running"):
        server.url  # noqa: B018
    with server:
        assert server.url.startswith("http://127.0.0.1:")


MESSAGES = [{"role": "user", "content": "hello"}]


def test_rpm_is_enforced_with_openai_style_429s() -> None:
    import openai

    with FakeLLMServer(requests_per_window=3, window=1.0) as fake:
        client = fake.openai_client()
        for _ in range(3):
            response = client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
            assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        error = info.value
        assert error.code == "rate_limit_exceeded"
        headers = error.response.headers
        assert 1 <= int(headers["retry-after"]) <= 2
        assert 0 < int(headers["retry-after-ms"]) <= 1000
        assert headers["x-ratelimit-reset-requests"].endswith("ms")
        time.sleep(1.05)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert fake.statuses == [200, 200, 200, 429, 200]


def test_tpm_counts_prompt_plus_max_tokens() -> None:
    import openai

    with FakeLLMServer(tokens_per_window=100, window=1.0) as fake:
        client = fake.openai_client()
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=80)
        with pytest.raises(openai.RateLimitError, match="tokens"):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=80)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3)


def test_insufficient_quota_mode() -> None:
    import openai

    with FakeLLMServer(quota_exhausted=True) as fake:
        with pytest.raises(openai.RateLimitError) as info:
            fake.openai_client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert info.value.code == "insufficient_quota"
        fake.quota_exhausted = False
        fake.openai_client().chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_anthropic_style_limits_and_overload() -> None:
    import anthropic

    with FakeLLMServer(requests_per_window=1, window=1.0) as fake:
        client = fake.anthropic_client()
        request = {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": MESSAGES}
        raw = client.messages.with_raw_response.create(**request)
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "1"
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(**request)
        assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert "retry-after" in limited.value.response.headers
        time.sleep(1.05)
        fake.fail_next(1, 529, retry_after=2)
        # OverloadedError: an InternalServerError from anthropic 2.5 on, an APIStatusError before.
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            client.messages.create(**request)
        assert overloaded.value.status_code == 529
        assert overloaded.value.response.headers["retry-after"] == "2"


def test_fault_injection_with_the_sdk(fake_llm: FakeLLMServer) -> None:
    import openai

    client = fake_llm.openai_client(timeout=0.5)
    fake_llm.fail_next(2, 503)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    fake_llm.drop_next(1)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    fake_llm.slow_next(1, seconds=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert fake_llm.statuses[:3] == [503, 503, 0]
    assert 200 in fake_llm.statuses[3:]


def llmguard_count(text: str) -> int:
    import llmguard

    return int(llmguard.count_tokens(text, "gpt-4o-mini"))


def test_openai_streaming_with_the_real_sdk(flavour: str) -> None:
    import asyncio

    with FakeLLMServer(chunk_delay=0.01) as fake:
        request = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "stream me a reply please"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if flavour == "sync":
            chunks = list(fake.openai_client().chat.completions.create(**request))
        else:

            async def collect() -> list[Any]:
                stream = await fake.openai_client(async_client=True).chat.completions.create(
                    **request
                )
                return [chunk async for chunk in stream]

            chunks = asyncio.run(collect())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Fake reply about: stream me a reply please"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == llmguard_count(text)
    assert usage.prompt_tokens > 0
    without_usage = FakeLLMServer().start()
    try:
        plain = list(
            without_usage.openai_client().chat.completions.create(
                **{**request, "stream_options": None}
            )
        )
    finally:
        without_usage.stop()
    assert all(chunk.usage is None for chunk in plain)


def test_anthropic_streaming_with_the_real_sdk(flavour: str) -> None:
    import asyncio

    request = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "stream this"}],
    }
    with FakeLLMServer() as fake:
        if flavour == "sync":
            with fake.anthropic_client().messages.stream(**request) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
        else:

            async def collect() -> tuple[str, Any]:
                async with fake.anthropic_client(async_client=True).messages.stream(
                    **request
                ) as stream:
                    pieces = [piece async for piece in stream.text_stream]
                    return "".join(pieces), await stream.get_final_message()

            text, final = asyncio.run(collect())
    assert text == "Fake reply about: stream this"
    assert final.content[0].text == text
    assert final.usage.output_tokens > 0
    assert final.usage.input_tokens > 0
    assert final.stop_reason == "end_turn"


def test_chunks_arrive_as_they_are_sent() -> None:
    with FakeLLMServer(chunk_delay=0.05) as fake:
        stream = fake.openai_client().chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "one two three four five"}],
            stream=True,
        )
        started = time.perf_counter()
        first = next(iter(stream))
        first_after = time.perf_counter() - started
        rest = list(stream)
        total = time.perf_counter() - started
    assert first.choices[0].delta.role == "assistant"
    assert first_after < 0.05  # not buffered until the end
    assert total >= 0.05 * (len(rest) - 1)


CONCURRENT = 256


def meeting_point(parties: int) -> Any:
    """A reply that answers only once ``parties`` requests are inside the server at once."""
    import threading

    barrier = threading.Barrier(parties, timeout=20)

    def reply(request: FakeRequest) -> str:
        barrier.wait()  # breaks (and the request fails) if they were not all held at once
        return "together"

    return reply


def test_carries_256_simultaneous_connections_through_the_sdk(flavour: str) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with FakeLLMServer(reply=meeting_point(CONCURRENT)) as fake:
        request = {"model": "gpt-4o-mini", "messages": MESSAGES}

        def outcome(call: Any) -> str:
            try:
                return str(call().choices[0].message.content)
            except Exception as error:  # the count of each failure is the assertion
                return type(error).__name__

        if flavour == "sync":
            client = fake.openai_client(timeout=30)
            with ThreadPoolExecutor(CONCURRENT) as pool:
                results = list(
                    pool.map(
                        lambda _: outcome(lambda: client.chat.completions.create(**request)),
                        range(CONCURRENT),
                    )
                )
        else:

            async def main() -> list[str]:
                aclient = fake.openai_client(async_client=True, timeout=30)

                async def one() -> str:
                    try:
                        reply = await aclient.chat.completions.create(**request)
                        return str(reply.choices[0].message.content)
                    except Exception as error:
                        return type(error).__name__

                return await asyncio.gather(*(one() for _ in range(CONCURRENT)))

            results = asyncio.run(main())
        assert {r: results.count(r) for r in set(results)} == {"together": CONCURRENT}
        assert fake.statuses == [200] * CONCURRENT
        assert len(fake.requests) == CONCURRENT


def test_stop_closes_kept_alive_connections(flavour: str) -> None:
    import asyncio

    import openai

    fake = FakeLLMServer().start()
    request = {"model": "gpt-4o-mini", "messages": MESSAGES}
    if flavour == "sync":
        client = fake.openai_client()
        client.chat.completions.create(**request)  # the connection stays in the pool
        fake.stop()
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(**request)
    else:

        async def main() -> None:
            aclient = fake.openai_client(async_client=True)
            await aclient.chat.completions.create(**request)
            fake.stop()
            with pytest.raises(openai.APIConnectionError):
                await aclient.chat.completions.create(**request)

        asyncio.run(main())
    assert fake.statuses == [200]


def sse_events(url: str, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """The (event name, data) pairs of a streamed answer, read off the wire."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        blocks = response.read().decode().split("\n\n")
    events: list[tuple[str | None, Any]] = []
    for block in filter(None, blocks):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = fields["data"]
        events.append((fields.get("event"), data if data == "[DONE]" else json.loads(data)))
    return events


def test_openai_stream_chunks_are_shaped_as_the_api_sends_them(fake_llm: FakeLLMServer) -> None:
    url = f"{fake_llm.openai_base_url}/chat/completions"
    request = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with_usage = sse_events(url, {**request, "stream_options": {"include_usage": True}})
    *chunks, last, done = with_usage
    assert done == (None, "[DONE]")
    assert all(name is None for name, _ in with_usage)
    # with include_usage every chunk carries "usage": null; the extra last one the totals
    assert all("usage" in chunk and chunk["usage"] is None for _, chunk in chunks)
    assert last[1]["choices"] == []
    assert last[1]["usage"]["total_tokens"] == (
        last[1]["usage"]["prompt_tokens"] + last[1]["usage"]["completion_tokens"]
    )
    assert chunks[0][1]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert chunks[-1][1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert {chunk["service_tier"] for _, chunk in chunks} == {"default"}
    without = sse_events(url, request)
    assert len(without) == len(with_usage) - 1  # no usage chunk
    assert all("usage" not in chunk for _, chunk in without[:-1])


def test_anthropic_stream_events_are_shaped_as_the_api_sends_them() -> None:
    with FakeLLMServer(cached_tokens=3) as fake:
        events = sse_events(
            f"{fake.url}/v1/messages",
            {
                "model": "claude-3-5-haiku-latest",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "stream this please"}],
                "stream": True,
            },
        )
        with fake.anthropic_client().messages.stream(
            model="claude-3-5-haiku-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": "stream this please"}],
        ) as stream:
            final = stream.get_final_message()
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(name == data["type"] for name, data in events)
    start = events[0][1]["message"]["usage"]
    delta = events[-2][1]["usage"]
    assert start["cache_read_input_tokens"] == 3
    assert start["input_tokens"] > 0
    assert start["output_tokens"] == 1  # message_start: the input, and the first token
    # message_delta: cumulative totals, the input repeated (not an increment)
    assert {k: delta[k] for k in start if k in delta and k != "output_tokens"} == {
        "input_tokens": start["input_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
    }
    assert delta["output_tokens"] == llmguard_count(final.content[0].text)
    # the SDK overwrites with those totals: the final message has the same usage
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        start["input_tokens"],
        delta["output_tokens"],
    )
    assert final.usage.cache_read_input_tokens == 3


def test_anthropic_request_ids_and_error_bodies() -> None:
    import anthropic

    request = {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": MESSAGES}
    with FakeLLMServer(requests_per_window=1, window=30.0) as fake:
        client = fake.anthropic_client()
        raw = client.messages.with_raw_response.create(**request)
        assert raw.headers["request-id"].startswith("req_")
        assert "x-request-id" not in raw.headers
        assert raw.parse()._request_id == raw.headers["request-id"]  # what the SDK reads
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(**request)
        error = limited.value
        body: Any = error.body
        assert body == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": body["error"]["message"]},
            "request_id": error.response.headers["request-id"],
        }
        assert error.request_id == error.response.headers["request-id"]
        assert int(error.response.headers["retry-after"]) >= 1
        assert "retry-after-ms" not in error.response.headers  # Anthropic sends seconds only


def test_openai_error_bodies() -> None:
    import openai

    with FakeLLMServer() as fake:
        status, body = post(f"{fake.url}/v1/nowhere", {"model": "gpt-4o"})
        assert (status, body) == (
            404,
            {
                "error": {
                    "message": "Invalid URL (POST /v1/nowhere)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        )
        fake.fail_next(1, 500)
        with pytest.raises(openai.InternalServerError) as failed:
            fake.openai_client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert failed.value.type == "server_error"
        assert failed.value.request_id == failed.value.response.headers["x-request-id"]


def test_anthropic_quota_exhausted_is_a_low_credit_balance() -> None:
    import anthropic

    with (
        FakeLLMServer(quota_exhausted=True) as fake,
        pytest.raises(anthropic.BadRequestError, match="credit balance is too low") as info,
    ):
        fake.anthropic_client().messages.create(
            model="claude-3-5-haiku-latest", max_tokens=10, messages=MESSAGES
        )
    assert info.value.status_code == 400
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_chat_completion_is_shaped_as_the_api_sends_it(fake_llm: FakeLLMServer) -> None:
    status, body = post(
        f"{fake_llm.openai_base_url}/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}
    )
    assert status == 200
    assert body["service_tier"] == "default"
    assert body["choices"][0]["message"]["annotations"] == []
    assert body["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }


def test_responses_api_streams_with_the_real_sdk(flavour: str) -> None:
    import asyncio

    request = {"model": "gpt-4o-mini", "input": "stream this answer", "max_output_tokens": 50}
    with FakeLLMServer(cached_tokens=2) as fake:
        wire = sse_events(f"{fake.openai_base_url}/responses", {**request, "stream": True})
        if flavour == "sync":
            client = fake.openai_client()
            events = list(client.responses.create(**request, stream=True))
            with client.responses.stream(**request) as stream:
                final = stream.get_final_response()
        else:

            async def collect() -> tuple[list[Any], Any]:
                aclient = fake.openai_client(async_client=True)
                events = [e async for e in await aclient.responses.create(**request, stream=True)]
                async with aclient.responses.stream(**request) as stream:
                    return events, await stream.get_final_response()

            events, final = asyncio.run(collect())
    names = [name for name, _ in wire]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in wire] == list(range(len(wire)))
    assert wire[0][1]["response"]["usage"] is None
    assert [type(e).__name__ for e in events][-1] == "ResponseCompletedEvent"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "Fake reply about: stream this answer"
    usage = events[-1].response.usage
    assert usage == final.usage
    assert usage.output_tokens == llmguard_count(text)
    assert usage.input_tokens_details.cached_tokens == 2
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

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
        with pytest.raises(anthropic.InternalServerError) as overloaded:
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

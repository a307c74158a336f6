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

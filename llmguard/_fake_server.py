"""A fake LLM provider on loopback, good enough for the official ``openai`` and ``anthropic``
SDKs: deterministic replies, ``usage`` counted with llmguard's own token counter, the
requested model echoed, a request log, injectable latency and prompt-cache hits."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from typing import Any, NamedTuple

from ._tokens import count_message_tokens, count_tokens

_REDACTED_HEADERS = {"authorization", "x-api-key", "api-key", "openai-organization"}


@dataclass(frozen=True)
class FakeRequest:
    """One request the fake server received (API keys redacted from ``headers``)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def default_reply(request: FakeRequest) -> str:
    """The fake's answer: a fixed phrase and the start of the last user message."""
    body = request.body
    items: Any = body.get("messages")
    if items is None:
        items = body.get("input")
    if isinstance(items, str):
        last = items
    else:
        users = [m for m in items or [] if isinstance(m, dict) and m.get("role", "user") == "user"]
        last = _text(users[-1].get("content")) if users else ""
    words = last.split()
    return "Fake reply about: " + " ".join(words[:12]) if words else "Fake reply."


@dataclass
class _Options:
    reply: Callable[[FakeRequest], str]
    latency: float | Callable[[FakeRequest], float]
    cached_tokens: int | Callable[[FakeRequest], int]
    requests: list[FakeRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Any = field(default_factory=lambda: count(1))


class FakeLLMServer:
    """A real HTTP server on 127.0.0.1 (free port) speaking three APIs:

    - OpenAI chat completions: ``POST /v1/chat/completions``
    - OpenAI Responses API: ``POST /v1/responses``
    - Anthropic messages: ``POST /v1/messages``

    Use it as a context manager and point the SDKs at it::

        with FakeLLMServer() as fake:
            client = OpenAI(base_url=fake.openai_base_url, api_key="test")
            client.chat.completions.create(model="gpt-4o", messages=[...])
            assert fake.requests[0].model == "gpt-4o"

    ``reply`` computes the answer text from the request, ``latency`` (seconds, or a
    function of the request) delays every answer, ``cached_tokens`` (int or function)
    reports that many prompt tokens as served from the provider's prompt cache.
    """

    def __init__(
        self,
        *,
        reply: Callable[[FakeRequest], str] = default_reply,
        latency: float | Callable[[FakeRequest], float] = 0.0,
        cached_tokens: int | Callable[[FakeRequest], int] = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._options = _Options(reply=reply, latency=latency, cached_tokens=cached_tokens)
        self._host = host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> FakeLLMServer:
        if self._server is not None:
            return self
        handler = type("Handler", (_Handler,), {"options": self._options})
        server = ThreadingHTTPServer((self._host, self._port), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="llmguard-fake-llm",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses and clients -----------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(
                "the fake server is not running: use it as a context manager or call start()"
            )
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def openai_client(self, *, async_client: bool = False, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` (or ``AsyncOpenAI``) client pointed at this server."""
        import openai

        cls = openai.AsyncOpenAI if async_client else openai.OpenAI
        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        return cls(base_url=self.openai_base_url, **kwargs)

    def anthropic_client(self, *, async_client: bool = False, **kwargs: Any) -> Any:
        """An ``anthropic.Anthropic`` (or ``AsyncAnthropic``) client pointed at this server."""
        import anthropic

        cls = anthropic.AsyncAnthropic if async_client else anthropic.Anthropic
        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        return cls(base_url=self.anthropic_base_url, **kwargs)

    # -- assertions ----------------------------------------------------------------------
    @property
    def requests(self) -> list[FakeRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._options.lock:
            return list(self._options.requests)

    def clear(self) -> None:
        with self._options.lock:
            self._options.requests.clear()


def _value(option: Any, request: FakeRequest) -> Any:
    return option(request) if callable(option) else option


class _Answer(NamedTuple):
    n: int
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class _Handler(BaseHTTPRequestHandler):
    options: _Options
    protocol_version = "HTTP/1.1"
    server_version = "llmguard-fake-llm/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_fake_{next(self.options.ids)}")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        if self.path.rstrip("/").endswith("/messages"):
            self._send(status, {"type": "error", "error": {"type": kind, "message": message}})
        else:
            self._send(
                status, {"error": {"message": message, "type": kind, "param": None, "code": None}}
            )

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._error(400, "request body is not JSON")
            return
        headers = {
            k.lower(): ("<redacted>" if k.lower() in _REDACTED_HEADERS else v)
            for k, v in self.headers.items()
        }
        path = self.path.split("?", 1)[0].rstrip("/")
        request = FakeRequest("POST", path, headers, body if isinstance(body, dict) else {})
        with self.options.lock:
            self.options.requests.append(request)
        delay = float(_value(self.options.latency, request))
        if delay > 0:
            time.sleep(delay)
        if not request.model:
            self._error(400, "model is required")
            return
        if body.get("stream"):
            self._error(400, "the fake server does not stream yet")
            return
        routes = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/messages": self._messages,
        }
        route = routes.get(path)
        if route is None:
            self._error(404, f"no such endpoint: {path}", "not_found_error")
            return
        route(request)

    def _answer(self, request: FakeRequest, messages: list[Any], tools: Any = None) -> _Answer:
        """The reply to ``request`` and its usage, counted as the provider would."""
        model = request.model or ""
        prompt = int(count_message_tokens(messages, model, tools=tools))
        text = self.options.reply(request)
        cached = max(0, min(int(_value(self.options.cached_tokens, request)), prompt))
        return _Answer(
            next(self.options.ids), model, text, prompt, int(count_tokens(text, model)), cached
        )

    def _chat(self, request: FakeRequest) -> None:
        body = request.body
        n, model, text, prompt, completion, cached = self._answer(
            request, list(body.get("messages") or []), body.get("tools")
        )
        self._send(
            200,
            {
                "id": f"chatcmpl-fake{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
                },
                "system_fingerprint": "fp_fake",
            },
        )

    def _responses(self, request: FakeRequest) -> None:
        body = request.body
        items = body.get("input")
        messages = (
            [{"role": "user", "content": items}] if isinstance(items, str) else list(items or [])
        )
        if body.get("instructions"):
            messages.insert(0, {"role": "system", "content": body["instructions"]})
        n, model, text, prompt, completion, cached = self._answer(request, messages)
        self._send(
            200,
            {
                "id": f"resp_fake{n}",
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "model": model,
                "output": [
                    {
                        "type": "message",
                        "id": f"msg_fake{n}",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}],
                    }
                ],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": prompt,
                    "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": completion,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt + completion,
                },
            },
        )

    def _messages(self, request: FakeRequest) -> None:
        body = request.body
        if not isinstance(body.get("max_tokens"), int):
            self._error(400, "max_tokens: Field required")
            return
        messages = list(body.get("messages") or [])
        if body.get("system"):
            messages.insert(0, {"role": "system", "content": _text(body["system"])})
        n, model, text, prompt, completion, cached = self._answer(request, messages)
        self._send(
            200,
            {
                "id": f"msg_fake{n}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": prompt - cached,
                    "output_tokens": completion,
                    "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0,
                },
            },
        )

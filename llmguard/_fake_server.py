"""A fake LLM provider on loopback, good enough for the official ``openai`` and ``anthropic``
SDKs: deterministic replies, ``usage`` counted with llmguard's own token counter, the
requested model echoed, a request log, injectable latency and prompt-cache hits."""

from __future__ import annotations

import bisect
import json
import math
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from typing import Any, NamedTuple

from ._errors import require
from ._tokens import count_message_tokens, count_tokens

_REDACTED_HEADERS = {"authorization", "x-api-key", "api-key", "openai-organization"}


@dataclass(frozen=True)
class FakeRequest:
    """One request the fake server received (API keys redacted from ``headers``)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = 0.0
    """When it arrived (``time.time()``)."""

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


class _Window:
    """The provider's own limits: a moving window of (time, tokens) per admitted request."""

    def __init__(self, requests: int | None, tokens: int | None, window: float) -> None:
        self.requests, self.tokens, self.window = requests, tokens, window
        self.log: list[tuple[float, int]] = []  # sorted by time

    def admit(self, tokens: int, now: float) -> tuple[str | None, float, dict[str, float]]:
        """(refused kind or None, seconds until it would pass, remaining/reset numbers)."""
        del self.log[: bisect.bisect_right(self.log, (now - self.window, float("inf")))]
        used = sum(t for _, t in self.log)
        refused, wait = None, 0.0
        if self.requests is not None and len(self.log) + 1 > self.requests:
            refused = "requests"
            wait = self.log[len(self.log) - self.requests][0] + self.window - now
        elif self.tokens is not None and used + tokens > self.tokens:
            refused, freed = "tokens", 0
            wait = self.window
            for at, spent in self.log:
                freed += spent
                if used - freed + tokens <= self.tokens:
                    wait = at + self.window - now
                    break
        if refused is None:  # requests are stamped on arrival, admitted a little later
            bisect.insort(self.log, (now, tokens))
            used += tokens
        oldest = self.log[0][0] + self.window - now if self.log else 0.0
        numbers = {
            "remaining_requests": float(max((self.requests or 0) - len(self.log), 0)),
            "remaining_tokens": float(max((self.tokens or 0) - used, 0)),
            "reset": max(oldest, 0.0),
        }
        return refused, max(wait, 0.001), numbers


@dataclass
class _Fault:
    kind: str  # "status" | "drop" | "slow"
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0


@dataclass
class _Options:
    reply: Callable[[FakeRequest], str]
    latency: float | Callable[[FakeRequest], float]
    cached_tokens: int | Callable[[FakeRequest], int]
    limits: _Window
    quota_exhausted: bool = False
    chunk_delay: float = 0.0
    requests: list[FakeRequest] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    faults: deque[_Fault] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Any = field(default_factory=lambda: count(1))


class _Refused(Exception):
    """The request was answered with an error already."""


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

    Limits and faults, as real providers have them: ``requests_per_window`` and
    ``tokens_per_window`` are counts admitted per moving ``window`` of seconds (60 by
    default, so they are RPM and TPM; shorter in tests), refused with OpenAI-style 429s
    (``retry-after``, ``retry-after-ms``, ``x-ratelimit-*`` headers, ``code:
    rate_limit_exceeded``) or Anthropic-style ones (``anthropic-ratelimit-*``) on
    ``/v1/messages``; a request's tokens are its prompt plus ``max_tokens`` (or the reply).
    ``quota_exhausted=True`` answers every request as an account out of money does: OpenAI's
    ``insufficient_quota`` 429, Anthropic's "credit balance is too low" 400.
    ``stream=True`` requests are answered with server-sent events in the provider's format
    (the Responses API's numbered events with the usage in ``response.completed``; chat
    chunks, with ``"usage": null`` in each and a final usage chunk with ``choices:
    []`` when ``stream_options={"include_usage": True}``; Anthropic's message events and
    ``ping``, the input tokens in ``message_start`` and the cumulative totals in
    ``message_delta``), one word per chunk, ``chunk_delay`` seconds apart.
    :meth:`fail_next`, :meth:`drop_next` and :meth:`slow_next` inject faults;
    :attr:`statuses` lists every status code answered.

    Each connection is served by its own thread and the listen backlog holds 1024 pending
    connections, so hundreds of simultaneous clients are all answered; :meth:`stop` also
    closes the connections clients keep alive.
    """

    def __init__(
        self,
        *,
        reply: Callable[[FakeRequest], str] = default_reply,
        latency: float | Callable[[FakeRequest], float] = 0.0,
        cached_tokens: int | Callable[[FakeRequest], int] = 0,
        requests_per_window: int | None = None,
        tokens_per_window: int | None = None,
        window: float = 60.0,
        quota_exhausted: bool = False,
        chunk_delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._options = _Options(
            reply=reply,
            latency=latency,
            cached_tokens=cached_tokens,
            limits=_Window(requests_per_window, tokens_per_window, window),
            quota_exhausted=quota_exhausted,
            chunk_delay=chunk_delay,
        )
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> FakeLLMServer:
        if self._server is not None:
            return self
        handler = type("Handler", (_Handler,), {"options": self._options})
        server = _Server((self._host, self._port), handler)
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
        """Stop accepting, close every open connection (kept-alive ones too), free the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
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
        openai = require("openai", extra="openai", what="FakeLLMServer.openai_client()")
        cls = openai.AsyncOpenAI if async_client else openai.OpenAI
        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        return cls(base_url=self.openai_base_url, **kwargs)

    def anthropic_client(self, *, async_client: bool = False, **kwargs: Any) -> Any:
        """An ``anthropic.Anthropic`` (or ``AsyncAnthropic``) client pointed at this server."""
        anthropic = require("anthropic", extra="anthropic", what="FakeLLMServer.anthropic_client()")
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

    @property
    def statuses(self) -> list[int]:
        """The status code of every answer so far (0 for a dropped connection)."""
        with self._options.lock:
            return list(self._options.statuses)

    def clear(self) -> None:
        with self._options.lock:
            self._options.requests.clear()
            self._options.statuses.clear()

    @property
    def quota_exhausted(self) -> bool:
        return self._options.quota_exhausted

    @quota_exhausted.setter
    def quota_exhausted(self, value: bool) -> None:
        self._options.quota_exhausted = value

    # -- faults ----------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 500, *, retry_after: float | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (429 and 529 in the provider's own
        format), with a ``retry-after`` header when given."""
        with self._options.lock:
            self._options.faults.extend(_Fault("status", status, retry_after) for _ in range(n))

    def drop_next(self, n: int = 1) -> None:
        """Close the connection of the next ``n`` requests without answering."""
        with self._options.lock:
            self._options.faults.extend(_Fault("drop") for _ in range(n))

    def slow_next(self, n: int = 1, seconds: float = 1.0) -> None:
        """Delay the next ``n`` answers by ``seconds`` (to trigger client timeouts)."""
        with self._options.lock:
            self._options.faults.extend(_Fault("slow", seconds=seconds) for _ in range(n))


def _pieces(text: str) -> list[str]:
    """The reply as streamed deltas: word by word, joining back to exactly ``text``."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 1)}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes:
        return f"{int(minutes)}m{rest:.0f}s"
    return f"{rest:.3f}".rstrip("0").rstrip(".") + "s"


def _value(option: Any, request: FakeRequest) -> Any:
    return option(request) if callable(option) else option


class _Answer(NamedTuple):
    n: int
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class _Server(ThreadingHTTPServer):
    """One daemon thread per connection; the open connections are known, to close them."""

    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of connections beyond what the
    # accept loop takes in at once was refused or reset (53 of 100 simultaneous requests)
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every open connection: its handler reads EOF and its thread returns."""
        with self._open_lock:
            open_now = list(self._open)
        for connection in open_now:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up (a timeout test): nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    options: _Options
    _limit_headers: dict[str, str]  # these two are set per request
    _request_id: str
    protocol_version = "HTTP/1.1"
    server_version = "llmguard-fake-llm/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in {**self._common_headers(), **(headers or {})}.items():
            self.send_header(name, value)
        with self.options.lock:  # logged before the client can read it
            self.options.statuses.append(status)
        self.end_headers()
        self.wfile.write(data)

    @property
    def _anthropic(self) -> bool:
        return self.path.rstrip("/").endswith("/messages")

    def _common_headers(self) -> dict[str, str]:
        """The request id (``request-id`` at Anthropic, ``x-request-id`` at OpenAI, as each
        SDK reads it) and the rate-limit headers."""
        name = "request-id" if self._anthropic else "x-request-id"
        return {name: self._request_id, **self._limit_headers}

    def _error(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if self._anthropic:
            payload: dict[str, Any] = {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": self._request_id,
            }
        else:
            payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        self._send(status, payload, headers)

    def _stream(self, events: list[tuple[str | None, Any]]) -> None:
        """Answer with server-sent events, one HTTP chunk each, paced by ``chunk_delay``."""
        with self.options.lock:
            self.options.statuses.append(200)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for header, value in self._common_headers().items():
            self.send_header(header, value)
        self.end_headers()
        for number, (name, data) in enumerate(events):
            if number and self.options.chunk_delay:
                time.sleep(self.options.chunk_delay)
            payload = data if isinstance(data, str) else json.dumps(data)
            text = (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"
            raw = text.encode()
            self.wfile.write(f"{len(raw):X}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _fault(self, fault: _Fault) -> None:
        headers = {}
        if fault.retry_after is not None:
            headers["retry-after"] = f"{fault.retry_after:g}"
            if not self._anthropic:  # Anthropic sends whole seconds only
                headers["retry-after-ms"] = str(int(fault.retry_after * 1000))
        if fault.status == 429:
            kind = "rate_limit_error" if self._anthropic else "requests"
            self._error(429, "Rate limit reached (injected)", kind, "rate_limit_exceeded", headers)
        elif fault.status == 529:
            self._error(529, "Overloaded", "overloaded_error", None, headers)
        else:
            kind = "api_error" if self._anthropic else "server_error"
            self._error(fault.status, f"Injected failure {fault.status}", kind, None, headers)

    def _admit(self, request: FakeRequest, tokens: int) -> None:
        """Enforce RPM/TPM; raises _Refused after answering 429."""
        window = self.options.limits
        if window.requests is None and window.tokens is None:
            return
        with self.options.lock:
            refused, wait, numbers = window.admit(tokens, request.at)  # at arrival, as providers do
        reset = _duration(numbers["reset"])
        if self._anthropic:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + numbers["reset"]))
            self._limit_headers = {
                "anthropic-ratelimit-requests-limit": str(window.requests or 0),
                "anthropic-ratelimit-requests-remaining": str(int(numbers["remaining_requests"])),
                "anthropic-ratelimit-requests-reset": at,
                "anthropic-ratelimit-tokens-limit": str(window.tokens or 0),
                "anthropic-ratelimit-tokens-remaining": str(int(numbers["remaining_tokens"])),
                "anthropic-ratelimit-tokens-reset": at,
            }
        else:
            self._limit_headers = {
                "x-ratelimit-limit-requests": str(window.requests or 0),
                "x-ratelimit-remaining-requests": str(int(numbers["remaining_requests"])),
                "x-ratelimit-reset-requests": reset,
                "x-ratelimit-limit-tokens": str(window.tokens or 0),
                "x-ratelimit-remaining-tokens": str(int(numbers["remaining_tokens"])),
                "x-ratelimit-reset-tokens": reset,
            }
        if refused is None:
            return
        headers = {"retry-after": str(max(1, math.ceil(wait)))}
        if not self._anthropic:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        limit = window.requests if refused == "requests" else window.tokens
        message = (
            f"Rate limit reached for {request.model} on {refused} per {window.window:g}s: "
            f"Limit {limit}. Please try again in {_duration(wait)}."
        )
        kind = "rate_limit_error" if self._anthropic else refused
        self._error(429, message, kind, "rate_limit_exceeded", headers)
        raise _Refused

    def do_POST(self) -> None:
        self._limit_headers = {}  # one handler serves a whole keep-alive connection
        self._request_id = f"req_fake_{next(self.options.ids)}"
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
        request = FakeRequest(
            "POST", path, headers, body if isinstance(body, dict) else {}, time.time()
        )
        with self.options.lock:
            self.options.requests.append(request)
        delay = float(_value(self.options.latency, request))
        if delay > 0:
            time.sleep(delay)
        if not request.model:
            self._error(400, "model is required")
            return
        with self.options.lock:
            fault = self.options.faults.popleft() if self.options.faults else None
        if fault is not None and fault.kind == "drop":
            with self.options.lock:
                self.options.statuses.append(0)
            self.close_connection = True
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        elif fault is not None:
            self._fault(fault)
            return
        if self.options.quota_exhausted and self._anthropic:
            self._error(
                400,
                "Your credit balance is too low to access the Anthropic API. Please go to "
                "Plans & Billing to upgrade or purchase credits.",
            )
            return
        if self.options.quota_exhausted:
            self._error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            )
            return
        routes = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/messages": self._messages,
        }
        route = routes.get(path)
        if route is None:
            self._error(404, f"Invalid URL (POST {path})")
            return
        try:
            route(request)
        except _Refused:
            pass

    def _answer(self, request: FakeRequest, messages: list[Any], tools: Any = None) -> _Answer:
        """The reply to ``request`` and its usage, counted as the provider would."""
        model = request.model or ""
        prompt = int(count_message_tokens(messages, model, tools=tools))
        text = self.options.reply(request)
        completion = int(count_tokens(text, model))
        body = request.body
        budget = (
            body.get("max_tokens")
            or body.get("max_completion_tokens")
            or body.get("max_output_tokens")
        )
        self._admit(request, prompt + (budget if isinstance(budget, int) else completion))
        cached = max(0, min(int(_value(self.options.cached_tokens, request)), prompt))
        return _Answer(next(self.options.ids), model, text, prompt, completion, cached)

    def _chat(self, request: FakeRequest) -> None:
        body = request.body
        n, model, text, prompt, completion, cached = self._answer(
            request, list(body.get("messages") or []), body.get("tools")
        )
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        if body.get("stream"):
            base: dict[str, Any] = {
                "id": f"chatcmpl-fake{n}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if include_usage:  # then every chunk has "usage": null but the last one
                base["usage"] = None
            deltas = [{"role": "assistant", "content": "", "refusal": None}] + [
                {"content": piece} for piece in _pieces(text)
            ]
            events: list[tuple[str | None, Any]] = [
                (
                    None,
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
                        ],
                    },
                )
                for delta in deltas
            ]
            events.append(
                (
                    None,
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
                        ],
                    },
                )
            )
            if include_usage:
                events.append((None, {**base, "choices": [], "usage": usage}))
            events.append((None, "[DONE]"))
            self._stream(events)
            return
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
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage,
                "service_tier": "default",
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
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = {
            "id": f"msg_fake{n}",
            "type": "message",
            "status": "completed",
            "content": [part],
            "role": "assistant",
        }
        response = {
            "id": f"resp_fake{n}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        }
        if not body.get("stream"):
            self._send(200, response)
            return
        # The Responses API's events: the response in progress, the message item and its
        # text part opened, the text deltas, everything closed, the usage in
        # response.completed; numbered, and no [DONE] at the end.
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": started}),
            ("response.in_progress", {"response": started}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
        ]
        events += [
            ("response.output_text.delta", {**where, "delta": piece, "logprobs": []})
            for piece in _pieces(text)
        ]
        events += [
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": response}),
        ]
        self._stream(
            [
                (name, {"type": name, "sequence_number": number, **data})
                for number, (name, data) in enumerate(events)
            ]
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
        counts = {  # input_tokens is the uncached part only
            "input_tokens": prompt - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }
        usage = {
            **counts,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": completion,
            "service_tier": "standard",
        }
        if body.get("stream"):
            message: dict[str, Any] = {
                "id": f"msg_fake{n}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {**usage, "output_tokens": 1},  # the input, and the first token
            }
            events: list[tuple[str | None, Any]] = [
                ("message_start", {"type": "message_start", "message": message}),
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                ("ping", {"type": "ping"}),
            ]
            events += [
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
                for piece in _pieces(text)
            ]
            events += [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        # cumulative totals, the input's too (not increments)
                        "usage": {**counts, "output_tokens": completion},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
            self._stream(events)
            return
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
                "usage": usage,
            },
        )

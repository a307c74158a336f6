"""README's Python examples run as written, against the fake provider.

Every ```python block of README.md is a test: executed as it stands, in a fresh namespace,
with the real ``openai`` and ``anthropic`` SDKs pointed at :class:`FakeLLMServer` through
their usual environment variables (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``), and the
other variables a reader's environment would hold (``SLACK_WEBHOOK_URL``) set to a loopback
address. What is changed in a block is only where it would reach outside this test: the Redis
URI it shows (``redis://localhost:6379/0``) is the test Redis, under this test's key prefix,
so no data of anyone's is touched; the Prometheus server it starts listens on a free loopback
port rather than port 9464 (and is asked for ``/metrics``). A block
defining ``test_*`` functions (README's testing section) has them run too, with the pytest
fixtures they name (``fake_llm`` is llmguard's pytest plugin's). What a block leaves set for
the whole process (subscribers, OpenTelemetry and Prometheus instrumentation, OpenTelemetry's
global providers, logging levels) is undone after it. Tracebacks name README's own lines.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard.testing import FakeLLMServer

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
README_REDIS = "redis://localhost:6379/0"
README_METRICS_SERVER = 'start_http_server(9464, addr="127.0.0.1"'


def _blocks() -> list[Any]:
    text = README.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # the block's first line of code
        found.append(pytest.param(line, match.group(1), id=f"README.md:{line}"))
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.openai_base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-test")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.anthropic_base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-readme-test")
        monkeypatch.setenv("SLACK_WEBHOOK_URL", "http://127.0.0.1:9/services/readme-test")
        yield fake


@pytest.fixture
def process_state() -> Iterator[dict[str, Any]]:
    """Undo what a block sets for the whole process (a script's exit would): yields the
    namespace the block runs in, whose subscribed callbacks are unsubscribed afterwards."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("", "llmguard")}
    otel = _otel_providers()
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    yield namespace
    for name in ("llmguard.otel", "llmguard.prometheus"):
        module = sys.modules.get(name)
        if module is not None:
            module.uninstrument()
    for value in namespace.values():
        if callable(value):
            llmguard.unsubscribe(value)
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    _restore_otel_providers(otel)


# OpenTelemetry's global providers: (module, provider, its set-once flag, the proxy handed
# out while none is set), each set once per process.
_OTEL_GLOBALS = (
    ("opentelemetry.trace", "_TRACER_PROVIDER", "_TRACER_PROVIDER_SET_ONCE", "ProxyTracerProvider"),
    (
        "opentelemetry.metrics._internal",
        "_METER_PROVIDER",
        "_METER_PROVIDER_SET_ONCE",
        "_ProxyMeterProvider",
    ),
)


def _otel_providers() -> dict[str, Any]:
    return {
        name: getattr(sys.modules[name], provider)
        for name, provider, _, _ in _OTEL_GLOBALS
        if name in sys.modules
    }


def _restore_otel_providers(before: dict[str, Any]) -> None:
    """Shut down a global provider the block set, and unset it as OpenTelemetry's own test
    helpers do (``opentelemetry.test.globals_test``): a fresh set-once flag and proxy."""
    for name, provider, once, proxy in _OTEL_GLOBALS:
        module = sys.modules.get(name)
        if module is None or getattr(module, provider) is before.get(name):
            continue
        getattr(module, provider).shutdown()  # as at exit: nothing was recorded, nothing sent
        from opentelemetry.util._once import Once

        setattr(module, provider, None)
        setattr(module, once, Once())
        setattr(module, f"_PROXY{provider}", getattr(module, proxy)())


def test_readme_has_examples() -> None:
    assert len(_blocks()) >= 10


@pytest.mark.usefixtures("provider")
@pytest.mark.parametrize(("line", "code"), _blocks())
def test_readme_example_runs(
    line: int, code: str, process_state: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    if README_REDIS in code:
        code = code.replace(README_REDIS, request.getfixturevalue("redis_uri"))
    metrics_port = None
    if "start_http_server(" in code:
        assert README_METRICS_SERVER in code, "the test expects README's metrics server line"
        metrics_port = _free_port()
        code = code.replace(
            README_METRICS_SERVER, f'start_http_server({metrics_port}, addr="127.0.0.1"'
        )
    namespace = process_state
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    if metrics_port is not None:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(url, timeout=10) as response:
            assert b"llmguard_calls_total" in response.read()
    for name, value in list(namespace.items()):
        if name.startswith("test_") and inspect.isfunction(value):
            wanted = inspect.signature(value).parameters
            result = value(**{name: request.getfixturevalue(name) for name in wanted})
            if inspect.iscoroutine(result):
                asyncio.run(result)

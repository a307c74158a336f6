from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

import llmguard
from llmguard import _events
from llmguard.testing import capture_calls

from ._helpers import run_python


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    _events._logger = None


def test_library_never_configures_structlog() -> None:
    code = (
        "import structlog, llmguard\n"
        "@llmguard.track(model='gpt-4o')\n"
        "def f(text): return 'ok'\n"
        "f('hello')\n"
        "assert not structlog.is_configured()\n"
    )
    run_python("-c", code)


def test_configure_logging_json_to_stream(restore_structlog: None) -> None:
    stream = io.StringIO()
    llmguard.configure_logging(json=True, file=stream)

    @llmguard.track(model="gpt-4o")
    def f(text: str) -> str:
        return "ok"

    f("hello")
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "llm_call"
    assert event["level"] == "info"
    assert event["model"] == "gpt-4o"
    assert "timestamp" in event


def test_configure_logging_to_file_and_level(tmp_path: Path, restore_structlog: None) -> None:
    path = tmp_path / "llmguard.jsonl"
    llmguard.configure_logging(file=str(path), level="WARNING")

    @llmguard.track(model="gpt-4o")
    def f(fail: bool) -> str:
        if fail:
            raise ValueError
        return "ok"

    f(False)
    with pytest.raises(ValueError):
        f(True)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e["outcome"]) for e in lines] == [("llm_call", "error")]


def test_configure_logging_console_format(restore_structlog: None) -> None:
    stream = io.StringIO()
    llmguard.configure_logging(json=False, file=stream)
    llmguard.track(model="gpt-4o")(lambda: "ok")()
    assert "llm_call" in stream.getvalue()
    assert "cost_usd=" in stream.getvalue()


def test_bad_level_is_a_configuration_error() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="DEBUG"):
        llmguard.configure_logging(level="LOUD")


def test_capture_calls_whatever_the_structlog_config(restore_structlog: None) -> None:
    # An application that caches its loggers and drops everything below ERROR.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40),
        logger_factory=structlog.WriteLoggerFactory(io.StringIO()),
        cache_logger_on_first_use=True,
    )
    fn = llmguard.track(model="gpt-4o")(lambda text: "ok")
    fn("warm up the cached logger")
    with capture_calls() as events:
        fn("hello")
    with capture_calls() as later:
        pass
    assert len(events.calls) == 1
    assert events.calls[0]["model"] == "gpt-4o"
    assert later == []


def test_json_lines_timestamp_and_level_aliases() -> None:
    import re

    render = _events._JSONLines()
    first = json.loads(render(None, "warn", {"event": "x"}))
    second = json.loads(render(None, "exception", {"event": "y", "n": 1}))
    assert (first["level"], second["level"]) == ("warning", "error")
    pattern = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"
    assert re.match(pattern, first["timestamp"])
    assert first["timestamp"] <= second["timestamp"]

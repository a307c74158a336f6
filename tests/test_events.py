from __future__ import annotations

import io
import json
import subprocess
import sys
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


def _tracked() -> object:
    @llmguard.track(model="gpt-4o")
    def summarize(text: str) -> str:
        return "ok"

    return summarize


def test_unconfigured_events_go_to_stderr_never_stdout(
    capsys: pytest.CaptureFixture[str], restore_structlog: None
) -> None:
    structlog.reset_defaults()
    _events._logger = None
    assert not structlog.is_configured()
    _tracked()("hello")  # type: ignore[operator]
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert "llm_call" in line
    assert "model=gpt-4o" in line
    assert "cost_usd=$0.0000125" in line  # money as money, not 1.25e-05
    assert not structlog.is_configured()  # and the library still configured nothing


def test_a_script_redirecting_stdout_keeps_only_its_own_output(tmp_path: Path) -> None:
    # `python app.py > out.json`, with logging.basicConfig (which does not touch structlog).
    code = (
        "import json, logging, llmguard\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "@llmguard.track(model='gpt-4o')\n"
        "def f(text): return 'ok'\n"
        "print(json.dumps({'answer': f('hello')}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == {"answer": "ok"}
    assert "llm_call" in result.stderr


def test_structlog_configured_after_the_first_event_is_honoured(
    capsys: pytest.CaptureFixture[str], restore_structlog: None
) -> None:
    structlog.reset_defaults()
    _events._logger = None
    f = _tracked()
    f("before the application configured logging")  # type: ignore[operator]
    assert "llm_call" in capsys.readouterr().err
    stream = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(stream),
    )
    f("after")  # type: ignore[operator]
    f("again")  # type: ignore[operator]
    assert capsys.readouterr() == ("", "")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "llm_call",
        "llm_call",
    ]


def _readme_recipe() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    after = readme.split("<!-- recipe: structlog to logging", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_recipe_sends_events_to_the_llmguard_logging_logger(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_structlog: None,
) -> None:
    import logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    # The application's handlers are ours; basicConfig would add one to the root logger.
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)
    logger = logging.getLogger("llmguard")
    handler = Collect()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logger.level)  # the recipe sets it: restore it
    try:
        exec(compile(_readme_recipe(), "README.md recipe", "exec"), {})
        _tracked()("hello")  # type: ignore[operator]
        logger.setLevel(logging.WARNING)  # logging's level decides, as in the application
        _tracked()("dropped")  # type: ignore[operator]
    finally:
        logger.removeHandler(handler)
    [record] = handler.records
    assert (record.name, record.levelno) == ("llmguard", logging.INFO)
    event = json.loads(record.getMessage())
    assert (event["event"], event["model"], event["level"]) == ("llm_call", "gpt-4o", "info")
    assert capsys.readouterr().out == ""


def test_processor_formatter_recipe_renders_in_the_handler(restore_structlog: None) -> None:
    import logging

    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer())
    )
    logger = logging.getLogger("llmguard")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        _tracked()("hello")  # type: ignore[operator]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["event"] == "llm_call"

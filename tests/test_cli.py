from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmguard._cli import main

from ._helpers import run_python


def test_prices_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "gpt-4o", "claude-3-5-haiku-latest"]) == 0
    out = capsys.readouterr().out
    assert "USD per million tokens" in out
    assert "gpt-4o" in out
    assert "2.5" in out


def test_prices_json_and_unknown_model_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "gpt-4o-mini", "nonexistent-model", "--format", "json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data == [
        {
            "model": "gpt-4o-mini",
            "input_per_mtok": "0.15",
            "cached_input_per_mtok": "0.075",
            "cache_write_per_mtok": None,
            "output_per_mtok": "0.6",
            "source": "genai-prices",
        }
    ]
    assert "nonexistent-model" in captured.err


def test_estimate_cheapest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("tiktoken is great!")
    args = [
        "estimate",
        str(prompt),
        "--model",
        "gpt-4o",
        "--model",
        "gpt-4o-mini",
        "--model",
        "nope-model",
    ]
    assert main([*args, "--output-tokens", "100", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["gpt-4o-mini", "gpt-4o", "nope-model"]
    assert rows[1] == {
        "model": "gpt-4o",
        "input_tokens": 6,
        "estimate": False,
        "output_tokens": 100,
        "input_usd": "0.000015",
        "output_usd": "0.001",
        "total_usd": "0.001015",
    }
    assert rows[2]["total_usd"] is None
    assert main(["estimate", str(prompt)]) == 0
    assert "cheapest first" in capsys.readouterr().out
    assert main(["estimate", str(tmp_path / "missing.txt")]) == 1


def test_console_script_help_and_no_command() -> None:
    result = run_python("-m", "llmguard._cli", check=False)
    assert result.returncode == 2
    assert "prices" in result.stdout
    result = run_python(
        *("-m", "llmguard._cli", "estimate", "-", "--model", "gpt-4o", "--format", "json"),
        input="hello world",
    )
    assert json.loads(result.stdout)[0]["input_tokens"] == 2


def test_demo_without_openai_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # as if the extra were not installed
    assert main(["demo", "--fast", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        'llmguard: llmguard demo needs the openai package: pip install "llmguard[openai]"'
    ]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_demo_without_openai_exits_2_without_a_traceback(tmp_path: Path) -> None:
    wrapper = (
        "import sys; sys.modules['openai'] = None; from llmguard._cli import main; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        'llmguard: llmguard demo needs the openai package: pip install "llmguard[openai]"'
    )
    assert result.stdout == ""


@pytest.mark.parametrize(
    "command",
    [
        ["cache", "stats"],
        ["cache", "clear"],
        ["budget", "status"],
        ["budget", "reset", "some-budget"],
    ],
)
def test_redis_storage_without_redis_says_what_to_install(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    assert main([*command, "--storage", "redis://127.0.0.1:6379/6"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line == (
        "llmguard: storage 'redis://127.0.0.1:6379/6' needs the redis package: "
        'pip install "llmguard[redis]"'
    )


def test_demo_progress_counts_down_on_a_terminal() -> None:
    import io

    from llmguard._demo import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = _Progress(screen, live=screen.isatty())
    progress.note = " (3/20 answered)"
    progress.sleeper("the rate window")(0.3)
    text = screen.getvalue()
    assert re.match(r"\r   \.\.\.  0\.[0-3]s waiting for the rate window \(3/20 answered\)", text)
    assert text.count("\r") >= 3  # updated in place while waiting
    assert text.endswith("\r")  # and the line is blanked once the wait is over
    assert "\n" not in text
    quiet = Terminal()
    _Progress(quiet, live=True).wait("a blink", 0.01)
    assert quiet.getvalue() == ""  # waits too short to notice are not shown

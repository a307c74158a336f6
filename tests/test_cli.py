from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmguard._cli import main


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


def test_tokens_from_file_and_stdin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("tiktoken is great!")
    assert (
        main(
            [
                "tokens",
                str(prompt),
                "--model",
                "gpt-4o",
                "--model",
                "claude-3-5-haiku-latest",
                "--format",
                "json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["tokens"], r["estimate"]) for r in rows] == [
        ("gpt-4o", 6, False),
        ("claude-3-5-haiku-latest", 6, True),
    ]
    assert rows[0]["input_cost_usd"] == "0.000015"
    assert main(["tokens", str(tmp_path / "missing.txt")]) == 1


def test_console_script_help_and_no_command() -> None:
    result = subprocess.run([sys.executable, "-m", "llmguard._cli"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "prices" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "llmguard._cli", "tokens", "-", "--format", "json"],
        input="hello world",
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)[0]["tokens"] == 2

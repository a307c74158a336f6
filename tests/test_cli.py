from __future__ import annotations

import json
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

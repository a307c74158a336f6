from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_offline_and_prints_cost_events() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["llm_call"] * 4
    assert [e["model"] for e in events] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]
    assert [e["cost_source"] for e in events] == ["usage", "cache", "usage", "estimate"]
    assert [e.get("cache") for e in events] == ["miss", "hit", "miss", None]
    assert events[1]["cost_usd"] == 0
    assert events[1]["saved_usd"] == events[0]["cost_usd"] > 0
    assert "Fake reply about: Summarize: Generate summary" in result.stderr

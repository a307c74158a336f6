from __future__ import annotations

import json
from pathlib import Path

import pytest

from ._helpers import run_python

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow  # each runs an example program end to end


def test_quickstart_runs_offline_and_prints_cost_events() -> None:
    result = run_python(str(EXAMPLES / "quickstart.py"), timeout=120)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["llm_call"] * 4
    assert [e["model"] for e in events] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]
    assert [e["cost_source"] for e in events] == ["usage", "cache", "usage", "estimate"]
    assert [e.get("cache") for e in events] == ["miss", "hit", "miss", None]
    assert events[1]["cost_usd"] == 0
    assert events[1]["saved_usd"] == events[0]["cost_usd"] > 0
    assert "Fake reply about: Summarize: Generate summary" in result.stderr


def _run(name: str, **env: str) -> str:
    result = run_python(str(EXAMPLES / name), env=env)
    return result.stdout + result.stderr


def test_get_summary_example(tmp_path: Path) -> None:
    out = _run("get_summary.py", LLMGUARD_CACHE_DIR=str(tmp_path))
    assert "miss  gpt-4o-mini" in out
    assert " hit  gpt-4o-mini  $0.00000000" in out


def test_fastapi_example_refuses_past_the_users_budget(tmp_path: Path) -> None:
    out = _run("fastapi_budgets.py", LLMGUARD_CACHE_DIR=str(tmp_path))
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith(("alice", "bob"))]
    assert statuses[0] == "200"
    assert "429" in statuses[:-1]  # alice ran out of her daily budget
    assert statuses[-1] == "200"  # bob has his own
    assert "resets" in out


def test_async_batch_example(tmp_path: Path) -> None:
    out = _run("async_batch.py", LLMGUARD_CACHE_DIR=str(tmp_path))
    assert "40 summaries" in out


def test_worker_pool_example_shares_the_budget_through_redis(
    tmp_path: Path, redis_uri: str
) -> None:
    out = _run("worker_pool.py", LLMGUARD_CACHE_DIR=str(tmp_path), REDIS_URL=redis_uri)
    done, refused = (int(word) for word in out.split() if word.isdigit())
    assert done + refused == 24
    assert 0 < done < 24

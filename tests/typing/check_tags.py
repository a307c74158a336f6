"""Checked by mypy --strict (never run): tags, webhooks and burn alerts keep signatures."""

from __future__ import annotations

from datetime import datetime

from typing_extensions import assert_type

import llmguard
import llmguard.alerts


@llmguard.budget(
    usd=20,
    key=lambda tenant, **_: tenant,
    burn_alert="1h",
    on_alert=llmguard.alerts.webhook("https://hooks.example.com/T0/B0/x", timeout=2, retries=2),
    tags={"feature": "search"},
)
def search(tenant: str, query: str, *, model: str = "gpt-4o") -> str:
    return query


@llmguard.track(tags={"feature": "summary", "version": 2, "beta": True})
async def summarize(text: str) -> list[str]:
    return [text]


@llmguard.guard(retry=True, tags={"feature": "guarded"})
def guarded(text: str) -> int:
    return len(text)


def burn() -> llmguard.alerts.BurnAlert:
    return llmguard.alerts.BurnAlert(window="15m", rearm=0.8)


def notify(alert: llmguard.BudgetStatus) -> None:
    if isinstance(alert, llmguard.alerts.BudgetAlert) and alert.kind == "burn":
        assert_type(alert.exhausts_at, datetime | None)


with llmguard.tags(user="u42", feature="search") as tags:
    assert_type(search("acme", "q"), str)
    assert_type(guarded("x"), int)
search("acme", 3)  # type: ignore[arg-type]
llmguard.tags(user=["u42"])  # type: ignore[arg-type]
llmguard.track(tags=["feature"])  # type: ignore[call-overload]


async def use() -> None:
    assert_type(await summarize("t"), list[str])

"""What the monitoring exporters (``llmguard.otel``, ``llmguard.prometheus``) read from
llmguard's events, in one place: savings, refusals, extra label values, budget gauges and
the provider a model belongs to. Loaded only with an exporter."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from ._budget import budget_definition, budget_keys, budget_status, declared_budgets
from ._report import routing_saving

SERVED = ("cache", "debounced")  # cost_source of a call no provider was paid for


def savings(fields: dict[str, Any]) -> list[tuple[str, float]]:
    """What a call saved, by what: ``cache`` (a cache hit's ``saved_usd``), ``debounce`` (a
    caller served by a burst's one execution), ``routing`` (what the default model would
    have cost, minus what the routed call cost), as ``llmguard report`` counts them."""
    found: list[tuple[str, float]] = []
    saved = fields.get("saved_usd")
    if isinstance(saved, (int, float)) and not isinstance(saved, bool) and saved > 0:
        if fields.get("cache") in ("hit", "stale"):
            found.append(("cache", float(saved)))
        elif fields.get("cost_source") == "debounced":
            found.append(("debounce", float(saved)))
    if fields.get("route_default"):
        routed = routing_saving(fields)
        if routed > 0:
            found.append(("routing", float(routed)))
    return found


def refused(fields: dict[str, Any]) -> bool:
    """Whether a budget refused this call: it raised BudgetExceeded itself (not a nested
    call's, passing through), or ``on_exceed=`` answered it instead."""
    if fields.get("budget_exceeded") is True:
        return True
    return fields.get("error") == "BudgetExceeded" and not fields.get("children")


def field_text(event: dict[str, Any], name: str) -> str:
    """The value of field ``name`` as a label: the event's own field, else the one in its
    ``tags`` mapping; "" when it has none."""
    value = event.get(name)
    if value is None:
        tags = event.get("tags")
        if isinstance(tags, dict):
            value = tags.get(name)
    if value is None:
        return ""
    return (value if isinstance(value, str) else str(value))[:200]


class BudgetNames:
    """The budgets a gauge reports: those given, those declared in this process, and those
    seen in this process's events."""

    def __init__(self, given: Iterable[str]) -> None:
        self._names = set(given)
        self._lock = threading.Lock()

    def saw(self, fields: dict[str, Any]) -> None:
        name = fields.get("budget")
        if isinstance(name, str) and name not in self._names:
            with self._lock:
                self._names.add(name)

    def readings(self, keys: bool) -> list[tuple[str, str | None, float]]:
        """(budget, key, remaining USD) for each budget (and key, with ``keys``) now. A
        keyed budget is read per key only with ``keys`` (one series per user is a lot of
        series); a budget that cannot be read is left out."""
        with self._lock:
            names = sorted(self._names | set(declared_budgets()))
        found: list[tuple[str, str | None, float]] = []
        for name in names:
            try:
                if not budget_definition(name)[0].keyed:
                    found.append((name, None, float(budget_status(name).remaining_usd)))
                elif keys:
                    for key, status in budget_keys(name).items():
                        found.append((name, key, float(status.remaining_usd)))
            except Exception:  # its ledger cannot be read now: no reading this time
                continue
        return found


# gen_ai.provider.name's well-known values, by model name.
_PREFIXES = (
    ("gpt-", "openai"),
    ("chatgpt", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("text-embedding", "openai"),
    ("davinci", "openai"),
    ("babbage", "openai"),
    ("claude", "anthropic"),
    ("gemini", "gcp.gemini"),
    ("gemma", "gcp.gemini"),
    ("mistral", "mistral_ai"),
    ("mixtral", "mistral_ai"),
    ("codestral", "mistral_ai"),
    ("ministral", "mistral_ai"),
    ("magistral", "mistral_ai"),
    ("pixtral", "mistral_ai"),
    ("devstral", "mistral_ai"),
    ("command", "cohere"),
    ("deepseek", "deepseek"),
    ("grok", "x_ai"),
    ("sonar", "perplexity"),
)
_VENDORS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "gcp.gemini",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "mistral": "mistral_ai",
    "mistralai": "mistral_ai",
    "cohere": "cohere",
    "deepseek": "deepseek",
    "xai": "x_ai",
    "x-ai": "x_ai",
    "groq": "groq",
    "perplexity": "perplexity",
}
OTHER_PROVIDER = "_OTHER"


def provider_of(model: str | None) -> str:
    """The OpenTelemetry ``gen_ai.provider.name`` of ``model``: ``openai`` for ``gpt-4o``,
    ``anthropic`` for ``claude-...``, the vendor of ``vendor/model`` names; ``_OTHER``
    when the name does not tell."""
    if not model:
        return OTHER_PROVIDER
    name = model.lower()
    if "/" in name:
        vendor, _, rest = name.partition("/")
        if vendor in _VENDORS:
            return _VENDORS[vendor]
        name = rest.rsplit("/", 1)[-1]
    for prefix, provider in _PREFIXES:
        if name.startswith(prefix):
            return provider
    return OTHER_PROVIDER

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import pytest

from llmguard import Usage
from llmguard._usage import usage_from_response

CHAT = {
    "model": "gpt-4o-2024-08-06",
    "usage": {
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 600},
    },
}
RESPONSES = {
    "model": "gpt-4o",
    "usage": {
        "input_tokens": 1000,
        "output_tokens": 100,
        "input_tokens_details": {"cached_tokens": 600},
    },
}
ANTHROPIC = {
    "model": "claude-3-7-sonnet-20250219",
    "usage": {
        "input_tokens": 3,
        "cache_creation_input_tokens": 12304,
        "cache_read_input_tokens": 0,
        "output_tokens": 550,
    },
}


def _objects(value: Any) -> Any:
    if isinstance(value, dict):
        return NS(**{k: _objects(v) for k, v in value.items()})
    return value


@pytest.mark.parametrize("as_object", [False, True])
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (CHAT, Usage(1000, 100, 600, 0, "gpt-4o-2024-08-06")),
        (RESPONSES, Usage(1000, 100, 600, 0, "gpt-4o")),
        (ANTHROPIC, Usage(12307, 550, 0, 12304, "claude-3-7-sonnet-20250219")),
    ],
)
def test_shapes(response: dict[str, Any], expected: Usage, as_object: bool) -> None:
    assert usage_from_response(_objects(response) if as_object else response) == expected


def test_missing_details_and_none_values() -> None:
    chat = {
        "model": "m",
        "usage": {"prompt_tokens": 5, "completion_tokens": None, "prompt_tokens_details": None},
    }
    assert usage_from_response(chat) == Usage(5, 0, 0, 0, "m")
    anthropic = NS(
        model="claude", usage=NS(input_tokens=7, output_tokens=2, cache_read_input_tokens=None)
    )
    assert usage_from_response(anthropic) == Usage(7, 2, 0, 0, "claude")


@pytest.mark.parametrize(
    "value", [None, "text", 3, b"x", {"no": "usage"}, NS(usage=None), {"usage": {"x": 1}}]
)
def test_not_a_response(value: Any) -> None:
    assert usage_from_response(value) is None

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmguard
from llmguard import _tokens

# The OpenAI cookbook's "How to count tokens with tiktoken" examples.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-4", 129), ("gpt-3.5-turbo", 129)],
)
def test_cookbook_messages(model: str, expected: int) -> None:
    count = llmguard.count_message_tokens(COOKBOOK_MESSAGES, model)
    assert count == expected
    assert count.estimate is False


def test_cookbook_tools_gpt_4o() -> None:
    assert llmguard.count_message_tokens(WEATHER_MESSAGES, "gpt-4o", tools=WEATHER_TOOLS) == 101


def test_count_tokens_exact_for_openai_models() -> None:
    count = llmguard.count_tokens("tiktoken is great!", "gpt-4o")
    assert count == 6  # the cookbook's example: ["t", "ik", "token", " is", " great", "!"]
    assert (count.estimate, count.method) == (False, "tiktoken:o200k_base")
    assert llmguard.count_tokens("tiktoken is great!", "gpt-4").method == "tiktoken:cl100k_base"


def test_unknown_openai_style_model_uses_o200k() -> None:
    count = llmguard.count_tokens("tiktoken is great!", "gpt-99-turbo-preview")
    assert (int(count), count.method, count.estimate) == (6, "tiktoken:o200k_base", False)


@pytest.mark.parametrize(
    "model", ["claude-3-5-haiku-latest", "gemini-1.5-flash", "mistral-large", None]
)
def test_other_vendors_are_labelled_estimates(model: str | None) -> None:
    count = llmguard.count_tokens("tiktoken is great!", model)
    assert count.estimate is True
    assert count.method == "approx:o200k_base"
    assert count > 0


def test_provider_prefixed_model_names() -> None:
    assert (
        llmguard.count_tokens("tiktoken is great!", "openai/gpt-4").method == "tiktoken:cl100k_base"
    )


def test_message_content_parts_and_objects() -> None:
    plain = llmguard.count_message_tokens([{"role": "user", "content": "hello there"}], "gpt-4o")
    parts = llmguard.count_message_tokens(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello there"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                ],
            }
        ],
        "gpt-4o",
    )
    assert parts == plain

    class Message:
        def model_dump(self, exclude_none: bool = False) -> dict[str, Any]:
            return {"role": "user", "content": "hello there"}

    assert llmguard.count_message_tokens([Message()], "gpt-4o") == plain


def test_special_tokens_in_text_never_raise() -> None:
    assert llmguard.count_tokens("end <|endoftext|> here", "gpt-4o") > 3


def test_encoding_that_cannot_load_falls_back_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, events: Any
) -> None:
    import tiktoken

    def broken(name: str) -> Any:
        raise OSError("no network")

    _tokens.reset_tokenizers()
    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    try:
        first = llmguard.count_tokens("a" * 41, "gpt-4o")
        second = llmguard.count_message_tokens([{"role": "user", "content": "abcd"}], "gpt-4o-mini")
    finally:
        _tokens.reset_tokenizers()
    assert (int(first), first.estimate, first.method) == (11, True, "chars")
    assert second.estimate is True
    warnings = events.of("tokenizer_unavailable")
    assert len(warnings) == 1
    assert warnings[0]["encoding"] == "o200k_base"
    assert "no network" in warnings[0]["error"]
    assert warnings[0]["log_level"] == "warning"


def test_encodings_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    real = tiktoken.get_encoding
    loads: list[str] = []

    def counting(name: str) -> Any:
        loads.append(name)
        return real(name)

    _tokens.reset_tokenizers()
    monkeypatch.setattr(tiktoken, "get_encoding", counting)
    for _ in range(3):
        llmguard.count_tokens("x", "gpt-4o")
        llmguard.count_tokens("x", "gpt-4o-mini")
        llmguard.count_tokens("x", "claude-3-5-haiku-latest")
    assert loads == ["o200k_base"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_counts_agree_with_tiktoken_encode_ordinary(text: str) -> None:
    import tiktoken

    for model, encoding in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        assert llmguard.count_tokens(text, model) == len(
            tiktoken.get_encoding(encoding).encode_ordinary(text)
        )

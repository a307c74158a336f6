"""pytest plugin registered by llmguard's ``pytest11`` entry point: the ``fake_llm`` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._fake_server import FakeLLMServer


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """A running :class:`llmguard.testing.FakeLLMServer`, stopped after the test."""
    with FakeLLMServer() as server:
        yield server

"""llmguard's pytest plugin (the ``pytest11`` entry point ``llmguard``): the ``fake_llm`` fixture.

pytest loads this module in every run of every project that has llmguard installed, so it
imports nothing from llmguard: the fixture imports :mod:`llmguard.testing` when a test asks
for it. That keeps other projects' test runs free of llmguard, and lets coverage measure
llmguard's own import (the module sits outside the package because importing any
``llmguard.*`` module runs ``llmguard/__init__.py``). Disable it with ``-p no:llmguard``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from llmguard.testing import FakeLLMServer


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """A running :class:`llmguard.testing.FakeLLMServer`, stopped after the test."""
    from llmguard.testing import FakeLLMServer

    with FakeLLMServer() as server:
        yield server

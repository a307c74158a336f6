"""Test helpers for applications that use llmguard.

- :func:`capture_calls`: collect llmguard's events in a test.
- :class:`FakeLLMServer`: an OpenAI/Anthropic-compatible server on loopback.
- :func:`settle_dropped_streams`: wait until streams dropped unfinished have been settled
  (a background thread settles them after the garbage collector finds them).
- The pytest fixture ``fake_llm`` (a running :class:`FakeLLMServer`) is registered
  automatically when llmguard is installed.
"""

from ._fake_server import FakeLLMServer, FakeRequest, default_reply
from ._stream import settle_dropped_streams
from ._testing import CapturedEvents, capture_calls

__all__ = [
    "CapturedEvents",
    "FakeLLMServer",
    "FakeRequest",
    "capture_calls",
    "default_reply",
    "settle_dropped_streams",
]

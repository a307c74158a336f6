"""Test helpers for applications that use llmguard.

- :func:`capture_calls`: collect llmguard's events in a test.
- :class:`FakeLLMServer`: an OpenAI/Anthropic-compatible server on loopback.
- :func:`settle_dropped_streams`: wait until streams dropped unfinished have been settled
  (a background thread settles them after the garbage collector finds them).
- The pytest fixture ``fake_llm`` (a running :class:`FakeLLMServer`, stopped after the test)
  is registered automatically when llmguard is installed, by a plugin (the ``pytest11`` entry
  point ``llmguard``, module ``_llmguard_pytestplugin``) that imports no llmguard module until
  a test uses the fixture: other projects' test runs never load llmguard, and coverage of
  code that imports llmguard is measured from the start. ``pytest -p no:llmguard`` turns the
  plugin off.
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

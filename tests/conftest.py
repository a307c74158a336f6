from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import structlog

_SHARED_TIKTOKEN = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken-cache"
if _SHARED_TIKTOKEN.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_TIKTOKEN)

import llmguard  # noqa: E402
from llmguard import _budget, _config, _events, _prices, _storage  # noqa: E402
from llmguard.testing import CapturedEvents, capture_calls  # noqa: E402

# The Redis the Redis tests use. They write only under a key prefix unique to the test run
# (``?prefix=llmguard-test:<run>:<n>:``) and delete only those keys: nothing else in the
# database is read or removed.
REDIS_URI = os.environ.get("LLMGUARD_TEST_REDIS", "redis://127.0.0.1:6379/15")
RUN_PREFIX = f"llmguard-test:{os.getpid()}-{secrets.token_hex(4)}:"
_redis_tests = itertools.count()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own cache folder, default settings, prices and warnings."""
    monkeypatch.setenv("LLMGUARD_CACHE_DIR", str(tmp_path / "llmguard-cache"))
    monkeypatch.delenv("LLMGUARD_STORAGE", raising=False)
    _config.reset_configuration()
    _prices.reset_prices()
    _events.reset_warnings()
    _budget.reset_registry()
    yield
    _storage.close_storages()
    _config.reset_configuration()
    _prices.reset_prices()
    structlog.reset_defaults()  # a test (or the CLI run in-process) may have configured it
    _events.close_owned_stream()
    _events._logger = None


@pytest.fixture
def events() -> Iterator[CapturedEvents]:
    with capture_calls() as captured:
        yield captured


def redis_available() -> bool:
    try:
        import redis

        uri, _ = _storage.split_redis_prefix(REDIS_URI)
        redis.Redis.from_url(uri, socket_connect_timeout=1).ping()
        return True
    except Exception:
        return False


@pytest.fixture
def redis_uri() -> Iterator[str]:
    """The test Redis (``LLMGUARD_TEST_REDIS``, default database 15) with a key prefix of
    this test's own: the URI carries ``?prefix=``, so llmguard writes only under it, and
    only those keys are deleted afterwards. In CI a missing Redis fails."""
    if not redis_available():
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not answering at {REDIS_URI} (CI must start one)")
        pytest.skip(f"no Redis at {REDIS_URI}")
    import redis

    connection_uri, outer = _storage.split_redis_prefix(REDIS_URI)
    prefix = f"{outer}{RUN_PREFIX}{next(_redis_tests)}:"
    separator = "&" if "?" in connection_uri else "?"
    yield f"{connection_uri}{separator}{urlencode({'prefix': prefix})}"
    _storage.close_storages()
    client = redis.Redis.from_url(connection_uri)
    try:
        mine = list(client.scan_iter(match=prefix + "*", count=500))  # no glob characters
        if mine:
            client.delete(*mine)
    finally:
        client.close()


@pytest.fixture(params=["local", "memory", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One test body, every storage backend: yields its URI (a folder of this test's, a
    memory store of its own, or the test Redis under this test's prefix). Tests that need
    fewer backends parametrize it: ``@pytest.mark.parametrize("backend", [...],
    indirect=True)``."""
    if request.param == "local":
        return f"file://{tmp_path}/store"
    if request.param == "memory":
        return f"memory://{tmp_path.name}"
    return str(request.getfixturevalue("redis_uri"))


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Run a test body once with sync and once with async decorated functions."""
    return str(request.param)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a decorated function, sync or async, and return its result."""
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(fn(*args, **kwargs))
    return fn(*args, **kwargs)


def make(flavour: str, body: Any, **decorator_options: Any) -> Any:
    """``body`` (a plain function) as a sync or async function decorated with ``@track``."""
    if flavour == "sync":

        def fn(*args: Any, **kwargs: Any) -> Any:
            return body(*args, **kwargs)

    else:

        async def fn(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            return body(*args, **kwargs)

    fn.__signature__ = inspect.signature(body)  # type: ignore[attr-defined]
    fn.__qualname__ = body.__qualname__
    fn.__module__ = body.__module__
    return llmguard.track(**decorator_options)(fn) if decorator_options else llmguard.track(fn)

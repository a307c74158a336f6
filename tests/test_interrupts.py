"""A KeyboardInterrupt (or any exception) that cuts an operation short leaves nothing broken
behind: no SQLite transaction left open on the local storage (which would lock the folder for
every process), no price lookup remembered as "unknown" for the life of the process.

The interrupts are injected deterministically, at the exact line where one hurts most, not by
timing luck."""

from __future__ import annotations

import contextlib
import inspect
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

import diskcache
import pytest

import llmguard
from llmguard import _prices
from llmguard._ledger import ledger_for
from llmguard._limits_storage import DiskCacheLimitsStorage
from llmguard._storage import LocalStorage
from llmguard.testing import CapturedEvents

from ._helpers import run_python

# -- 1. the local storage after an interrupt inside diskcache's transaction bookkeeping -----

_TRANSACT = inspect.unwrap(diskcache.Cache._transact)


def _line_of(text: str) -> int:
    """The line number of the first line of diskcache's ``Cache._transact`` that is ``text``."""
    lines, first = inspect.getsourcelines(_TRANSACT)
    for number, line in enumerate(lines, start=first):
        if line.strip() == text:
            return number
    raise AssertionError(f"diskcache's Cache._transact has no line {text!r}: update this test")


# Where an interrupt leaves diskcache's transaction open: right after BEGIN IMMEDIATE
# succeeded, after diskcache recorded the thread as inside a transaction (but before its
# ``try``), and after it cleared that record but before COMMIT.
POINTS = {
    "after BEGIN": "begin = True",
    "after bookkeeping": "break",
    "before COMMIT": "sql('COMMIT')",
}


@contextlib.contextmanager
def interrupt_at(text: str) -> Iterator[list[int]]:
    """Raise KeyboardInterrupt once, in diskcache's ``Cache._transact``, just before it runs
    its line ``text`` (as a signal handler would there). Yields a list that holds 1 once the
    interrupt was raised."""
    target = _line_of(text)
    fired: list[int] = []
    previous = sys.gettrace()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == target and not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code is _TRANSACT.__code__ and not fired else None

    sys.settrace(tracer)
    try:
        yield fired
    finally:
        sys.settrace(previous)


def writable_elsewhere(database: Path) -> bool:
    """Can another process take the write lock of ``database`` within a second?"""
    probe = textwrap.dedent(
        """
        import sqlite3, sys
        con = sqlite3.connect(sys.argv[1], timeout=1.0, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        """
    )
    return run_python("-c", probe, str(database), check=False, timeout=60).returncode == 0


def _set(folder: Path) -> Callable[[], Any]:
    storage = LocalStorage(folder)
    return lambda: storage.set("k", b"v")


def _incr(folder: Path) -> Callable[[], Any]:
    storage = LocalStorage(folder)
    return lambda: storage.incr("n", 1, ttl=60)


def _renew(folder: Path) -> Callable[[], Any]:
    storage = LocalStorage(folder)
    storage.set("lock", b"token")
    return lambda: storage.renew("lock", b"token", 60)


def _reserve(folder: Path) -> Callable[[], Any]:
    ledger = ledger_for(LocalStorage(folder))
    now = int(time.time() * 1000)
    return lambda: ledger.reserve("b", 10**15, 1, "rid", now + 60_000, now, None)


def _limits(folder: Path) -> Callable[[], Any]:
    limits = DiskCacheLimitsStorage(f"llmguard+file://{folder}")
    return lambda: limits.incr("w", 60)


OPERATIONS = {"set": _set, "incr": _incr, "renew": _renew, "reserve": _reserve, "limits": _limits}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_an_interrupt_inside_a_transaction_leaves_the_folder_usable(
    tmp_path: Path, operation: str, point: str
) -> None:
    folder = tmp_path / "store"
    run = OPERATIONS[operation](folder)
    run()  # the folder and this thread's connection exist
    with interrupt_at(POINTS[point]) as fired, pytest.raises(KeyboardInterrupt):
        run()
    assert fired, "the interrupt was not injected"
    started = time.monotonic()
    run()  # this process goes on
    run()
    assert time.monotonic() - started < 5  # no wait for a lock held by this very process
    assert writable_elsewhere(folder / "cache.db")  # and so does every other process


def test_the_same_storage_is_usable_from_another_thread_after_an_interrupt(
    tmp_path: Path,
) -> None:
    import threading

    storage = LocalStorage(tmp_path / "store")
    storage.set("k", b"v")
    with interrupt_at(POINTS["after bookkeeping"]), pytest.raises(KeyboardInterrupt):
        storage.incr("n", 1, ttl=60)
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(storage.incr("n", 1, ttl=60)))
    worker.start()
    worker.join(30)
    assert done == [1]


def test_a_budget_keeps_working_after_an_interrupt_in_its_reservation(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 'store'}"

    @llmguard.budget(usd="1", per="total", name="ki", storage=uri)
    @llmguard.track(model="gpt-4o-mini")
    def ask(text: str) -> str:
        return text

    assert ask("warm") == "warm"
    with interrupt_at(POINTS["after BEGIN"]) as fired, pytest.raises(KeyboardInterrupt):
        ask("interrupted")
    assert fired
    assert ask("again") == "again"  # was: BudgetUnavailable (reserve failed: Timeout) forever
    assert writable_elsewhere(tmp_path / "store" / "cache.db")


def test_an_interrupt_inside_an_atomic_block_is_the_blocks_to_end(tmp_path: Path) -> None:
    """Inside an atomic block the seam leaves the transaction to the block (which rolls it
    back): the caller gets the KeyboardInterrupt, not an error of a second rollback."""
    storage = LocalStorage(tmp_path / "store")
    storage.set("k", b"before")

    def block() -> None:
        with storage.atomic():
            storage.set("k", b"inside")
            with interrupt_at("yield sql, filenames.append"):
                storage.set("k", b"interrupted")  # a nested transaction of diskcache's

    with pytest.raises(KeyboardInterrupt):
        block()
    assert storage.get("k") == b"before"  # the whole block was rolled back
    assert writable_elsewhere(tmp_path / "store" / "cache.db")


# -- 2. a price lookup cut short is not remembered -----------------------------------------


def test_a_lookup_cut_short_by_an_interrupt_is_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11 reports an interrupt while genai-prices builds a dataclass as a
    RuntimeError ("Error calling __set_name__") caused by the KeyboardInterrupt: the
    interrupt reaches the caller, and the next lookup asks genai-prices again."""
    import genai_prices

    real = genai_prices.calc_price
    calls: list[str] = []

    def interrupted(usage: Any, model: str, **kwargs: Any) -> Any:
        calls.append(model)
        if len(calls) == 1:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                raise RuntimeError("Error calling __set_name__ on 'Field'") from interrupt
        return real(usage, model, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llmguard.get_price("gpt-4o-mini")
    price = llmguard.get_price("gpt-4o-mini")  # was: None, for the life of the process
    assert price is not None
    assert price.input_per_mtok == Decimal("0.15")
    assert llmguard.calc_cost("gpt-4o-mini", 1_000_000, 0) == Decimal("0.15")
    assert len(calls) == 2


def test_a_plain_interrupt_during_a_lookup_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(model: str) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(_prices, "_lookup_genai_prices", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llmguard.get_price("gpt-4o-mini")
    monkeypatch.undo()
    assert llmguard.get_price("gpt-4o-mini") is not None


def test_a_failed_import_of_genai_prices_is_reported_once_and_retried_later(
    monkeypatch: pytest.MonkeyPatch, events: CapturedEvents
) -> None:
    now = [1000.0]
    monkeypatch.setattr(_prices, "_clock", lambda: now[0])
    lookups: list[str] = []
    real = _prices._lookup_genai_prices

    def counted(model: str) -> Any:
        lookups.append(model)
        return real(model)

    monkeypatch.setattr(_prices, "_lookup_genai_prices", counted)
    monkeypatch.setitem(sys.modules, "genai_prices", None)  # `import genai_prices` fails
    assert llmguard.get_price("gpt-4o-mini") is None
    assert llmguard.get_price("gpt-4o-mini") is None  # not retried at once: no cost per call
    assert len(lookups) == 1
    now[0] += _prices.RETRY_AFTER + 1
    assert llmguard.get_price("gpt-4o-mini") is None  # retried, failed again
    assert len(lookups) == 2
    failures = events.of("price_lookup_failed")
    assert len(failures) == 1  # reported once
    assert "genai_prices" in failures[0]["error"]
    monkeypatch.delitem(sys.modules, "genai_prices")  # the table can be loaded again
    assert llmguard.get_price("gpt-4o-mini") is None  # within the retry delay
    now[0] += _prices.RETRY_AFTER + 1
    price = llmguard.get_price("gpt-4o-mini")  # was: None for the life of the process
    assert price is not None
    assert price.output_per_mtok == Decimal("0.6")
    assert llmguard.get_price("gpt-4o-mini") is price  # then kept
    assert len(lookups) == 3


def test_an_unknown_model_is_still_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import genai_prices

    calls: list[str] = []
    real = genai_prices.calc_price

    def counted(usage: Any, model: str, **kwargs: Any) -> Any:
        calls.append(model)
        return real(usage, model, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", counted)
    assert llmguard.get_price("no-such-model-xyz") is None
    assert llmguard.get_price("no-such-model-xyz") is None
    assert calls == ["no-such-model-xyz"]  # a completed answer ("unknown") is kept

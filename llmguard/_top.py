"""``llmguard top``: a live view of a JSON event log as it grows.

The log is followed like ``tail -F``: lines appended are read as they come, a log rotated
away (renamed, a new file at its path) is read to its end and the new one from its start,
and a log truncated in place (``copytruncate``) is read again from its start. Every
``interval`` seconds the terminal is redrawn: spend per minute, calls, cache hit rate, 429s,
the top functions, models and tenants of the last minutes, and the budgets as their latest
events show them. Ctrl-C (or ``q``) quits, leaving the terminal as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import IO, Any

from ._money import format_usd
from ._report import EVENTS, Malformed, clean, event_time, read_events

_READ_CAP = 8 << 20  # bytes read per look at the file: the screen stays live on a huge log
_POLL = 0.2  # seconds between looks at the file
_HEAD = 4096  # bytes, at most, of the first line: a file whose first line changed was rewritten
_ALT_ON, _ALT_OFF = "\x1b[?1049h", "\x1b[?1049l"  # the terminal's alternate screen
_HIDE, _SHOW = "\x1b[?25l", "\x1b[?25h"
_HOME, _EOL, _EOS = "\x1b[H", "\x1b[K", "\x1b[J"
_BAR = 24  # characters of the widest spend bar


class Follower:
    """The complete lines appended to the file at ``path``, read as they come (``tail -F``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: IO[bytes] | None = None
        self.identity: tuple[int, int] | None = None
        self.partial = b""
        self.head = b""  # the file's first line: it changes when the file is rewritten
        self._first = b""  # its beginning, read so far, until the first line is complete
        self.rotations = 0
        self.truncations = 0
        self._open()

    def _open(self) -> bool:
        try:
            file = open(self.path, "rb")  # noqa: SIM115 - kept open while it is followed
        except FileNotFoundError:
            return False
        status = os.fstat(file.fileno())
        self.file, self.identity, self.partial = file, (status.st_dev, status.st_ino), b""
        self.head = self._first = b""
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _read(self, cap: int | None) -> tuple[list[str], bool]:
        """(complete lines read, whether the file may hold more than ``cap`` bytes allowed;
        None: read to its end)."""
        assert self.file is not None
        data = self.file.read() if cap is None else self.file.read(cap)
        if not data:
            return [], False
        if not self.head:  # reading its first line (reading always starts at 0): keep it
            first = (self._first + data)[:_HEAD]
            end = first.find(b"\n")
            if end >= 0 or len(first) == _HEAD:
                self.head, self._first = (first[: end + 1] if end >= 0 else first), b""
            else:
                self._first = first
        pieces = (self.partial + data).split(b"\n")
        self.partial = pieces.pop()
        lines = [p.decode("utf-8", "replace") for p in pieces if p.strip()]
        return lines, cap is not None and len(data) >= cap

    def _rewritten(self) -> bool:
        """Whether the file was truncated in place since the last look (it is shorter than
        what was read, or its first bytes changed: truncated, then written past that)."""
        assert self.file is not None
        size = os.fstat(self.file.fileno()).st_size
        if size < self.file.tell():
            return True
        if not self.head:
            return False
        return os.pread(self.file.fileno(), len(self.head), 0) != self.head

    def poll(self, cap: int = _READ_CAP) -> tuple[list[str], bool]:
        """(the new complete lines, whether more are waiting to be read)."""
        if self.file is None and not self._open():
            return [], False
        assert self.file is not None
        if self._rewritten():  # truncated in place (copytruncate): read it from the start
            self.file.seek(0)
            self.partial = self.head = self._first = b""
            self.truncations += 1
        lines, more = self._read(cap)
        if more:
            return lines, True
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return lines, False  # mid-rotation: the new file is not there yet
        assert self.file is not None
        if (status.st_dev, status.st_ino) != self.identity:  # rotated: on to the new file
            rest, _ = self._read(None)
            if self.partial.strip():  # the old file's last line, without its newline
                rest.append(self.partial.decode("utf-8", "replace"))
            self.close()
            self.rotations += 1
            if self._open():
                new, more = self._read(cap)
                rest += new
            return lines + rest, more
        return lines, False


@dataclass
class _Tally:
    calls: int = 0
    cost: Decimal = Decimal(0)
    lookups: int = 0
    hits: int = 0
    errors: int = 0
    rate_limited: int = 0

    def add(self, other: _Tally) -> None:
        self.calls += other.calls
        self.cost += other.cost
        self.lookups += other.lookups
        self.hits += other.hits
        self.errors += other.errors
        self.rate_limited += other.rate_limited


@dataclass
class _Minute:
    tally: _Tally = field(default_factory=_Tally)
    # name -> [calls, cost]
    functions: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(_pair))
    models: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(_pair))
    tenants: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(_pair))


def _pair() -> list[Any]:
    return [0, Decimal(0)]


@dataclass
class _BudgetState:
    at: datetime
    spent: Decimal | None
    limit: Decimal | None


class Live:
    """What the log says, kept for the view: whole-log totals, the last ``window`` seconds
    minute by minute, each budget's latest state and the latest alerts."""

    def __init__(self, window: float = 900.0) -> None:
        self.window = window
        self.total = _Tally()
        self.minutes: dict[int, _Minute] = {}
        self.budgets: dict[tuple[str, str | None], _BudgetState] = {}
        self.alerts: deque[str] = deque(maxlen=5)
        self.skipped = 0
        self.first: datetime | None = None
        self.last: datetime | None = None

    def feed_line(self, line: str, now: float) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict) or event.get("event") not in EVENTS:
            self.skipped += 1
            return
        self.feed(event, now)

    def feed(self, raw: dict[str, Any], now: float) -> None:
        """Take in one event (logged, if it has no timestamp, at ``now``)."""
        try:
            event = clean(raw)
        except (Malformed, ValueError, ArithmeticError):
            self.skipped += 1
            return
        at = event_time(event) or datetime.fromtimestamp(now, timezone.utc)
        self.first = at if self.first is None else min(self.first, at)
        self.last = at if self.last is None else max(self.last, at)
        recent = at.timestamp() >= now - self.window - 60
        minute = self._minute(at) if recent else None
        kind = event.get("event")
        if kind == "llm_retry":
            if event.get("status") == 429:
                self.total.rate_limited += 1
                if minute is not None:
                    minute.tally.rate_limited += 1
            return
        if kind in ("budget_alert", "budget_burn_alert"):
            self._alert(event, at)
            return
        one = _Tally(calls=1, cost=event.get("cost_usd") or Decimal(0))
        if event.get("cache"):
            one.lookups = 1
            one.hits = int(event["cache"] in ("hit", "stale"))
        if event.get("outcome") == "error":
            one.errors = 1
            one.rate_limited = int(event.get("error") == "RateLimitError")
        self.total.add(one)
        budget = event.get("budget")
        if isinstance(budget, str):
            self._budget(budget, event, at)
        if minute is None:
            return
        minute.tally.add(one)
        for names, value in (
            (minute.functions, event.get("function")),
            (minute.models, event.get("model")),
            (minute.tenants, event.get("budget_key")),
        ):
            if value is not None:
                names[value][0] += 1
                names[value][1] += one.cost

    def _minute(self, at: datetime) -> _Minute:
        index = int(at.timestamp() // 60)
        found = self.minutes.get(index)
        if found is None:
            found = self.minutes[index] = _Minute()
        return found

    def _budget(self, name: str, event: dict[str, Any], at: datetime) -> None:
        key = event.get("budget_key")
        before = self.budgets.get((name, key))
        if before is not None and at < before.at:
            return
        spent = event.get("budget_spent_usd")
        limit = event.get("budget_limit_usd")
        self.budgets[(name, key)] = _BudgetState(
            at, spent, limit if limit is not None else (before.limit if before else None)
        )

    def _alert(self, event: dict[str, Any], at: datetime) -> None:
        who = f"{event.get('budget')}" + (f" [{event['key']}]" if event.get("key") else "")
        if event.get("event") == "budget_burn_alert":
            text = f"spend-rate alert {who}: limit runs out {event.get('exhausts_at')}"
        else:
            threshold = event.get("threshold")
            share = f"{threshold:.0%}" if isinstance(threshold, (int, float)) else "?"
            text = f"budget alert {who}: {share} of the limit spent"
        self.alerts.append(f"{at.strftime('%H:%M:%S')} {text}")

    def prune(self, now: float) -> None:
        oldest = int((now - self.window) // 60)
        for index in [i for i in self.minutes if i < oldest]:
            del self.minutes[index]


def _usd(value: Decimal) -> str:
    """Money for a screen: to the millionth of a dollar."""
    return format_usd(value.quantize(Decimal("0.000001")))


def _rate(hits: int, lookups: int) -> str:
    return f"{hits / lookups:.1%}" if lookups else "-"


def _window_text(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds / 60:g}m"


def render(
    live: Live,
    now: float,
    *,
    path: str,
    width: int = 100,
    height: int = 40,
    top: int = 5,
    bar: str = "#",
    live_view: bool = True,
) -> list[str]:
    """The screen, one string per line (at most ``height`` lines of ``width`` characters);
    ``live_view`` False (``--once``) leaves out how to quit."""
    live.prune(now)
    span = _window_text(live.window)
    current = int(now // 60)
    first_minute = int((now - live.window) // 60) + 1
    window = _Tally()
    functions: dict[str, list[Any]] = defaultdict(_pair)
    models: dict[str, list[Any]] = defaultdict(_pair)
    tenants: dict[str, list[Any]] = defaultdict(_pair)
    for index, minute in live.minutes.items():
        if first_minute <= index <= current:
            window.add(minute.tally)
            for mine, theirs in (
                (functions, minute.functions),
                (models, minute.models),
                (tenants, minute.tenants),
            ):
                for name, (calls, cost) in theirs.items():
                    mine[name][0] += calls
                    mine[name][1] += cost
    clock = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"llmguard top  {path}  {clock} UTC" + ("  (Ctrl-C or q quits)" if live_view else "")]
    if live.skipped:
        lines[0] += f"  skipped lines: {live.skipped}"
    header = f"{'':<12}{'calls':>8}{'spent':>14}{'hit rate':>10}{'429s':>7}{'errors':>8}"
    lines.append(header)
    for label, tally in ((f"last {span}", window), ("whole log", live.total)):
        lines.append(
            f"{label:<12}{tally.calls:>8}{_usd(tally.cost):>14}"
            f"{_rate(tally.hits, tally.lookups):>10}{tally.rate_limited:>7}{tally.errors:>8}"
        )
    lines += ["", "spend per minute (UTC), newest first"]
    shown = list(range(current, first_minute - 1, -1))[: max(min(10, height // 4), 3)]
    peak = max((live.minutes[i].tally.cost for i in shown if i in live.minutes), default=0)
    for index in shown:
        tally = live.minutes[index].tally if index in live.minutes else _Tally()
        length = int(tally.cost / peak * _BAR) if peak else 0
        if tally.cost and not length:
            length = 1
        stamp = datetime.fromtimestamp(index * 60, timezone.utc).strftime("%H:%M")
        lines.append(
            f"{stamp}  {bar * length:<{_BAR}} {_usd(tally.cost):>12} {tally.calls:>6} calls"
        )
    for title, names in (
        ("functions", functions),
        ("models", models),
        ("tenants (budget key)", tenants),
    ):
        lines += ["", f"top {title}, last {span}".ljust(44) + f"{'calls':>8}{'spent':>14}"]
        ranked = sorted(names.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
        if not ranked:
            lines.append("  -")
        for name, (calls, cost) in ranked[:top]:
            lines.append(f"  {name[:40]:<42}{calls:>8}{_usd(cost):>14}")
    lines += ["", "budgets, as their latest events show them".ljust(44) + "spent / limit"]
    if not live.budgets:
        lines.append("  -")
    ranked_budgets = sorted(
        live.budgets.items(),
        key=lambda item: -((item[1].spent or 0) / item[1].limit if item[1].limit else Decimal(0)),
    )
    for (name, key), state in ranked_budgets[:top]:
        who = name if key is None else f"{name} [{key}]"
        spent = "?" if state.spent is None else _usd(state.spent)
        limit = "?" if state.limit is None else _usd(state.limit)
        gauge = ""
        if state.spent is not None and state.limit:
            share = state.spent / state.limit
            filled = min(int(share * 10), 10)
            gauge = f"  {share:.0%} [{'#' * filled}{'.' * (10 - filled)}]"
        lines.append(f"  {who[:40]:<42}{spent} / {limit}{gauge}")
    if live.alerts:
        lines += ["", "latest alerts"] + [f"  {text}" for text in reversed(live.alerts)]
    return [line[:width] for line in lines[:height]]


class _Terminal:
    """The alternate screen, the cursor hidden, typed keys not echoed: all put back on exit."""

    def __init__(self, out: IO[str], keys: IO[str] | None) -> None:
        self.out = out
        self.keys = keys
        self.saved: Any = None

    def __enter__(self) -> _Terminal:
        if self.keys is not None:
            try:
                import termios

                fd = self.keys.fileno()
                self.saved = termios.tcgetattr(fd)
                quiet = termios.tcgetattr(fd)
                quiet[3] &= ~(termios.ECHO | termios.ICANON)  # ISIG stays: Ctrl-C interrupts
                quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 0, 0
                termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
            except (ImportError, OSError, ValueError):
                self.saved = None
        self.out.write(_ALT_ON + _HIDE)
        self.out.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.out.write(_SHOW + _ALT_OFF)
            self.out.flush()
        finally:
            if self.saved is not None and self.keys is not None:
                import termios

                termios.tcsetattr(self.keys.fileno(), termios.TCSADRAIN, self.saved)

    def draw(self, lines: list[str]) -> None:
        self.out.write(_HOME + "".join(f"{line}{_EOL}\r\n" for line in lines) + _EOS)
        self.out.flush()

    def quit_pressed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a key; True if it was ``q``."""
        if self.keys is None or self.saved is None:
            time.sleep(timeout)
            return False
        import select

        ready, _, _ = select.select([self.keys], [], [], timeout)
        if not ready:
            return False
        typed = os.read(self.keys.fileno(), 64)
        return b"q" in typed.lower()


def _size(out: IO[str]) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(out.fileno())
        return size.columns, size.lines
    except (OSError, ValueError, AttributeError):
        return 100, 40


def _bar_of(out: IO[str]) -> str:
    """A full block where the output can show one, else ``#``."""
    encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
    return "█" if encoding.startswith("utf") else "#"


def _feed_file(live: Live, path: str, clock: Callable[[], float]) -> None:
    """Everything ``path`` holds now (gzipped too), for ``--once``."""
    counter = [0]
    stopped: list[str] = []
    for event in read_events([path], counter, stopped=stopped):
        live.feed(event, clock())
    live.skipped += counter[0]


def _ticks(interval: float, clock: Callable[[], float]) -> Iterator[bool]:
    """Forever: True when a redraw is due (every ``interval`` seconds), else False."""
    due = clock()
    while True:
        now = clock()
        if now >= due:
            due = now + interval
            yield True
        else:
            yield False


def run(
    path: str,
    *,
    interval: float = 1.0,
    window: float = 900.0,
    once: bool = False,
    top: int = 5,
    out: IO[str] | None = None,
    keys: IO[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Show the live view of the log at ``path`` until Ctrl-C or ``q`` (``once``: print it
    once, plain, and return). Returns the exit status: 0, after Ctrl-C and SIGTERM too."""
    out = out or sys.stdout
    live = Live(window)
    if once:
        _feed_file(live, path, clock)
        width, height = _size(out) if out.isatty() else (200, 1000)
        screen = render(
            live,
            clock(),
            path=path,
            width=width,
            height=height,
            top=top,
            bar=_bar_of(out),
            live_view=False,
        )
        out.write("\n".join(screen) + "\n")
        return 0
    follower = Follower(path)
    interactive = out.isatty()
    restore = _stop_on_sigterm()
    keys = keys if keys is not None else (sys.stdin if sys.stdin and sys.stdin.isatty() else None)
    terminal = _Terminal(out, keys if interactive else None)
    try:
        with terminal if interactive else contextlib.nullcontext():
            for due in _ticks(interval, clock):
                lines, more = follower.poll()
                now = clock()
                for line in lines:
                    live.feed_line(line, now)
                if due:
                    width, height = _size(out)
                    screen = render(
                        live,
                        now,
                        path=path,
                        width=width,
                        height=height - 1,
                        top=top,
                        bar=_bar_of(out),
                    )
                    if interactive:
                        terminal.draw(screen)
                    else:
                        out.write("\n".join(screen) + "\n\n")
                        out.flush()
                if more:
                    continue
                if interactive:
                    if terminal.quit_pressed(min(_POLL, interval)):
                        break
                else:
                    time.sleep(min(_POLL, interval))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see _stop_on_sigterm)
        pass
    finally:
        follower.close()
        restore()
    return 0


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM end the view as Ctrl-C does (the terminal put back, exit status 0);
    returns what puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore

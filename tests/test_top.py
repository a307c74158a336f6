"""``llmguard top``: a live view of a JSON log that follows it as it grows."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard._cli import main
from llmguard._top import Follower, Live, render

NOW = datetime(2026, 5, 1, 12, 30, 30, tzinfo=timezone.utc).timestamp()


def _call(
    at: float,
    *,
    function: str = "app.ask",
    model: str = "gpt-4o",
    cost: float = 0.25,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "event": "llm_call",
        "function": function,
        "model": model,
        "cost_usd": cost,
        "outcome": "ok",
        "error": None,
        "timestamp": datetime.fromtimestamp(at, timezone.utc).isoformat(),
        **fields,
    }


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event) + "\n"


# -- following a file ------------------------------------------------------------------------


def test_the_follower_reads_complete_lines_as_they_are_appended(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("one\ntwo\n")
    follower = Follower(str(log))
    assert follower.poll() == (["one", "two"], False)
    assert follower.poll() == ([], False)
    with log.open("a") as fh:
        fh.write("three\nfou")  # a line being written
        fh.flush()
        assert follower.poll() == (["three"], False)
        fh.write("r\n")
    assert follower.poll() == (["four"], False)
    follower.close()


def test_the_follower_survives_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("a\n")
    follower = Follower(str(log))
    assert follower.poll()[0] == ["a"]
    with log.open("a") as fh:
        fh.write("b\n")
    log.rename(tmp_path / "events.jsonl.1")  # rotated: the rest of the old file, then the new
    assert follower.poll()[0] == ["b"]  # the new one is not there yet
    with (tmp_path / "events.jsonl.1").open("a") as fh:
        fh.write("c-late\n")  # a writer still holding the old file
    log.write_text("d\n")
    assert follower.poll()[0] == ["c-late", "d"]
    assert follower.rotations == 1
    log.write_text("")  # copytruncate: the same file, emptied
    assert follower.poll()[0] == []
    with log.open("a") as fh:
        fh.write("e\n")
    assert follower.poll()[0] == ["e"]
    assert follower.truncations == 1
    with log.open("a") as fh:
        fh.write("f" * 100 + "\n")
    assert follower.poll()[0] == ["f" * 100]
    # truncated, then written past where reading was, between two looks
    log.write_text("g" * 200 + "\n" + "h\n")
    assert follower.poll()[0] == ["g" * 200, "h"]
    assert follower.truncations == 2
    follower.close()


def test_a_huge_file_is_read_in_pieces(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    follower = Follower(str(log))
    lines, more = follower.poll(cap=1000)
    assert more
    assert 0 < len(lines) < 1000
    while more:
        new, more = follower.poll(cap=1000)
        lines += new
    assert lines == [f"line {i}" for i in range(1000)]
    follower.close()


# -- what the screen says --------------------------------------------------------------------


def test_the_view_adds_up_the_log(tmp_path: Path) -> None:
    live = Live(window=15 * 60)
    minute = 60.0
    events = [
        _call(NOW - 20 * minute, cost=5.0),  # before the window: in the whole-log line only
        _call(NOW - 2 * minute, cache="miss", budget_key="acme"),
        _call(NOW - 2 * minute, cost=0.0, cache="hit", budget_key="acme", saved_usd=0.25),
        _call(
            NOW - minute, model="gpt-4o-mini", cost=0.5, function="app.sum", budget_key="initech"
        ),
        _call(NOW - 5, outcome="error", error="RateLimitError", cost=0.0),
        {"event": "llm_retry", "status": 429, "timestamp": _call(NOW - 5)["timestamp"]},
        {"event": "llm_retry", "status": 503, "timestamp": _call(NOW - 5)["timestamp"]},
        _call(
            NOW - 4,
            budget="team",
            budget_key="acme",
            budget_spent_usd=8.0,
            budget_limit_usd=10.0,
        ),
        {
            "event": "budget_alert",
            "budget": "team",
            "key": "acme",
            "threshold": 0.8,
            "timestamp": _call(NOW - 3)["timestamp"],
        },
    ]
    for event in events:
        live.feed_line(json.dumps(event), NOW)
    live.feed_line("not json", NOW)
    screen = "\n".join(render(live, NOW, path="events.jsonl", width=120, height=60))
    assert "skipped lines: 1" in screen
    rows = {
        line.split()[0] + line.split()[1]: line.split()[2:] for line in screen.splitlines()[2:4]
    }
    # calls, spent, cache hit rate, 429s (retried or not), errors
    assert rows["last15m"] == ["5", "$1.00", "50.0%", "2", "1"]
    assert rows["wholelog"] == ["6", "$6.00", "50.0%", "2", "1"]
    minutes = {line[:5]: line for line in screen.splitlines() if re.match(r"\d\d:\d\d  ", line)}
    assert minutes["12:28"].split()[-3:] == ["$0.25", "2", "calls"]
    assert minutes["12:29"].split()[-3:] == ["$0.50", "1", "calls"]
    assert minutes["12:30"].split()[-3:] == ["$0.25", "2", "calls"]
    assert minutes["12:28"].count("#") == minutes["12:30"].count("#") == 12  # half the peak
    tenants = screen.split("top tenants")[1].split("\n\n")[0].splitlines()[1:]
    assert [t.split() for t in tenants] == [["acme", "3", "$0.50"], ["initech", "1", "$0.50"]]
    assert "team [acme]                               $8.00 / $10.00  80% [########..]" in screen
    assert "budget alert team [acme]: 80% of the limit spent" in screen
    assert all(len(line) <= 120 for line in screen.splitlines())
    assert len(render(live, NOW, path="x", width=40, height=10)) == 10


def test_once_prints_the_view_and_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "events.jsonl"
    now = time.time()
    log.write_text(_line(_call(now - 30, budget_key="acme")) + _line(_call(now - 20, cost=0.5)))
    assert main(["top", str(log), "--once"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # plain text for scripts
    assert re.search(r"last 15m\s+2\s+\$0.75", out)
    assert main(["top", str(tmp_path / "nope.jsonl"), "--once"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["top", str(log), "--once", "--window", "soon"]) == 2


# -- in a terminal ---------------------------------------------------------------------------

# Runs a command with the pseudo-terminal at argv[1] as its controlling terminal (the one a
# shell gives a program): a new session, the terminal opened, then the program.
_LAUNCH = (
    "import os, sys\n"
    "os.setsid()\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "for n in (0, 1, 2): os.dup2(fd, n)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Terminal:
    """A program in a pseudo-terminal of 120 x 40, its output collected."""

    def __init__(self, *argv: str, env: dict[str, str]) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.modes_before = termios.tcgetattr(self.slave)
        self.output = b""
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, os.ttyname(self.slave), sys.executable, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.output += data

    def screens(self) -> list[str]:
        """Every complete frame drawn so far, as plain text."""
        with self.lock:
            text = self.output.decode("utf-8", "replace")
        frames = text.split("\x1b[H")[1:]
        return [
            re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).replace("\r", "")
            for frame in frames
            if "\x1b[J" in frame
        ]

    def wait_for(self, check: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screens = self.screens()
            if screens and check(screens[-1]):
                return screens[-1]
            time.sleep(0.05)
        last = self.screens()[-1] if self.screens() else "(nothing drawn)"
        raise AssertionError(f"the screen never showed it; last screen:\n{last}")

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.slave)
        os.close(self.master)


@pytest.fixture
def terminal_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TERM": "xterm", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


@pytest.fixture
def in_terminal(terminal_env: dict[str, str]) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(*argv: str) -> Terminal:
        terminal = Terminal(*argv, env=terminal_env)
        opened.append(terminal)
        return terminal

    yield start
    for terminal in opened:
        terminal.close()


def _whole_log(screen: str) -> list[str]:
    [line] = [line for line in screen.splitlines() if line.startswith("whole log")]
    return line.split()[2:]


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_top_follows_the_log_in_a_terminal_and_quits_cleanly_on_ctrl_c(
    tmp_path: Path, in_terminal: Callable[..., Terminal]
) -> None:
    import termios

    log = tmp_path / "app.jsonl"
    log.write_text("")
    terminal = in_terminal("-m", "llmguard._cli", "top", str(log), "--interval", "0.2")
    screen = terminal.wait_for(lambda s: "whole log" in s)
    assert _whole_log(screen) == ["0", "$0.00", "-", "0", "0"]

    # real events, appended by an application logging to the file
    llmguard.configure_logging(json=True, file=str(log))

    class RateLimitError(Exception):
        status_code = 429

    failures = [RateLimitError()]

    @llmguard.cached(storage=f"file://{tmp_path}/state")
    @llmguard.budget(
        usd=1, name="tenants", key=lambda tenant, **_: tenant, storage=f"file://{tmp_path}/state"
    )
    @llmguard.retry_on_rate_limit(sleep=lambda s: None, jitter=None)
    def ask(tenant: str, question: str, model: str = "gpt-4o") -> str:
        if failures:
            raise failures.pop()
        llmguard.record_usage(1000, 100)  # $0.0035
        return "answer"

    ask("acme", "q1")  # one 429, retried
    ask("acme", "q1")  # a cache hit
    ask("globex", "q2")
    screen = terminal.wait_for(lambda s: _whole_log(s)[0] == "3")
    assert _whole_log(screen) == ["3", "$0.007", "33.3%", "1", "0"]
    # the cache hit is served before @budget: no budget key (tags say who, if need be)
    assert re.search(r"acme\s+1\s+\$0.0035", screen)
    assert re.search(r"globex\s+1\s+\$0.0035", screen)
    assert re.search(r"tenants \[acme\]\s+\$0.0035 / \$1.00", screen)

    # the log is rotated: the old file keeps its name with .1, a new one takes its place
    llmguard._events.close_owned_stream()
    log.rename(tmp_path / "app.jsonl.1")
    llmguard.configure_logging(json=True, file=str(log))
    ask("initech", "q3")
    screen = terminal.wait_for(lambda s: _whole_log(s)[0] == "4")
    assert _whole_log(screen) == ["4", "$0.0105", "25.0%", "1", "0"]
    assert "initech" in screen

    # truncated in place (copytruncate): read again from its start
    llmguard._events.close_owned_stream()
    log.write_text("")
    llmguard.configure_logging(json=True, file=str(log))
    ask("umbrella", "q4")
    screen = terminal.wait_for(lambda s: _whole_log(s)[0] == "5")
    assert "umbrella" in screen
    llmguard._events.close_owned_stream()

    terminal.press(b"\x03")  # Ctrl-C, through the terminal: SIGINT to the program
    assert terminal.process.wait(timeout=30) == 0
    time.sleep(0.2)
    with terminal.lock:
        output = terminal.output.decode("utf-8", "replace")
    assert output.startswith("\x1b[?1049h")  # the alternate screen...
    assert output.rstrip().endswith("\x1b[?25h\x1b[?1049l")  # ...left, with the cursor back
    assert "Traceback" not in output
    assert termios.tcgetattr(terminal.slave) == terminal.modes_before  # echo and modes back


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_q_quits_and_a_terminated_top_restores_the_terminal_too(
    tmp_path: Path, in_terminal: Callable[..., Terminal]
) -> None:
    import termios

    log = tmp_path / "app.jsonl"
    log.write_text(_line(_call(time.time())))
    terminal = in_terminal("-m", "llmguard._cli", "top", str(log), "--interval", "0.2")
    terminal.wait_for(lambda s: "whole log" in s)
    terminal.press(b"q")
    assert terminal.process.wait(timeout=30) == 0
    assert termios.tcgetattr(terminal.slave) == terminal.modes_before
    second = in_terminal("-m", "llmguard._cli", "top", str(log), "--interval", "0.2")
    second.wait_for(lambda s: "whole log" in s)
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=30) == 0
    assert termios.tcgetattr(second.slave) == second.modes_before

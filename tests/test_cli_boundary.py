"""Operator tools never print a traceback: bad logs, bad arguments, bad storage, closed pipes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmguard import _cli
from llmguard._cli import main
from llmguard._report import DIMENSIONS
from llmguard._storage import LocalStorage

GOOD = {
    "event": "llm_call",
    "function": "app.ask",
    "model": "gpt-4o",
    "input_tokens": 10,
    "output_tokens": 5,
    "cost_usd": 0.001,
    "cache": "miss",
    "outcome": "ok",
    "timestamp": "2025-01-01T00:00:00Z",
}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``llmguard argv`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exits (--help, bad usage)
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _report_json(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    code, out, err = _run(["report", str(path), "--format", "json"], capsys)
    assert code == 0, err
    return json.loads(out), err


# -- 6. llmguard report on malformed logs -----------------------------------------------------

MALFORMED = {
    "tokens not a number": '{"event":"llm_call","function":"bad","input_tokens":"abc"}',
    "tokens infinite": '{"event":"llm_call","function":"bad","input_tokens":1e400}',
    "tokens negative": '{"event":"llm_call","function":"bad","output_tokens":-5}',
    "tokens fractional": '{"event":"llm_call","function":"bad","output_tokens":2.5}',
    "tokens a list": '{"event":"llm_call","function":"bad","output_tokens":[1]}',
    "cost NaN": '{"event":"llm_call","function":"bad","cost_usd":NaN}',
    "cost infinite": '{"event":"llm_call","function":"bad","cost_usd":Infinity}',
    "cost overflowing": '{"event":"llm_call","function":"bad","cost_usd":"1e999999999"}',
    "cost huge": '{"event":"llm_call","function":"bad","cost_usd":1e300}',
    "cost negative": '{"event":"llm_call","function":"bad","cost_usd":-1}',
    "cost not a number": '{"event":"llm_call","function":"bad","cost_usd":"abc"}',
    "saved a list": '{"event":"llm_call","function":"bad","cache":"hit","saved_usd":[1]}',
    "wait a dict": '{"event":"llm_call","function":"bad","rate_wait_s":{"s":1}}',
    "function a list": '{"event":"llm_call","function":["bad"],"cost_usd":0.5}',
    "model a dict": '{"event":"llm_call","function":"bad","model":{"m":1},"cost_usd":0.5}',
    "route_default a list": '{"event":"llm_call","function":"bad","route_default":["gpt-4o"],'
    '"cost_usd":0.5,"input_tokens":3}',
    "deeply nested": "[" * 100_000,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_report_skips_and_counts_a_malformed_event(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text(json.dumps(GOOD) + "\n" + MALFORMED[case] + "\n" + json.dumps(GOOD) + "\n")
    for by in DIMENSIONS:
        for fmt in ("table", "csv"):
            code, _out, err = _run(["report", str(log), "--by", by, "--format", fmt], capsys)
            assert (code, err) == (0, "")
    code, _, err = _run(["report", str(log), "--html", str(tmp_path / "r.html")], capsys)
    assert code == 0
    report, err = _report_json(log, capsys)
    totals = report["totals"]
    assert totals["calls"] == 2  # only the two good events are summed
    assert totals["cost_usd"] == "0.002"
    assert (totals["input_tokens"], totals["output_tokens"]) == (20, 10)
    assert totals["skipped_lines"] == 1
    assert list(report["groups"]) == ["app.ask"]


def test_report_table_counts_malformed_events_with_skipped_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("\n".join([json.dumps(GOOD), *MALFORMED.values(), "not json"]) + "\n")
    code, out, _ = _run(["report", str(log)], capsys)
    assert code == 0
    assert f"skipped lines    {len(MALFORMED) + 1} (not llmguard events, or malformed)" in out


def _gzipped_log(path: Path, events: int) -> None:
    with gzip.open(path, "wt") as fh:
        for i in range(events):
            fh.write(json.dumps({**GOOD, "function": f"app.f{i % 7}", "pad": "x" * 200}) + "\n")


def test_a_truncated_gzip_reports_what_it_read_and_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole, cut = tmp_path / "whole.jsonl.gz", tmp_path / "cut.jsonl.gz"
    _gzipped_log(whole, 2000)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, out, err = _run(["report", str(cut), str(whole), "--format", "json"], capsys)
    assert code == 0
    report = json.loads(out)
    read_from_cut = report["totals"]["calls"] - 2000
    assert 0 < read_from_cut < 2000  # what was read before the end is kept
    [note] = report["totals"]["incomplete_files"]
    assert note.startswith(f"{cut}: stopped after line {read_from_cut}")
    assert err.strip() == f"llmguard: incomplete: {note}"
    code, out, err = _run(["report", str(cut)], capsys)
    assert code == 0
    assert f"incomplete       {cut}: stopped after line" in out


def test_corrupt_gzip_data_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "bad.jsonl.gz"
    _gzipped_log(log, 2000)
    data = bytearray(log.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    log.write_bytes(bytes(data))
    code, out, err = _run(["report", str(log), "--format", "json"], capsys)
    assert code == 0
    assert json.loads(out)["totals"]["incomplete_files"]
    assert "Traceback" not in err


def test_report_on_a_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = _run(["report", str(tmp_path)], capsys)
    assert code == 1
    assert err == f"llmguard: a folder, not a log file: {tmp_path}\n"


def test_report_on_an_unreadable_file_reports_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    locked = tmp_path / "locked.jsonl"
    locked.write_text(json.dumps(GOOD) + "\n")
    real_open = Path.open

    def refusing(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing)
    code, out, _err = _run(["report", str(locked), str(good), "--format", "json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["totals"]["calls"] == 1
    assert report["totals"]["incomplete_files"] == [
        f"{locked}: stopped before its first line: Permission denied"
    ]


def test_report_reads_binary_garbage_on_standard_input() -> None:
    garbage = b"\xff\xfe\x00\x81 not text\n" + json.dumps(GOOD).encode() + b"\n\xc3\x28\n"
    result = subprocess.run(
        [sys.executable, "-m", "llmguard._cli", "report", "-", "--format", "json"],
        input=garbage,
        capture_output=True,
        timeout=120,
    )
    assert result.stderr == b""
    assert result.returncode == 0
    totals = json.loads(result.stdout)["totals"]
    assert (totals["calls"], totals["skipped_lines"]) == (1, 2)


def test_report_since_out_of_range_is_bad_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text(json.dumps(GOOD) + "\n")
    for since in ("99999999999d", "abc", "-5m", "0s"):
        code, _out, err = _run(["report", str(log), f"--since={since}"], capsys)
        assert code == 2, since
        assert err.startswith("llmguard: --since")
        assert err.count("\n") == 1


def test_report_html_into_a_missing_folder_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text(json.dumps(GOOD) + "\n")
    target = tmp_path / "no" / "such" / "report.html"
    code, _out, err = _run(["report", str(log), "--html", str(target)], capsys)
    assert code == 1
    assert err == f"llmguard: {target}: No such file or directory\n"


# -- 7. one error boundary ----------------------------------------------------------------------


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    with log.open("w") as fh:
        for i in range(3000):  # a report far bigger than a pipe's buffer
            fh.write(json.dumps({**GOOD, "function": f"app.function_number_{i}"}) + "\n")
    reader = subprocess.Popen(
        [sys.executable, "-m", "llmguard._cli", "report", str(log), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reader.stdout is not None
    assert reader.stderr is not None
    assert reader.stdout.read(100).startswith(b"{")
    reader.stdout.close()  # like `| head -c 100`
    stderr = reader.stderr.read()
    assert reader.wait(timeout=120) == 0
    assert stderr == b""


def test_bad_usage_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["report"],
        ["report", "x.jsonl", "--by", "colour"],
        ["estimate", "-", "--output-tokens", "many"],
        ["no-such-command"],
        ["budget", "reset"],
        ["cache", "clear", "--bogus"],
    ):
        code, out, err = _run(argv, capsys)
        assert code == 2, argv
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith("llmguard"), err
        assert "--help" in err


def test_llmguard_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (
        ["budget", "status", "--storage", "bogus://x"],
        ["cache", "stats", "--storage", str(blocker)],
        ["estimate", "-", "--output-tokens", "-5"],
    ):
        code, _out, err = _run(argv, capsys)
        assert code == 2, argv
        assert err.count("\n") == 1, err
        assert err.startswith("llmguard: "), err


def test_an_unexpected_error_is_one_line_unless_debugging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: str) -> Any:
        raise RuntimeError("something broke")

    monkeypatch.setattr(_cli, "get_price", broken)
    code, _out, err = _run(["prices", "gpt-4o"], capsys)
    assert code == 1
    assert err.startswith("llmguard: unexpected error: RuntimeError: something broke")
    assert err.count("\n") == 1
    monkeypatch.setenv("LLMGUARD_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["prices", "gpt-4o"])


def test_estimate_of_a_binary_file_says_it_is_not_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\xff\xfe\x00\x81")
    code, _out, err = _run(["estimate", str(blob)], capsys)
    assert code == 1
    assert err == f"llmguard: cannot read {blob}: it is not UTF-8 text\n"


def test_cache_stats_skips_keys_that_are_not_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalStorage(tmp_path / "store")
    store.set_entry("llmguard:cache:default:app.ask:abc", b"x")
    store.set_entry("llmguard:cache:nocolon", b"x")
    store.set_entry("llmguard:cache:ns:nohash", b"x")
    store.close()
    code, out, err = _run(
        ["cache", "stats", "--storage", str(tmp_path / "store"), "--format", "json"], capsys
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == [{"namespace": "default", "function": "app.ask", "entries": 1}]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, list[str]]:
    """Files and storages, good and bad, for the commands to be driven with."""
    logs = {
        "empty": b"",
        "garbage": b"\xff\xfe\x00\x81garbage\n{not json\n" + b"[" * 5000 + b"\n",
        "malformed": "\n".join(MALFORMED.values()).encode() + b"\n",
        "good": (json.dumps(GOOD) + "\n").encode(),
    }
    files = []
    for name, content in logs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        files.append(str(path))
    good = tmp_path / "good.jsonl.gz"
    _gzipped_log(good, 500)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:3000])
    files += [str(good), str(cut), str(tmp_path / "missing.jsonl"), str(tmp_path), ""]
    store = tmp_path / "store"
    state = LocalStorage(store)
    state.set("llmguard:budget:b:-:total", b"not json")  # a ledger that is not one
    state.set("llmguard:budget:b:k:20250101T000000", b'{"spent": "x", "res": []}')
    state.set_entry("llmguard:cache:nocolon", b"x")
    state.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    storages = [
        str(store),
        f"file://{store}",
        str(shared),
        str(tmp_path / "good.jsonl"),
        "memory://",
        "bogus://x",
        "",
        "redis://:canary-pw@127.0.0.1:1/0",
        "redis://127.0.0.1:notaport/0",
    ]
    return {"files": files, "storages": storages}


def _commands(inputs: dict[str, list[str]]) -> st.SearchStrategy[list[str]]:
    """Every command, with arguments drawn from good and bad values; free text only where a
    name goes (never a path or a storage URI: no network, no writes outside tmp_path)."""
    names = st.text(max_size=30).filter(lambda t: not t.startswith("-"))
    files = st.sampled_from(inputs["files"])
    storage = st.sampled_from(inputs["storages"])
    fmt = st.sampled_from(["table", "json", "csv", "yaml", ""])
    options = {
        "prices": [fmt.map(lambda f: ["--format", f]), st.just(["--format"])],
        "estimate": [
            fmt.map(lambda f: ["--format", f]),
            names.map(lambda m: ["--model", m]),
            st.sampled_from(["0", "-1", "x", "99999999999999999999", "1e3"]).map(
                lambda n: ["--output-tokens", n]
            ),
        ],
        "report": [
            fmt.map(lambda f: ["--format", f]),
            st.sampled_from([*DIMENSIONS, "colour"]).map(lambda b: ["--by", b]),
            (names | st.sampled_from(["7d", "1e308s", "99999999999w", "0s"])).map(
                lambda s: ["--since", s]
            ),
            st.sampled_from(["", "no/such/folder/r.html"]).map(lambda h: ["--html", h]),
        ],
        "budget status": [
            storage.map(lambda s: ["--storage", s]),
            names.map(lambda k: ["--key", k]),
            fmt.map(lambda f: ["--format", f]),
        ],
        "budget reset": [
            storage.map(lambda s: ["--storage", s]),
            names.map(lambda k: ["--key", k]),
        ],
        "cache stats": [
            storage.map(lambda s: ["--storage", s]),
            fmt.map(lambda f: ["--format", f]),
        ],
        "cache clear": [
            storage.map(lambda s: ["--storage", s]),
            names.map(lambda f: ["--function", f]),
            names.map(lambda n: ["--namespace", n]),
        ],
        "budget": [],
        "cache": [],
    }
    positional = {
        "prices": st.lists(names, max_size=3),
        "estimate": st.lists(files, max_size=2),
        "report": st.lists(files, max_size=3),
        "budget status": st.lists(names, max_size=2),
        "budget reset": st.lists(names, max_size=2),
        "cache stats": st.just([]),
        "cache clear": st.lists(names, max_size=1),
        "budget": st.just([]),
        "cache": st.just([]),
    }

    @st.composite
    def command(draw: Any) -> list[str]:
        name = draw(st.sampled_from(sorted(options)))
        argv = name.split()
        argv += draw(positional[name])
        for option in draw(st.lists(st.sampled_from(options[name] or [st.just([])]), max_size=4)):
            argv += draw(option)
        return argv

    return command()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_command_ever_prints_a_traceback(
    data: st.DataObject,
    inputs: dict[str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = data.draw(_commands(inputs))
    code, out, err = _run(argv, capsys)
    assert code in (0, 1, 2), (argv, err)
    assert "Traceback" not in err, argv
    assert "canary-pw" not in out + err
    assert "unexpected error" not in err, (argv, err)
    if code:
        assert (out + err).strip(), argv  # a failure always says why


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--bogus"],
        ["demo", "--out", "{file}"],
        ["report", "{folder}"],
        ["report", "-", "--since", "99999999999d"],
        ["estimate", "{folder}"],
        ["budget", "status", "--storage", "redis://:canary-pw@127.0.0.1:1/0"],
        ["cache", "stats", "--storage", "{shared}"],
    ],
)
def test_no_traceback_from_the_installed_command(tmp_path: Path, argv: list[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    argv = [a.format(file=blocker, folder=tmp_path, shared=shared) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "llmguard._cli", *argv],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr
    assert "canary-pw" not in result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr

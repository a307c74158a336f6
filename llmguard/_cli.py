"""The ``llmguard`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

from ._errors import ConfigurationError, LLMGuardError, StorageError
from ._money import decimal_text, format_usd
from ._prices import PerMTok, Tiered, get_price
from ._redact import redact_uri, scrub
from ._report import DIMENSIONS, check_dimension
from ._storage import Storage, check_storage, local_folder, open_storage
from ._tokens import count_tokens
from ._version import __version__

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE = 0, 1, 2


def _price_text(value: PerMTok | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, Tiered):
        tiers = ", ".join(f">{start:,}: {format_usd(price)}" for start, price in value.tiers)
        return f"{format_usd(value.base)} ({tiers})"
    return format_usd(value)


def _price_json(value: PerMTok | None) -> Any:
    if value is None:
        return None
    if isinstance(value, Tiered):
        return {
            "base": decimal_text(value.base),
            "tiers": [{"above": s, "price": decimal_text(p)} for s, p in value.tiers],
        }
    return decimal_text(value)


def _cmd_prices(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    missing = 0
    for model in args.models:
        price = get_price(model)
        if price is None:
            missing += 1
            print(
                f"llmguard: no price known for {model!r}; add one with llmguard.set_price()",
                file=sys.stderr,
            )
            continue
        rows.append(
            {
                "model": model,
                "input_per_mtok": price.input_per_mtok,
                "cached_input_per_mtok": price.cached_input_per_mtok,
                "cache_write_per_mtok": price.cache_write_per_mtok,
                "output_per_mtok": price.output_per_mtok,
                "source": price.source,
            }
        )
    if args.format == "json":
        out = [
            {k: (_price_json(v) if k.endswith("mtok") else v) for k, v in row.items()}
            for row in rows
        ]
        json.dump(out, sys.stdout, indent=2)
        print()
    elif rows:
        header = ("model", "input", "cached input", "cache write", "output", "source")
        table = [header] + [
            (
                r["model"],
                _price_text(r["input_per_mtok"]),
                _price_text(r["cached_input_per_mtok"]),
                _price_text(r["cache_write_per_mtok"]),
                _price_text(r["output_per_mtok"]),
                r["source"],
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        print("USD per million tokens")
        for row in table:
            print(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
    return EXIT_NOT_FOUND if missing else EXIT_OK


DEFAULT_ESTIMATE_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1-mini",
    "claude-sonnet-4-5",
    "claude-3-5-haiku-latest",
    "gemini-1.5-flash",
)


def _read_text(path: str) -> str | None:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        print(f"llmguard: cannot read {path}: {exc.strerror}", file=sys.stderr)
    except UnicodeDecodeError:
        print(f"llmguard: cannot read {path}: it is not UTF-8 text", file=sys.stderr)
    return None


def _cmd_estimate(args: argparse.Namespace) -> int:
    if args.output_tokens < 0:
        raise ConfigurationError(f"--output-tokens must be 0 or more, got {args.output_tokens}")
    text = _read_text(args.file)
    if text is None:
        return EXIT_NOT_FOUND
    rows = []
    for model in args.model or DEFAULT_ESTIMATE_MODELS:
        tokens = count_tokens(text, model)
        price = get_price(model)
        input_cost = None if price is None else price.cost(int(tokens), 0)
        output_cost = None if price is None else price.cost(0, args.output_tokens)
        rows.append(
            {
                "model": model,
                "input_tokens": int(tokens),
                "estimate": tokens.estimate,
                "output_tokens": args.output_tokens,
                "input_usd": None if input_cost is None else decimal_text(input_cost),
                "output_usd": None if output_cost is None else decimal_text(output_cost),
                "total_usd": None
                if price is None
                else decimal_text(price.cost(int(tokens), args.output_tokens)),
            }
        )
    rows.sort(key=lambda r: (r["total_usd"] is None, Decimal(r["total_usd"] or 0)))
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
        return EXIT_OK
    table = [("model", "input tokens", "input", f"output ({args.output_tokens})", "total")] + [
        (
            r["model"],
            f"{r['input_tokens']}{'~' if r['estimate'] else ''}",
            "?" if r["input_usd"] is None else format_usd(r["input_usd"]),
            "?" if r["output_usd"] is None else format_usd(r["output_usd"]),
            "price unknown" if r["total_usd"] is None else format_usd(r["total_usd"]),
        )
        for r in rows
    ]
    _print_table(table)
    print("~ approximate count (not an OpenAI model); cheapest first")
    return EXIT_OK


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _cmd_report(args: argparse.Namespace) -> int:
    from ._cache import parse_duration
    from ._html import render_html
    from ._report import build, read_events, render_csv, render_table

    missing = [p for p in args.files if p != "-" and not os.path.exists(p)]
    if missing:
        print(f"llmguard: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    folders = [p for p in args.files if p != "-" and os.path.isdir(p)]
    if folders:
        print(f"llmguard: a folder, not a log file: {', '.join(folders)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    since = None
    if args.since:
        seconds = parse_duration(args.since, "--since")  # ConfigurationError: exit 2
        try:
            since = None if seconds is None else timedelta(seconds=seconds)
        except OverflowError:
            raise ConfigurationError(f"--since {args.since!r} reaches too far back") from None
    counter = [0]
    progress = _progress if sys.stderr.isatty() else None
    stopped: list[str] = []
    report = build(
        read_events(args.files, counter, progress=progress, stopped=stopped),
        by=args.by,
        since=since,
    )
    report.skipped_lines += counter[0]
    report.stopped = stopped
    if progress is not None:
        print(file=sys.stderr)
    for note in stopped:
        print(f"llmguard: incomplete: {note}", file=sys.stderr)
    if args.format == "json":
        json.dump(report.as_dict(), sys.stdout, indent=2)
        print()
    elif args.format == "csv":
        sys.stdout.write(render_csv(report))
    else:
        print(render_table(report))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as fh:
            fh.write(render_html(report))
        print(f"HTML report: {args.html}", file=sys.stderr)
    return EXIT_OK


def _dimension(text: str) -> str:
    try:
        return check_dimension(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_top(args: argparse.Namespace) -> int:
    from ._cache import parse_duration
    from ._top import run

    if args.file == "-" or not os.path.exists(args.file):
        print(f"llmguard: no such file: {args.file}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if os.path.isdir(args.file):
        print(f"llmguard: a folder, not a log file: {args.file}", file=sys.stderr)
        return EXIT_NOT_FOUND
    interval = parse_duration(args.interval, "--interval") or 1.0
    window = parse_duration(args.window, "--window") or 900.0
    if args.top < 1:
        raise ConfigurationError(f"--top must be 1 or more, got {args.top}")
    return run(args.file, interval=interval, window=window, once=args.once, top=args.top)


def _progress(path: str, fraction: float) -> None:
    width = 30
    done = int(fraction * width)
    print(
        f"\rreading {path} [{'#' * done}{'.' * (width - done)}] {fraction:4.0%}",
        end="",
        file=sys.stderr,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    run(Path(args.out), fast=args.fast)
    return EXIT_OK


def _budget_rows(name: str, key: str | None, storage: str | None) -> list[dict[str, Any]]:
    """The current window of budget ``name`` (one key's, or every key's), as read by
    ``llmguard.budget_status`` / ``llmguard.budget_keys`` from any process."""
    from ._budget import budget_definition, budget_keys, budget_status

    definition = budget_definition(name, storage)[0]
    if definition.keyed and key is None:
        statuses = list(budget_keys(name, storage).values())
    else:
        statuses = [budget_status(name, key, storage)]
    per = definition.period
    return [
        {
            "budget": s.name,
            "key": s.key,
            "per": per if isinstance(per, str) else f"{per.total_seconds():g}s",
            "tz": definition.tz.key,
            "window_start": None if s.window_start is None else s.window_start.isoformat(),
            "resets_at": None if s.resets_at is None else s.resets_at.isoformat(),
            "limit_usd": decimal_text(s.limit_usd),
            "spent_usd": decimal_text(s.spent_usd),
            "reserved_usd": decimal_text(s.reserved_usd),
            "remaining_usd": decimal_text(s.remaining_usd),
        }
        for s in statuses
    ]


def _existing_storage(uri: str | None) -> Storage | None:
    """The storage an operator command reads, or None (having said so on stderr) if it is a
    local folder that does not exist: a command never creates one (a mistyped path would
    leave a stray folder, and there is nothing to show or remove anyway)."""
    folder = local_folder(uri)
    if folder is not None and not folder.is_dir():
        print(
            f"llmguard: nothing there: no storage folder {str(folder)!r} (check --storage, "
            "LLMGUARD_STORAGE or LLMGUARD_CACHE_DIR)",
            file=sys.stderr,
        )
        return None
    return open_storage(uri)


def _cmd_budget_status(args: argparse.Namespace) -> int:
    from ._errors import ConfigurationError
    from ._ledger import budget_names

    storage = _existing_storage(args.storage)
    if storage is None:
        return EXIT_NOT_FOUND
    names = budget_names(storage)  # the budgets whose definition is stored
    if args.name is not None:
        if args.name not in names:
            print(
                f"llmguard: no budget named {args.name!r} in {redact_uri(storage.uri)} (a "
                "budget's definition is stored with its ledger on its first call)",
                file=sys.stderr,
            )
            return EXIT_NOT_FOUND
        names = [args.name]
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            rows.extend(_budget_rows(name, args.key, args.storage))
        except ConfigurationError as exc:  # e.g. --key on a budget without key=
            print(f"llmguard: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif rows:
        columns = {
            "budget": "budget",
            "key": "key",
            "per": "per",
            "window start": "window_start",
            "limit": "limit_usd",
            "spent": "spent_usd",
            "reserved": "reserved_usd",
            "remaining": "remaining_usd",
            "resets": "resets_at",
        }
        _print_table(
            [list(columns)]
            + [
                [
                    "-"
                    if r[f] is None
                    else format_usd(Decimal(r[f]))
                    if f.endswith("_usd")
                    else str(r[f])
                    for f in columns.values()
                ]
                for r in rows
            ]
        )
    else:
        print(
            "no spend in the current window"
            + (f" of {args.name!r}" if args.name else " of any budget")
            + f" in {redact_uri(storage.uri)}"
        )
    return EXIT_OK


def _cmd_budget_reset(args: argparse.Namespace) -> int:
    from ._ledger import clear_budget

    storage = _existing_storage(args.storage)
    if storage is None:
        return EXIT_NOT_FOUND
    removed = clear_budget(storage, args.name, args.key)
    which = f"budget {args.name!r}" + (f" key {args.key!r}" if args.key is not None else "")
    if not removed:
        print(
            f"llmguard: nothing to reset: no {which} in {redact_uri(storage.uri)}", file=sys.stderr
        )
        return EXIT_NOT_FOUND
    print(f"reset {which}: {removed} records removed")
    return EXIT_OK


def _cmd_cache_stats(args: argparse.Namespace) -> int:
    storage = _existing_storage(args.storage)
    if storage is None:
        return EXIT_NOT_FOUND
    counts: dict[tuple[str, str], int] = {}
    for key in storage.keys("llmguard:cache:", entries=True):
        namespace, colon, rest = key[len("llmguard:cache:") :].partition(":")
        if not colon or ":" not in rest:  # not an entry's key: not llmguard's
            continue
        function = rest.rsplit(":", 1)[0]
        counts[(namespace, function)] = counts.get((namespace, function), 0) + 1
    rows = [
        {"namespace": ns, "function": fn, "entries": n} for (ns, fn), n in sorted(counts.items())
    ]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif rows:
        _print_table(
            [("function", "namespace", "entries")]
            + [(str(r["function"]), str(r["namespace"]), str(r["entries"])) for r in rows]
        )
    else:
        print(f"no cache entries in {redact_uri(storage.uri)}")
    return EXIT_OK


def _cmd_cache_clear(args: argparse.Namespace) -> int:
    storage = _existing_storage(args.storage)
    if storage is None:
        return EXIT_NOT_FOUND
    prefix = f"llmguard:cache:{args.namespace}:" + (f"{args.function}:" if args.function else "")
    if args.function is None and args.namespace == "default":
        prefix = "llmguard:cache:"
    removed = storage.clear_entries(prefix)
    print(f"removed {removed} cache entries from {redact_uri(storage.uri)}")
    return EXIT_OK


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be swapped, e.g. by tests)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit status 2 (``--help`` shows the rest)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llmguard",
        description="Keep LLM API bills and rate-limit errors under control. "
        "Exit codes: 0 success, 1 something asked for was not found or could not be read "
        "or reached, 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"llmguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    prices = sub.add_parser("prices", help="show models' prices (genai-prices, plus overrides)")
    prices.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="model names, e.g. gpt-4o claude-3-5-haiku-latest",
    )
    prices.add_argument("--format", choices=("table", "json"), default="table")
    prices.set_defaults(run=_cmd_prices)

    estimate = sub.add_parser(
        "estimate", help="tokens and cost of a prompt on several models, cheapest first"
    )
    estimate.add_argument(
        "file", metavar="FILE", help="the prompt: a text file, or - for standard input"
    )
    estimate.add_argument(
        "--model", action="append", help="a model to price (repeatable; default: a selection)"
    )
    estimate.add_argument(
        "--output-tokens", type=int, default=500, help="output to price (default 500)"
    )
    estimate.add_argument("--format", choices=("table", "json"), default="table")
    estimate.set_defaults(run=_cmd_estimate)

    demo = sub.add_parser("demo", help="see every policy work, offline, against a fake provider")
    demo.add_argument(
        "--fast", action="store_true", help="shorter windows: about 5 seconds instead of 12"
    )
    demo.add_argument(
        "--out", default=".", help="folder for the JSON log and HTML report (default .)"
    )
    demo.set_defaults(run=_cmd_demo)

    report = sub.add_parser("report", help="the bill from llmguard's JSON-lines logs")
    report.add_argument(
        "files", nargs="+", metavar="LOG", help="JSON-lines logs (gzipped too), or -"
    )
    report.add_argument(
        "--by",
        type=_dimension,
        default="function",
        metavar="|".join((*DIMENSIONS, "tag:NAME")),
        help="break down by (default function); key: the budget key (tenant); tag:NAME: a tag "
        "given with llmguard.tags() or tags=",
    )
    report.add_argument("--since", help="only events this recent: 90s, 30m, 12h, 7d")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.add_argument(
        "--html", metavar="PATH", help="also write a self-contained HTML report with charts"
    )
    report.set_defaults(run=_cmd_report)

    top = sub.add_parser(
        "top",
        help="a live view of a JSON-lines log as it grows (like tail -f), redrawn every second",
    )
    top.add_argument("file", metavar="LOG", help="the JSON-lines log llmguard writes")
    top.add_argument(
        "--interval", default="1", help="seconds between redraws (default 1; 0.5, 2s...)"
    )
    top.add_argument(
        "--window", default="15m", help="the recent minutes shown (default 15m; 90s, 1h...)"
    )
    top.add_argument("--top", type=int, default=5, help="rows per top list (default 5)")
    top.add_argument(
        "--once", action="store_true", help="print the view once, as plain text, and exit"
    )
    top.set_defaults(run=_cmd_top)

    storage_help = "storage URI (default: LLMGUARD_STORAGE, else the local cache folder)"
    budget = sub.add_parser("budget", help="budget ledgers: status and reset")
    budget_sub = budget.add_subparsers(dest="action", metavar="ACTION")
    status = budget_sub.add_parser(
        "status", help="the current window: spend, reservations of calls in flight, what is left"
    )
    status.add_argument("name", nargs="?", help="one budget (default: all)")
    status.add_argument("--key", help="one key of a keyed budget")
    status.add_argument("--storage", help=storage_help)
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(run=_cmd_budget_status)
    reset = budget_sub.add_parser(
        "reset", help="forget a budget's spend (all windows) and its learned cost floors"
    )
    reset.add_argument("name")
    reset.add_argument("--key", help="only this key of a keyed budget")
    reset.add_argument("--storage", help=storage_help)
    reset.set_defaults(run=_cmd_budget_reset)

    cache = sub.add_parser("cache", help="the response cache: stats and clear")
    cache_sub = cache.add_subparsers(dest="action", metavar="ACTION")
    stats = cache_sub.add_parser("stats", help="entries per cached function")
    stats.add_argument("--storage", help=storage_help)
    stats.add_argument("--format", choices=("table", "json"), default="table")
    stats.set_defaults(run=_cmd_cache_stats)
    clear = cache_sub.add_parser("clear", help="delete cache entries")
    clear.add_argument("--function", help="only this function's (module.qualname)")
    clear.add_argument(
        "--namespace", default="default", help="the cache namespace (default 'default')"
    )
    clear.add_argument("--storage", help=storage_help)
    clear.set_defaults(run=_cmd_cache_clear)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._events import configure_logging

    # The command is an application: its own warnings go to stderr, data to stdout.
    configure_logging(json=False, file=_Stderr(), level="WARNING")
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Every command's one error boundary: a line on stderr, never a traceback.

    LLMGuardError (bad settings, a bad argument): exit 2; a storage that cannot be reached or
    used, or a file that cannot be read or written: exit 1, saying which (without passwords);
    output cut short by the reader (``| head``): quiet exit 0. Anything else is a bug: one
    line too, and ``LLMGUARD_DEBUG=1`` shows its traceback.
    """
    uri = getattr(args, "storage", None) or os.environ.get("LLMGUARD_STORAGE")

    def fail(message: str, code: int) -> int:
        print(f"llmguard: {scrub(message, uri)}", file=sys.stderr)
        return code

    try:
        if hasattr(args, "storage"):  # a bad --storage is a usage error, found before opening
            check_storage(args.storage)
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the boundary
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except StorageError as exc:
        return fail(f"storage unavailable: {exc}", EXIT_NOT_FOUND)
    except LLMGuardError as exc:
        return fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(f"{where}{exc.strerror or exc}", EXIT_NOT_FOUND)
    except Exception as exc:
        if os.environ.get("LLMGUARD_DEBUG"):
            raise
        return fail(
            f"unexpected error: {type(exc).__name__}: {exc} (a bug: please report it; "
            "LLMGUARD_DEBUG=1 shows the traceback)",
            EXIT_NOT_FOUND,
        )


def _discard_stdout() -> None:
    """The reader is gone: send what is still buffered nowhere, so exiting stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (e.g. captured by a test)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

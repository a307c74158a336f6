"""The ``llmguard`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ._prices import PerMTok, Tiered, get_price
from ._tokens import count_tokens
from ._version import __version__

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE = 0, 1, 2


def _price_text(value: PerMTok | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, Tiered):
        tiers = ", ".join(f">{start:,}: {price}" for start, price in value.tiers)
        return f"{value.base} ({tiers})"
    return str(value)


def _price_json(value: PerMTok | None) -> Any:
    if value is None:
        return None
    if isinstance(value, Tiered):
        return {
            "base": str(value.base),
            "tiers": [{"above": s, "price": str(p)} for s, p in value.tiers],
        }
    return str(value)


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


def _cmd_tokens(args: argparse.Namespace) -> int:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            print(f"llmguard: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return EXIT_NOT_FOUND
    results = []
    for model in args.model or ["gpt-4o"]:
        tokens = count_tokens(text, model)
        price = get_price(model)
        cost = price.cost(int(tokens), 0) if price is not None else None
        results.append(
            {
                "model": model,
                "tokens": int(tokens),
                "method": tokens.method,
                "estimate": tokens.estimate,
                "input_cost_usd": None
                if cost is None
                else str(cost.normalize() if cost else Decimal(0)),
            }
        )
    if args.format == "json":
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        for r in results:
            cost_text = (
                "price unknown"
                if r["input_cost_usd"] is None
                else f"${r['input_cost_usd']} as input"
            )
            label = " (estimate)" if r["estimate"] else ""
            print(f"{r['model']}: {r['tokens']} tokens{label}, {cost_text}")
    return EXIT_OK


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be swapped, e.g. by tests)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmguard",
        description="Keep LLM API bills and rate-limit errors under control. "
        "Exit codes: 0 success, 1 something asked for was not found, 2 bad usage.",
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

    tokens = sub.add_parser("tokens", help="count the tokens of a text file (or - for stdin)")
    tokens.add_argument("file", metavar="FILE", help="a text file, or - to read standard input")
    tokens.add_argument(
        "--model", action="append", help="model to count for (repeatable; default gpt-4o)"
    )
    tokens.add_argument("--format", choices=("table", "json"), default="table")
    tokens.set_defaults(run=_cmd_tokens)
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
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Money as text: the one place a USD amount becomes a string.

``str(Decimal)`` is exact but not money: ``Decimal("2E+1")`` prints ``2E+1`` and a cost
of 0.00000075 prints ``7.5E-7``. Every repr, message, table and report goes through
:func:`format_usd`; data formats (JSON, CSV) through :func:`decimal_text`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def decimal_text(value: Any) -> str:
    """An exact decimal number without an exponent: ``20``, ``0.00000075``, ``-1.5``.

    For data (JSON, CSV): every digit of the value, nothing added, trailing zeros of the
    fraction dropped. Accepts a Decimal, an int, a float (by its shortest repr) or a numeric
    string.
    """
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if not number.is_finite():
        return str(number)
    text = format(number, "f")  # "f" never uses an exponent and keeps every digit
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def format_usd(value: Any) -> str:
    """A USD amount as money: ``$20.00``, ``$0.00000075``, ``$0.000000000001``, ``-$5.10``.

    At least two decimals, as many as it takes to be exact, never an exponent, the sign
    before the dollar.
    """
    text = decimal_text(value)
    if not text[-1].isdigit():  # NaN, Infinity: not money, but never hidden
        return f"${text}"
    sign = ""
    if text.startswith("-"):
        sign, text = "-", text[1:]
    whole, _, fraction = text.partition(".")
    return f"{sign}${whole}.{fraction.ljust(2, '0')}"

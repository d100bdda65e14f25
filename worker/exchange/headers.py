"""Reading numbers out of the exchange's answer headers, strictly.

A header value is the exchange's (or a proxy's) text: ``str.isdigit`` accepts ``"²"`` and
``"٣"``, which ``int`` then refuses or reads as something else, and ``float`` accepts
``"inf"``, ``"nan"`` and ``"1e9"``. Only ASCII digits are a number here; anything else is
"no value" and the caller falls back to its default.
"""

from __future__ import annotations

import re
from typing import Final

# At most 18 digits: every value fits an int64 and no huge string is ever converted.
_ASCII_DIGITS: Final = re.compile(r"[0-9]{1,18}")


def ascii_int(value: str | None) -> int | None:
    """The value as a non-negative integer when it is 1 to 18 ASCII digits (surrounding
    spaces and tabs allowed), else None."""
    if value is None:
        return None
    text = value.strip(" \t")
    if _ASCII_DIGITS.fullmatch(text) is None:
        return None
    return int(text)

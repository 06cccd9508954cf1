"""JSON from untrusted peers, parsed with bounds on what it may cost, sans-IO.

Python's ``json`` accepts things no client of ours needs and some that hurt: a 5000-digit
integer raises ``ValueError`` from ``int()`` (CPython's digit limit) and a 100k-digit one costs
quadratic time; ``NaN``/``Infinity`` are not JSON at all; nesting is bounded only by the
interpreter's recursion limit. :func:`loads_object` enforces small limits *while* parsing
(number literals are checked before they are converted) and raises :class:`JsonRejected`,
the one exception callers translate into their own error.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deepest nesting of arrays and objects accepted; our messages nest two or three levels.
MAX_DEPTH = 16

#: Most strings, numbers and brackets a message may hold; ours hold a few dozen.
MAX_TOKENS = 4096

#: Longest number literal (characters); a float64 needs at most 24.
MAX_NUMBER_CHARS = 32

#: Longest object key.
MAX_KEY_CHARS = 64

# One string literal, one bracket, or one other value (number, true, false, null). The unrolled
# string form is linear on megabytes of base64, and its closing quote is optional: an unclosed
# string then runs to the end of the text in one match instead of being retried from every
# escaped quote inside it (quadratic: 32 KB of \" took seconds). json.loads rejects it after.
# Brackets inside strings are consumed as part of the string, so depth is exact.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]|[-+.\w]+')


class JsonRejected(ValueError):
    """The text is not JSON this server accepts; the message says why, without quoting it."""


def _check_structure(text: str) -> None:
    depth = 0
    for tokens, match in enumerate(_STRUCTURE.finditer(text), 1):
        if tokens > MAX_TOKENS:
            raise JsonRejected(f"more than {MAX_TOKENS} values")
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise JsonRejected(f"nested deeper than {MAX_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def _number(literal: str) -> str:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonRejected(f"number longer than {MAX_NUMBER_CHARS} characters")
    return literal


def _parse_int(literal: str) -> int:
    return int(_number(literal))


def _parse_float(literal: str) -> float:
    value = float(_number(literal))
    if value in (float("inf"), float("-inf")):  # 1e999 overflows to infinity
        raise JsonRejected("number out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not valid JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if len(key) > MAX_KEY_CHARS:
            raise JsonRejected(f"object key longer than {MAX_KEY_CHARS} characters")
    return dict(pairs)


def loads(text: str | bytes) -> Any:
    """Parse one JSON document within the limits above."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonRejected("not UTF-8") from None
    _check_structure(text)
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_pairs,
        )
    except JsonRejected:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise JsonRejected("not valid JSON") from None


def loads_object(text: str | bytes) -> dict[str, Any]:
    """Parse a JSON object (the only top-level value our protocols use)."""
    value = loads(text)
    if not isinstance(value, dict):
        raise JsonRejected("not a JSON object")
    return value

"""Input checks shared by several domains, beyond what the request schemas can say."""

from __future__ import annotations

from typing import Any

import msgspec

from memos.errors import Invalid

NON_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"
"""A schema pattern for "has a character that is not whitespace", meaning the same in Python and in
JSON Schema's ECMA-262 regex: Python's ``\\s`` also covers U+001C..U+001F and U+0085, ECMA's covers
U+FEFF. With ``\\S`` alone, "\u0085" passed the published schema and was refused by the server."""


def reject_nul(value: Any, field: str) -> None:
    """Postgres stores no NUL character in text or JSON: refuse it up front, naming where it is."""
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid.field(field, "text may not contain the NUL character (\\u0000)")
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_nul(key, field)
            reject_nul(item, f"{field}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            reject_nul(item, f"{field}[{i}]")
    elif isinstance(value, msgspec.Struct):
        reject_nul(msgspec.to_builtins(value), field)

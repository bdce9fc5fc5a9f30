"""Input checks shared by several domains, beyond what the request schemas can say."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import msgspec

from memos.errors import Invalid

NON_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"
"""A schema pattern for "has a character that is not whitespace", meaning the same in Python and in
JSON Schema's ECMA-262 regex: Python's ``\\s`` also covers U+001C..U+001F and U+0085, ECMA's covers
U+FEFF. With ``\\S`` alone, "\u0085" passed the published schema and was refused by the server."""

VISIBLE = (
    r"[^\s\x00-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u2064\u2066-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb]"
)
"""``NON_BLANK``, with control characters and the invisible characters of the Basic Multilingual Plane blank too
(zero-width spaces and joiners, the soft hyphen, direction marks, variation selectors, the Hangul fillers, the blank
braille pattern): for what is read or matched as words (a query, a prompt, a name). A query of "\u200b" was
searched, and graph mode answered arbitrary memories at score 1.0 (found in review). It is a schema pattern, a
character class Python and JSON Schema read alike, so it stops at the BMP: the invisible characters beyond it (tag
characters, musical formatting) still count. A memory's content keeps ``NON_BLANK``: it is stored as written."""

# msgspec tests a pattern with re.search, whose `$` also matches before a trailing newline: "next\n" passed and was
# stored as a link type. The lookahead refuses it (and means nothing to a JavaScript reader of the schema).
LINK_TYPE = r"^[A-Za-z][A-Za-z0-9_.:-]*(?!\n)$"


def unique_tags(tags: Sequence[str]) -> list[str]:
    """``tags`` in Unicode's composed form (NFC), without repeats, in first-seen order: as written to a memory
    and as a filter reads them. Tags are a set in meaning, and a stored repeat showed in every version, export
    and list; "café" typed composed and "café" typed decomposed look the same and were two tags, each finding
    only itself (found by a new user). Applied after the input checks, so a field path names the tag as sent."""
    return list(dict.fromkeys(unicodedata.normalize("NFC", tag) for tag in tags))


MAX_JSON_DEPTH = 32
"""How deep free-form JSON (memory and cube metadata, search filters, cache categories) may nest objects and
arrays, the value itself counting as one level. Far past any real use: metadata ~960 deep parsed, then
exhausted Python's stack while it was encoded for Postgres (a 500 inside the write's transaction)."""


def reject_nul(value: Any, field: str, *, limit_depth: bool = True) -> None:
    """Refuse, naming where it is, what memos does not store: the NUL character (Postgres stores none in text
    or JSON), and objects or arrays nested more than ``MAX_JSON_DEPTH`` levels deep (unless not
    ``limit_depth``). One walk does both, and it stops at the limit, so a value too deep for the walk itself
    is refused too."""
    _walk(value, field, MAX_JSON_DEPTH if limit_depth else None)


def _walk(value: Any, field: str, levels_left: int | None) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid.field(field, "text may not contain the NUL character (\\u0000)")
        return
    if isinstance(value, msgspec.Struct):
        _walk(msgspec.to_builtins(value), field, levels_left)
        return
    if not isinstance(value, dict | list | tuple):
        return
    if levels_left is not None:
        if levels_left < 1:
            raise Invalid.field(field, f"nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
        levels_left -= 1
    if isinstance(value, dict):
        for key, item in value.items():
            _walk(key, field, None)
            _walk(item, f"{field}.{key}", levels_left)
    else:
        for i, item in enumerate(value):
            _walk(item, f"{field}[{i}]", levels_left)


def same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value. Python's ``==`` has ``True == 1`` (and ``False == 0``): a
    PATCH from ``{"flag": 1}`` to ``{"flag": true}`` was taken for no change, answered 200 and wrote nothing, and a
    filter on the new value then missed the memory (found in a data-integrity review). Numbers compare by value,
    as JSON and jsonb do (1 and 1.0 are one number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_json, a, b))
    return bool(a == b)


BLANK_MESSAGE = "must contain a character that is neither a space nor invisible"

_VISIBLE = re.compile(VISIBLE)


def is_blank(text: str) -> bool:
    """Whether ``text`` has no character ``VISIBLE`` counts (the rule the published schemas state)."""
    return _VISIBLE.search(text) is None

"""What of a memory gets embedded, and its event time: one definition for every write path."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from memos.errors import Invalid
from memos.graph.timeparse import MAX_LENGTH as MAX_TIME_LENGTH
from memos.graph.timeparse import parse_event_time


def embedding_text(kind: str, content: str, metadata: dict[str, Any]) -> str:
    """The text whose embedding represents the memory.

    A cached response is found by its query; a plaintext memory by what was said, with the speaker in
    front (questions name people: "What did Caroline research?").
    """
    if kind == "response":
        return str(metadata.get("query") or content)
    speaker = metadata.get("speaker")
    if isinstance(speaker, str) and speaker.strip():
        return f"{speaker.strip()}: {content}"
    return content


def event_time(metadata: dict[str, Any], field: str = "metadata.time") -> datetime | None:
    """``metadata.time`` normalized to UTC; a value memos cannot read is a 422 naming the field."""
    raw = metadata.get("time")
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise Invalid.field(field, "a time must be a string (RFC 3339 or a date like '8 May, 2023')")
    if len(raw) > MAX_TIME_LENGTH:  # as sent, spaces included; and the message does not echo it
        raise Invalid.field(field, f"a time is at most {MAX_TIME_LENGTH} characters, got {len(raw)}")
    parsed = parse_event_time(raw)
    if parsed is None:
        raise Invalid.field(field, f"cannot read {raw!r} as a date or time")
    return parsed

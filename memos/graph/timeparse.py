"""Reads the event times users write ("1:56 pm on 8 May, 2023", "8 May 2023", RFC 3339) as aware UTC datetimes."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo

from memos.graph._calendar import MONTH_NAMES, MONTH_PATTERN, MONTHS, WEEKDAY_ABBREVIATED_PATTERN, WEEKDAYS

MAX_LENGTH = 120
"""The longest time text read, counted as sent: longer is prose, not a time, and refusing it keeps the regexes
cheap. Counted before whitespace is collapsed, or 10,000 spaces and a date passed (and were parsed)."""

_TIME = re.compile(
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?(?::(?P<second>\d{2}))?\s*(?P<ampm>[ap])\.?\s?m\.?"
    r"|(?P<hour24>\d{1,2}):(?P<minute24>\d{2})(?::(?P<second24>\d{2}))?"
)
_TIME_FIRST = re.compile(rf"^(?P<time>{_TIME.pattern})\s+(?:on\s+)?(?P<rest>.+)$")
_TIME_LAST = re.compile(rf"^(?P<rest>.+?)\s+(?:at\s+)?(?P<time>{_TIME.pattern})$")
_DAY = r"(?P<day>\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>\d{4})"
_MONTH = rf"(?P<month>{MONTH_PATTERN})\.?"
_DATES = [
    re.compile(rf"^{_DAY}\s+(?:of\s+)?{_MONTH}\s+{_YEAR}$"),  # 8 May 2023
    re.compile(rf"^{_MONTH}\s+{_DAY}\s+{_YEAR}$"),  # May 8 2023
    re.compile(rf"^{_YEAR}\s+{_MONTH}\s+{_DAY}$"),  # 2023 May 8
    # 2023/05/08, and 2023-05-08 when a zone suffix kept the ISO parse from reading it ("2023-05-08 UTC")
    re.compile(r"^(?P<year>\d{4})(?P<sep>[/.-])(?P<mnum>\d{1,2})(?P=sep)(?P<day>\d{1,2})$"),
    re.compile(rf"^{_MONTH}\s+{_YEAR}$"),  # May 2023 -> the 1st
    re.compile(r"^(?P<year>\d{4})-(?P<mnum>\d{2})$"),  # 2023-05 -> the 1st
]
_WEEKDAY_PREFIX = re.compile(rf"^{WEEKDAY_ABBREVIATED_PATTERN}\.?\s+(?:the\s+)?", re.IGNORECASE)
_TZ_SUFFIX = re.compile(r"\s*(?:(?P<utc>utc|gmt|z)|(?P<sign>[+-])(?P<hh>\d{2}):?(?P<mm>\d{2}))$")


def parse_event_time(value: str, *, assume: tzinfo = UTC) -> datetime | None:
    """``value`` as an aware datetime in UTC, or ``None`` when it is not a date or time memos can read.

    Accepts RFC 3339 / ISO 8601 ("2023-05-08T13:56:00+02:00", "2023-05-08"), the LoCoMo style
    "1:56 pm on 8 May, 2023", "May 8th, 2023 at 13:56", an optional leading weekday, and a month
    with a year ("May 2023", meaning its first day). A time without a zone is taken in ``assume``;
    a date without a time is midnight. Relative phrases ("yesterday") are refused: they need a
    reference point the caller has and this function does not.
    """
    if len(value) > MAX_LENGTH:
        return None
    text = " ".join(value.split())
    if not text:
        return None
    iso = _parse_iso(text)
    if iso is not None:
        return _to_utc(iso, assume)

    lowered = text.lower().replace(",", " ")
    lowered = " ".join(lowered.split())
    zone: tzinfo = assume
    tz_match = _TZ_SUFFIX.search(lowered)
    if tz_match and tz_match.start() > 0:
        parsed_zone = _zone(tz_match)
        if parsed_zone is None:
            return None
        zone = parsed_zone
        lowered = lowered[: tz_match.start()].rstrip()
        # An ISO date-time with a zone word after it ("2023-05-08T13:56:00 UTC"); one carrying an offset
        # of its own as well names two zones, and is refused.
        iso = _parse_iso(lowered)
        if iso is not None:
            return _to_utc(iso, zone) if iso.tzinfo is None else None

    clock: time | None = None
    for pattern in (_TIME_FIRST, _TIME_LAST):
        match = pattern.match(lowered)
        if match is None:
            continue
        parsed_clock = _clock(match.group("time"))
        if parsed_clock is not None:
            clock = parsed_clock
            lowered = match.group("rest")
            break
    day = _date(lowered)
    if day is None:
        return None
    return _to_utc(datetime.combine(day, clock or time(0, 0)), zone)


def format_event_time(moment: datetime) -> str:
    """A human form for indexed text ("Monday 8 May 2023, 13:56 UTC"); the clock is left out at midnight."""
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    day = f"{WEEKDAYS[utc.weekday()].title()} {utc.day} {MONTH_NAMES[utc.month - 1].title()} {utc.year}"
    if (utc.hour, utc.minute, utc.second) == (0, 0, 0):
        return day
    return f"{day}, {utc:%H:%M} UTC"


def _parse_iso(text: str) -> datetime | None:
    if not text[:4].isdigit():
        return None
    try:
        return datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None


def _to_utc(moment: datetime, assume: tzinfo) -> datetime | None:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=assume)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 pushed out of range by the offset
        return None


def _zone(match: re.Match[str]) -> tzinfo | None:
    """The zone a suffix names; None for an offset no clock has ("+99:00", "+9999"), which timezone()
    refuses with a ValueError (an offset must be under 24 hours) that surfaced as a 500."""
    if match.group("utc"):
        return UTC
    hours, minutes = int(match.group("hh")), int(match.group("mm"))
    if hours > 23 or minutes > 59:
        return None
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if match.group("sign") == "-" else offset)


def _clock(text: str) -> time | None:
    match = _TIME.fullmatch(text)
    if match is None:
        return None
    if match.group("hour24") is not None:
        hour, minute, second = int(match.group("hour24")), int(match.group("minute24")), match.group("second24")
    else:
        hour, minute, second = int(match.group("hour")), int(match.group("minute") or 0), match.group("second")
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if match.group("ampm") == "p" else 0)
    sec = int(second or 0)
    if hour > 23 or minute > 59 or sec > 59:
        return None
    return time(hour, minute, sec)


def _date(text: str) -> date | None:
    text = _WEEKDAY_PREFIX.sub("", text).strip()
    for pattern in _DATES:
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        month = MONTHS.get(groups["month"]) if groups.get("month") else int(groups["mnum"])
        if month is None:
            return None
        try:
            return date(int(groups["year"]), month, int(groups.get("day") or 1))
        except ValueError:  # 31 February and the like
            return None
    return None

"""A light, deterministic entity extractor (pure regex, no model): proper names, dates and numbers with units.

Keys are normalized and lowercase so that "8 May, 2023" and "May 8th 2023" meet at one key ("2023-05-08").
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Container
from enum import StrEnum

from memos.graph._calendar import MONTH_NAMES, MONTH_PATTERN, MONTHS, WEEKDAY_PATTERN, WEEKDAYS


class EntityKind(StrEnum):
    NAME = "name"
    DATE = "date"
    NUMBER = "number"


@dataclasses.dataclass(frozen=True, slots=True)
class Entity:
    key: str
    """Normalized lowercase key: "caroline", "new york", "2023-05-08", "may 8", "2023-05", "friday", "5 km"."""
    kind: EntityKind
    text: str
    """The first surface form found, as written."""
    start: int
    """Offset of that surface form in the text."""


_MAX_TEXT = 100_000  # longer texts are cut: extraction must stay cheap on every write
MAX_KEYS = 64
"""Entity keys a memory gives the graph: its first ones, in order of appearance. Each key is an edge that every
graph search reaching the memory scans, and a graph's memory grows with them: 300 memories of "0 km 1 km 2 km
..." (12,000 keys each) made one graph search hold the event loop 1-3 s and the graph take 500 MB (found in
review). A LoCoMo turn has at most 6."""

# -- dates ----------------------------------------------------------------------------------

_M = rf"(?P<month>{MONTH_PATTERN})\.?"
_D = r"(?P<day>[0-3]?\d)(?:st|nd|rd|th)?"
_Y = r"(?P<year>(?:1[6-9]|20|21)\d\d)"
_BARE_MONTHS = (
    "Jan(?:uary)?|Feb(?:ruary)?|Apr(?:il)?|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?"
    "|Nov(?:ember)?|Dec(?:ember)?|January|February|April|June|July|August|September|October|November|December"
)
_WEEKDAY_ABBREVIATIONS = "Mon|Tues?|Wed|Thu(?:rs?)?|Fri|Sat|Sun"
_WEEKDAY_FULL = {day[:3]: day for day in WEEKDAYS}
_TIME_WORDS = "in|since|until|till|by|during|last|next|this|early|late|mid|of|from|to|through"
_DATE_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(?P<year>\d{4})-(?P<mnum>[01]\d)-(?P<day>[0-3]\d)\b"), "ymd"),
    (re.compile(rf"\b{_D}\s+(?:of\s+)?{_M},?\s+{_Y}\b", re.IGNORECASE), "ymd"),
    (re.compile(rf"\b{_M}\s+{_D},?\s+{_Y}\b", re.IGNORECASE), "ymd"),
    (re.compile(rf"\b{_D}\s+(?:of\s+)?{_M}\b(?!\s*\d)", re.IGNORECASE), "md"),
    (re.compile(rf"\b{_M}\s+{_D}\b(?![\d:])", re.IGNORECASE), "md"),
    (re.compile(rf"\b{_M},?\s+{_Y}\b", re.IGNORECASE), "ym"),
    (re.compile(r"\b(?P<year>\d{4})-(?P<mnum>[01]\d)\b(?!-)"), "ym"),
    (re.compile(rf"\b(?P<weekday>{WEEKDAY_PATTERN})s?\b", re.IGNORECASE), "weekday"),
    # Abbreviated weekdays are also words ("Sun", "Wed"): only capitalized and after a time word.
    (re.compile(rf"(?i:\b(?:{_TIME_WORDS}|on|every)\s+)(?P<weekday>{_WEEKDAY_ABBREVIATIONS})\b\.?"), "weekday"),
    # A bare month name counts only capitalized ("in June"), and "May"/"March" only after a time
    # word, since both are also common words ("May I ask?", "the march").
    (re.compile(rf"(?<![\w-])(?P<month>{_BARE_MONTHS})\b"), "m"),
    (re.compile(rf"\b(?:{_TIME_WORDS})[\s-]+(?P<month>May|March|Mar)\b", re.IGNORECASE), "m"),
]
# A bare year is tried last, after numbers with units, so "2000 miles" stays a distance.
_YEAR_RULE = re.compile(r"(?<![\d.,$€£-])(?P<year>(?:1[6-9]|20|21)\d\d)(?![\d%]|[.,]\d|\s?(?:am|pm)\b)")

# -- numbers with units -----------------------------------------------------------------------

_UNITS: dict[str, str] = {
    **dict.fromkeys(["%", "percent", "per cent", "pct"], "%"),
    **dict.fromkeys(["km", "kms", "kilometer", "kilometers", "kilometre", "kilometres", "k"], "km"),
    **dict.fromkeys(["mi", "mile", "miles"], "mi"),
    **dict.fromkeys(["m", "meter", "meters", "metre", "metres"], "m"),
    **dict.fromkeys(["cm", "centimeter", "centimeters", "centimetre", "centimetres"], "cm"),
    **dict.fromkeys(["ft", "foot", "feet"], "ft"),
    **dict.fromkeys(["kg", "kgs", "kilo", "kilos", "kilogram", "kilograms"], "kg"),
    **dict.fromkeys(["lb", "lbs", "pound", "pounds"], "lb"),
    **dict.fromkeys(["g", "gram", "grams"], "g"),
    **dict.fromkeys(["l", "liter", "liters", "litre", "litres"], "l"),
    **dict.fromkeys(["h", "hr", "hrs", "hour", "hours"], "hours"),
    **dict.fromkeys(["min", "mins", "minute", "minutes"], "minutes"),
    **dict.fromkeys(["sec", "secs", "second", "seconds"], "seconds"),
    **dict.fromkeys(["day", "days"], "days"),
    **dict.fromkeys(["week", "weeks"], "weeks"),
    **dict.fromkeys(["month", "months"], "months"),
    **dict.fromkeys(["yr", "yrs", "year", "years"], "years"),
    **dict.fromkeys(["dollar", "dollars", "usd", "bucks"], "usd"),
    **dict.fromkeys(["euro", "euros", "eur"], "eur"),
    **dict.fromkeys(["gb", "gigabyte", "gigabytes"], "gb"),
    **dict.fromkeys(["mb", "megabyte", "megabytes"], "mb"),
    **dict.fromkeys(["°c", "°f", "degrees"], "degrees"),
}
_CURRENCY = {"$": "usd", "€": "eur", "£": "gbp"}
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
    )
}
# A thousands-separated number starts at its first group, never right after a digit and a comma: tried
# from inside "1,000,000,…" it would rescan the rest of the run from every group (quadratic in the run).
_NUM = r"(?P<num>(?<!\d,)\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|" + "|".join(_NUMBER_WORDS) + r")"
_UNIT_ALT = "|".join(sorted((re.escape(u) for u in _UNITS), key=len, reverse=True))
_NUMBER_RULES: list[re.Pattern[str]] = [
    re.compile(r"(?P<cur>[$€£])\s?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?P<scale>[kKmM]|bn)?\b"),
    re.compile(rf"(?<![\w.]){_NUM}(?:\s?|-)(?P<unit>{_UNIT_ALT})(?![\w°])", re.IGNORECASE),
]

# -- proper names ---------------------------------------------------------------------------


def _wordlist(text: str) -> frozenset[str]:
    """A word list written as a block of text (easier to read and extend than a literal of 150 strings)."""
    return frozenset(text.split())


_WORD = re.compile(r"[^\W\d_](?:[\w'\u2019-]*\w)?")
_SENTENCE_END = re.compile(r"[.!?;:\"“”()\[\]\n]")
_CONNECTORS = frozenset({"of", "de", "da", "del", "van", "von", "la", "le", "du", "der", "den"})
_NAME_STOPWORDS = _wordlist(
    """
    i i'm i've i'd i'll im ive me my mine myself we we're we've our ours us you you're you've your yours
    he he's him his she she's her hers it it's its they they're they've them their theirs a an the this
    that these those there here then than hi hey hello hiya yo oh ooh ah aw aww wow whoa yes yeah yep
    yup no nope nah ok okay sure well so and but or nor if when what whatever why how who whom whose
    where which while though although because since until after before during just also really very too
    great awesome amazing cool nice sorry please thanks thank good bad glad haha lol omg congrats
    congratulations definitely absolutely totally maybe perhaps anyway btw guess agreed exactly true
    right wait look listen let let's mr mrs ms dr prof sir madam miss st is are was were be been am do
    does did have has had can could will would shall should may might must not all any some each every
    both either neither many much more most other another such today tomorrow yesterday tonight morning
    afternoon evening night weekend bye goodbye woohoo yay hooray hmm um uh now anything everything
    something nothing everyone someone anyone everybody somebody nobody happy hope love lots super same
    wishing cheers welcome tbh lmao xoxo kinda gonna wanna
    """
)
"""Capitalized words that are not names (lowercased); a run is trimmed of them at both ends."""


def extract_entities(text: str, *, known: Container[str] = frozenset()) -> list[Entity]:
    """Entities of ``text`` in order of first appearance, one per key.

    A capitalized run at the start of a sentence is taken as a name only if it also appears
    capitalized elsewhere in the text, its key is in ``known`` (e.g. the entities a graph already
    holds), or it is a speaker label ("Caroline: ..."); elsewhere a capitalized run is a name unless
    it is only stopwords.
    """
    text = text[:_MAX_TEXT]
    found: dict[str, Entity] = {}
    taken = bytearray(len(text))  # characters already claimed by a date or number

    def add(key: str, kind: EntityKind, start: int, end: int) -> None:
        taken[start:end] = b"\x01" * (end - start)
        if key and key not in found:
            found[key] = Entity(key, kind, text[start:end], start)

    for pattern, form in _DATE_RULES:
        for match in pattern.finditer(text):
            if any(taken[match.start() : match.end()]):
                continue
            key = _date_key(match, form)
            if key is not None:
                add(key, EntityKind.DATE, match.start(), match.end())
    for pattern in _NUMBER_RULES:
        for match in pattern.finditer(text):
            if not any(taken[match.start() : match.end()]):
                add(_number_key(match), EntityKind.NUMBER, match.start(), match.end())
    for match in _YEAR_RULE.finditer(text):
        if not any(taken[match.start() : match.end()]):
            add(match.group("year"), EntityKind.DATE, match.start(), match.end())
    for key, start, end in _names(text, taken, known):
        add(key, EntityKind.NAME, start, end)
    return sorted(found.values(), key=lambda entity: entity.start)


def entity_keys(text: str, *, known: Container[str] = frozenset()) -> list[str]:
    """The keys of :func:`extract_entities`, in order: the first ``MAX_KEYS``, what the graph takes.

    Of the NFKC form, as search and the embedder read text: full-width digits and letters meet their plain keys.
    Here and not in :func:`extract_entities`, whose offsets and surface forms index the text it is given (the
    semantic cache's guards read them against their own text).
    """
    normalized = unicodedata.normalize("NFKC", text[:_MAX_TEXT])
    return [entity.key for entity in extract_entities(normalized, known=known)[:MAX_KEYS]]


def _date_key(match: re.Match[str], form: str) -> str | None:
    groups = match.groupdict()
    if form == "weekday":
        return _WEEKDAY_FULL[groups["weekday"][:3].lower()]
    month = MONTHS.get(groups["month"].lower().rstrip(".")) if groups.get("month") else int(groups["mnum"])
    if month is None or not 1 <= month <= 12:
        return None
    if form == "m":
        return _MONTH_KEYS[month]
    if form == "ym":
        return f"{groups['year']}-{month:02d}"
    day = int(groups["day"])
    if not 1 <= day <= 31:
        return None
    if form == "md":
        return f"{_MONTH_KEYS[month]} {day}"
    return f"{groups['year']}-{month:02d}-{day:02d}"


_MONTH_KEYS = dict(enumerate(MONTH_NAMES, start=1))


def _number_key(match: re.Match[str]) -> str:
    groups = match.groupdict()
    raw = groups["num"].lower().replace(",", "")
    number = _NUMBER_WORDS.get(raw, raw)
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if groups.get("cur"):
        scale = {"k": "000", "m": "000000", "bn": "000000000"}.get((groups.get("scale") or "").lower(), "")
        if scale and "." not in number:
            number += scale
        return f"{number} {_CURRENCY[groups['cur']]}"
    unit = _UNITS[groups["unit"].lower()]
    return f"{number}%" if unit == "%" else f"{number} {unit}"


def _names(text: str, taken: bytearray, known: Container[str]) -> list[tuple[str, int, int]]:
    words: list[tuple[str, int, int, bool]] = []  # (word, start, end, starts a sentence)
    boundary = 0
    sentence_start = True
    for match in _WORD.finditer(text):
        if _SENTENCE_END.search(text, boundary, match.start()):
            sentence_start = True
        boundary = match.end()
        if any(taken[match.start() : match.end()]):
            words.append(("", match.start(), match.end(), False))  # a date or number breaks a name run
            sentence_start = False
            continue
        words.append((match.group(), match.start(), match.end(), sentence_start))
        sentence_start = False

    capitalized = Counter(_strip(w) for w, _, _, _ in words if _is_capital(w))
    runs: list[list[tuple[str, int, int, bool]]] = []
    current: list[tuple[str, int, int, bool]] = []
    for i, item in enumerate(words):
        word, start, _, starts = item
        # A run continues over plain spaces only: "Sweden, Caroline" are two names.
        joined = bool(current) and not starts and text[current[-1][2] : start].isspace()
        nxt = words[i + 1] if i + 1 < len(words) else ("", 0, 0, True)
        # "Bank of America": a connector joins a run only when a capitalized word follows it.
        connects = word.lower() in _CONNECTORS and _is_capital(nxt[0]) and text[item[2] : nxt[1]].isspace()
        if joined and (_is_capital(word) or connects):
            current.append(item)
        else:
            if current:
                runs.append(current)
            current = [item] if _is_capital(word) else []
    if current:
        runs.append(current)

    out: list[tuple[str, int, int]] = []
    for whole in runs:
        # Trimmed by moving two indices, then sliced once: slicing at each step would make a long run of
        # stopwords ("I I I ...") quadratic.
        first, last = 0, len(whole)
        while first < last and _trimmed(whole[first][0]):
            first += 1
        while last > first and _trimmed(whole[last - 1][0]):
            last -= 1
        if first == last:
            continue
        run = whole[first:last]
        key = " ".join(_strip(w) for w, _, _, _ in run)
        if len(key) < 2:
            continue
        start, end = run[0][1], run[-1][2]
        if run[0][3]:
            speaker_label = start == 0 and text[end : end + 1] == ":"
            repeated = all(capitalized[_strip(w)] > 1 for w, _, _, _ in run)
            if not (speaker_label or repeated or key in known or len(run) > 1):
                continue
        out.append((key, start, end))
    return out


def _trimmed(word: str) -> bool:
    """Whether a run loses this word at either end: a stopword or a connector."""
    return _strip(word) in _NAME_STOPWORDS or word.lower() in _CONNECTORS


def _is_capital(word: str) -> bool:
    return bool(word) and word[0].isupper()


def _strip(word: str) -> str:
    """Lowercase, without a possessive ("Caroline's" -> "caroline")."""
    lowered = word.lower().replace("\u2019", "'")
    return lowered[:-2] if lowered.endswith("'s") else lowered

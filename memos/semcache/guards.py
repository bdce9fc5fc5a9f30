"""Deterministic guards: does a cached query ask the same thing as a new one, beyond looking alike?

An embedding puts "Cancel my subscription" and "Don't cancel my subscription" next to each other,
and "the Pro plan for 5 users" next to "for 50 users". Each guard here compares one kind of fact the
two queries state (polarity, numbers, dates, names, scope, direction, the words that differ) and
returns ``None`` when they agree or a short reason when they do not. Everything is pure Python and
regular expressions: :func:`analyze` reads a query once (memoized) in tens of microseconds and a
comparison costs a few microseconds, so the guards run on every candidate of every lookup.

The guards are general rules, not lists of known trap sentences. They err on the side of a miss:
a rejected paraphrase costs one model call, a served wrong answer costs trust.
"""

from __future__ import annotations

import decimal
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

from memos.graph._calendar import MONTH_NAMES, WEEKDAYS
from memos.graph.entities import EntityKind, extract_entities
from memos.semcache.lexicon import (
    ANTONYM_PAIRS,
    COMPARATIVE_PREPOSITIONS,
    FILLERS,
    NEGATIVE_PREFIXES,
    NEGATORS,
    OPPOSED_PARTICLES,
    OPPOSED_PREFIXES,
    REASON_MARKERS,
    SCOPE_POLES,
    STOPWORDS,
    SYNONYMS,
    stem,
    words,
)

__all__ = [
    "GUARDS",
    "GUARD_NAMES",
    "Guard",
    "QueryFacts",
    "analyze",
    "check",
    "check_all",
    "similar_words",
]

# -- normalization ----------------------------------------------------------------------------------

_TRANSLATE = str.maketrans(
    {
        "\u2019": "'",
        "\u2018": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",  # the minus sign: "\u22125 degrees" is -5 (found in review)
        "\u00a0": " ",
    }
)
_CONTRACTIONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), repl)
    for pattern, repl in (
        (r"\bcan'?t\b", "can not"),
        (r"\bcannot\b", "can not"),
        (r"\bwon'?t\b", "will not"),
        (r"\bshan'?t\b", "shall not"),
        (r"\bain'?t\b", "is not"),
        (r"\b(\w+)n't\b", r"\1 not"),
        # the apostrophe-less spellings people type ("dont", "isnt"): "cant" and "wont" are words, left alone
        (r"\b(do|does|did|is|are|was|were|have|has|had|should|would|could|must|need)nt\b", r"\1 not"),
        (r"\b(what|who|where|when|how|it|that|there|here)'?s\b(?!\s+(?:been|got)\b)", r"\1 is"),
        (r"'re\b", " are"),
        (r"'ve\b", " have"),
        (r"'ll\b", " will"),
        (r"'d\b", " would"),
        (r"\bi'?m\b", "i am"),
        # phrasal verbs that mean one word: "turn on dark mode" asks what "enable dark mode" asks
        (r"\b(?:turn|switch)(?:s|ed|ing)?\s+on\b", "enable"),
        (r"\b(?:turn|switch)(?:s|ed|ing)?\s+off\b", "disable"),
    )
)
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

MAX_SPELLING_LETTERS = 40
"""Longer tokens (a hash, a pasted blob) are never spellings of one another: only equal ones match.

The edit distance is quadratic in the word's length, and a lookup may send 8,000 letters in one token.
"""
PAIRING_BUDGET = 1024
"""Most (only-in-one x only-in-other) word pairs :func:`wording_guard` tries to pair off as spellings.

Past it the two texts differ in dozens of words each, far more than the guard's few: it leaves them to
the threshold without the quadratic pairing (a lookup's 8,000-character query took seconds).
"""
SURFACE_BUDGET = 200 * 200
"""Most token pairs :func:`wording_guard`'s shape comparison (a quadratic ``SequenceMatcher``) may cost."""


def _normalize(text: str) -> str:
    # line breaks survive: in a conversation they end a turn, which the name reader needs to know
    out = "\n".join(" ".join(line.split()) for line in text.translate(_TRANSLATE).splitlines() if line.strip())
    for pattern, repl in _CONTRACTIONS:
        out = pattern.sub(repl, out)
    return out


def similar_words(a: str, b: str) -> bool:
    """True when two stems are spellings of one word: a typo, a British/American spelling, an inflection.

    Damerau-Levenshtein distance 1 for words of 4+ letters, 2 for 7+ letters, or a long shared
    prefix ("agent"/"agency"). A negative prefix ("lock"/"unlock"), another first letter ("lend"/"send") and
    two letters inserted together inside a word ("prednisone"/"prednisolone") never count as a spelling.
    """
    if a == b:
        return True
    if min(len(a), len(b)) < 4 or max(len(a), len(b)) > MAX_SPELLING_LETTERS:
        return False
    if a[:4] != b[:4] and abs(len(a) - len(b)) > 2:
        return False  # every rule below needs a shared 4-letter prefix or lengths within the edit limit
    if _prefixed_opposites(a, b):
        return False
    if _other_word(a, b):
        return False
    prefix = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        prefix += 1
    if prefix >= max(4, int(0.75 * min(len(a), len(b)) + 0.5)) and abs(len(a) - len(b)) <= 3:
        return True
    if prefix == min(len(a), len(b)) >= 4:  # "form"/"formation", "deliver"/"delivery"
        return True
    limit = 2 if min(len(a), len(b)) >= 7 else 1
    return abs(len(a) - len(b)) <= limit and _damerau(a, b, limit) <= limit


_KEY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEXT_KEYS = {
    key: {row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)}
    | {other[j] for other in _KEY_ROWS if other is not row for j in (i - 1, i, i + 1) if 0 <= j < len(other)}
    for row in _KEY_ROWS
    for i, key in enumerate(row)
}
"""The keys around each letter's (QWERTY, rows taken as aligned): a first letter one key off is a slip."""


def _other_word(a: str, b: str) -> bool:
    """Edits that make another word far more often than they are a slip of the keys: another first letter, not
    one key away ("lend"/"send", "height"/"weight"; "xancel"/"cancel" is a slip), or two letters together inside a
    word of 7+ letters, not at its end and not a doubled letter ("prednisone"/"prednisolone", "content"/"continent",
    "conversion"/"conversation"; "jewellery"/"jewelry" is a spelling). Within the edit limit, they were taken for
    spellings of one word (a review); a suffix ("abuse"/"abusive") still is one."""
    if a[0] != b[0] and a[1:] == b[1:]:
        return b[0] not in _NEXT_KEYS.get(a[0], ())
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    if len(long_) - len(short) != 2 or len(short) < 7:
        return False
    # the two letters start after the first and leave at least two after them: "abus(iv)e" is a suffix's change
    return any(long_[:i] + long_[i + 2 :] == short and long_[i] != long_[i - 1] for i in range(1, len(long_) - 3))


def _damerau(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance, stopping early once it exceeds ``limit``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _prefixed_opposites(a: str, b: str) -> bool:
    """``a`` and ``b`` are one stem with and without a negative prefix, or with opposed prefixes."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for prefix in NEGATIVE_PREFIXES:
        if long_ == prefix + short and len(short) >= 3:
            return True
    for left, right in OPPOSED_PREFIXES:
        for x, y in ((a, b), (b, a)):
            if x.startswith(left) and y.startswith(right) and x[len(left) :] == y[len(right) :] and len(x) > 4:
                return True
    return False


# -- numbers and times ------------------------------------------------------------------------------

_SMALL = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate(["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"])
    if i >= 2
}
_ORDINALS = {
    w: i
    for i, w in enumerate(
        [
            "_",
            "first",
            "second",
            "third",
            "fourth",
            "fifth",
            "sixth",
            "seventh",
            "eighth",
            "ninth",
            "tenth",
            "eleventh",
            "twelfth",
        ],
        start=0,
    )
    if i
}
_NUMBER_WORD = (
    r"(?:(?:" + "|".join(_TENS) + r")(?:[\s-](?:" + "|".join(w for w in _SMALL if _SMALL[w] < 10) + r"))?"
    r"|" + "|".join(sorted(_SMALL, key=len, reverse=True)) + r")"
)
_UNIT_FAMILIES: dict[str, str] = {
    **dict.fromkeys(["%", "percent", "per", "cent", "pct"], "%"),
    **dict.fromkeys(["kg", "kgs", "kilo", "kilos", "kilogram", "kilograms", "kilogramme", "kilogrammes"], "kg"),
    **dict.fromkeys(["g", "gram", "grams", "gramme", "grammes"], "g"),
    **dict.fromkeys(["lb", "lbs"], "lb"),
    **dict.fromkeys(["pound", "pounds"], "pound"),
    **dict.fromkeys(["quid", "gbp"], "gbp"),
    **dict.fromkeys(["dollar", "dollars", "usd", "bucks"], "usd"),
    **dict.fromkeys(["euro", "euros", "eur"], "eur"),
    **dict.fromkeys(["rupee", "rupees", "inr", "rs"], "inr"),
    **dict.fromkeys(["km", "kms", "kilometer", "kilometers", "kilometre", "kilometres"], "km"),
    **dict.fromkeys(["mi", "mile", "miles"], "mi"),
    **dict.fromkeys(["m", "meter", "meters", "metre", "metres"], "m"),
    **dict.fromkeys(["cm", "centimeter", "centimeters", "centimetre", "centimetres"], "cm"),
    **dict.fromkeys(["mm", "millimeter", "millimeters", "millimetre", "millimetres"], "mm"),
    **dict.fromkeys(["ft", "foot", "feet"], "ft"),
    **dict.fromkeys(["inch", "inches"], "in"),
    **dict.fromkeys(["ml", "millilitre", "millilitres", "milliliter", "milliliters"], "ml"),
    **dict.fromkeys(["l", "litre", "litres", "liter", "liters"], "l"),
    **dict.fromkeys(["gb", "gig", "gigs", "gigabyte", "gigabytes"], "gb"),
    **dict.fromkeys(["mb", "megabyte", "megabytes"], "mb"),
    **dict.fromkeys(["tb", "terabyte", "terabytes"], "tb"),
    **dict.fromkeys(["kwh"], "kwh"),
    **dict.fromkeys(["kw"], "kw"),
    **dict.fromkeys(["mph", "kph"], "speed"),
    **dict.fromkeys(["s", "sec", "secs", "second", "seconds"], "second"),
    **dict.fromkeys(["min", "mins", "minute", "minutes"], "minute"),
    **dict.fromkeys(["h", "hr", "hrs", "hour", "hours"], "hour"),
    **dict.fromkeys(["day", "days"], "day"),
    **dict.fromkeys(["night", "nights"], "night"),
    **dict.fromkeys(["week", "weeks"], "week"),
    **dict.fromkeys(["month", "months"], "month"),
    **dict.fromkeys(["yr", "yrs", "year", "years"], "year"),
    # Temperatures, doses and kitchen measures: "38°C" against "38°F", "400 mg" against "400 g" were hits (a review).
    # A one-letter "c" or "f" is a unit only touching its number ("180C"), as every one-letter unit.
    **dict.fromkeys(["°c", "c", "celsius", "centigrade"], "celsius"),
    **dict.fromkeys(["°f", "f", "fahrenheit"], "fahrenheit"),
    **dict.fromkeys(["mg", "milligram", "milligrams", "milligramme", "milligrammes"], "mg"),
    **dict.fromkeys(["mcg", "µg", "μg", "microgram", "micrograms"], "mcg"),
    **dict.fromkeys(["oz", "ounce", "ounces"], "oz"),
    **dict.fromkeys(["tsp", "teaspoon", "teaspoons"], "tsp"),
    **dict.fromkeys(["tbsp", "tablespoon", "tablespoons"], "tbsp"),
}
_CURRENCY_SYMBOLS = {
    "$": "usd",
    "£": "gbp",
    "€": "eur",
    "₹": "inr",
    "¥": "yen",
    "₽": "rub",
    "₺": "try",
    "₩": "krw",
    "₦": "ngn",
    "₪": "ils",
    "฿": "thb",
    "₫": "vnd",
    "₴": "uah",
    "₱": "php",
    "₿": "btc",
}
_AMBIGUOUS_UNITS = (frozenset({"pound", "gbp"}), frozenset({"pound", "lb"}))
"""The word "pounds" is money or weight: it matches either, "£" and "lb" never match each other."""
_UNIT_ALT = "|".join(sorted((re.escape(u) for u in _UNIT_FAMILIES), key=len, reverse=True))
_DIGITS = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
_VERSION = re.compile(r"\d+(?:\.\d+){2,}")
"""A dotted numeral of three parts or more (a version, an address): one literal key, not a decimal and its rest."""
_TWO_PARTS = re.compile(r"\d+\.\d+")
"""A decimal of two parts: an amount ("2.50" is "2.5"), or, right after a word, a version ("Python 3.10")."""
_WORD_BEFORE = re.compile(r"(?<![\w'])(?P<w>[A-Za-z]{1,})\s$")
"""The word directly before a number (searched in the 40 characters before it, so the search stays constant)."""
_VERSION_WORDS = frozenset({"version", "ver", "v", "release", "build"})
_VERSIONED_NAMES = frozenset(
    {
        *("python", "py", "node", "nodejs", "java", "jdk", "jre", "kotlin", "scala", "golang", "rust", "ruby"),
        *("rails", "php", "perl", "swift", "dart", "flutter", "typescript", "ts", "dotnet", "django", "flask"),
        *("fastapi", "react", "angular", "vue", "svelte", "nextjs", "laravel", "symfony"),
        *("ios", "ipados", "macos", "osx", "android", "ubuntu", "debian", "fedora", "centos", "rhel", "alpine"),
        *("windows", "linux", "kernel", "chrome", "chromium", "firefox", "safari", "electron"),
        *("postgres", "postgresql", "psql", "mysql", "mariadb", "sqlite", "mongodb", "mongo", "redis", "kafka"),
        *("elasticsearch", "kubernetes", "k8s", "kubectl", "docker", "helm", "terraform", "ansible", "nginx"),
        *("numpy", "pandas", "scipy", "sklearn", "tensorflow", "tf", "pytorch", "torch", "cuda", "cudnn", "keras"),
        *("transformers", "gcc", "clang", "llvm", "cmake", "gradle", "maven", "npm", "yarn", "webpack"),
        *("vite", "jquery", "bootstrap", "tailwind", "openssl", "openssh", "git", "bash", "zsh", "vim", "emacs"),
        *("wordpress", "drupal", "unity", "unreal", "blender", "gpt", "llama", "gemini", "claude", "qt", "gtk"),
    }
)
"""Names that take a two-part version when written in lowercase too ("python 3.10", "node 18.10"): the digits count as
written. Any other lowercase word makes an amount ("sugar 5.50" is 5.5). Where one of these is an ordinary word before
an amount (a "ruby 2.50" that is a price), a different spelling of the amount is only a miss, never a wrong answer."""
_VERSION_LEADS = _VERSION_WORDS | _VERSIONED_NAMES
"""Words after which a two-part number is a version, whatever their case."""
_YEAR = re.compile(r"1[5-9]\d\d|20\d\d")


def _names_a_version(text: str, before: re.Match[str]) -> bool:
    """Whether a two-part number after ``before``'s word is a version: after a capitalised word that does not
    start a sentence ("Python 3.10", "Is Android 6.0"), after "version", or after a name that takes versions in
    lowercase too ("python 3.10": with the capitalised form on the other side, "Python 3.10" against
    "python 3.1" was a hit, found in review). After any other word it is an amount,
    where 1.50 and 1.5 are one value ("does it cost 1.50", "is my blood sugar 5.50"; found in review)."""
    word = before["w"]
    if word.lower() in _VERSION_LEADS:
        return True
    prefix = text[: before.start()].rstrip()
    starts_sentence = not prefix or prefix[-1] in ".?!:"
    return word[0].isupper() and word.lower() not in STOPWORDS and not starts_sentence


_TIME_AMPM = re.compile(r"\b(?P<h>\d{1,2})(?:[:.](?P<m>\d{2}))?\s?(?P<ap>a\.?m\.?|p\.?m\.?)(?![a-z])", re.IGNORECASE)
_TIME_CLOCK = re.compile(r"(?<![\d.,:])(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?![\d:])")
_TIME_WORDS = re.compile(
    rf"\b(?P<h>\d{{1,2}}|{_NUMBER_WORD})(?:\s?o'?\s?clock)?\s+(?P<part>in the morning|in the afternoon|"
    r"in the evening|at night|tonight|this morning|this afternoon|this evening)\b"
    rf"|\b(?P<h2>\d{{1,2}}|{_NUMBER_WORD})\s?o'?\s?clock\b",
    re.IGNORECASE,
)
_NOON = re.compile(r"\b(?P<w>noon|midday|midnight)\b", re.IGNORECASE)
_MONEY = re.compile(
    rf"(?P<cur>[{''.join(_CURRENCY_SYMBOLS)}])\s?(?P<num>{_DIGITS})(?:\s?(?P<scale>k|m|bn|million|billion|thousand)\b)?",
    re.IGNORECASE,
)
# A sign only with nothing word-like before it ("-5", not the range "5-10"); a scale word after the digits
# ("5 million"): "-5 degrees" against "5 degrees" and "5 million users" against "5 billion" were hits (a review).
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>-(?=\.?\d))?(?P<num>{_VERSION.pattern}|{_DIGITS})(?P<k>k\b)?"
    r"(?:\s(?P<scale>thousand|million|billion|bn)\b)?"
    rf"(?:(?:\s?|-)(?P<unit>{_UNIT_ALT})(?![a-z0-9]))?",
    re.IGNORECASE,
)
_ORDINAL = re.compile(r"\b(?P<num>\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)
_WORD_NUMBER = re.compile(
    rf"\b(?P<w>{_NUMBER_WORD})(?:[\s-](?P<big>hundred|thousand|million))?(?:(?:\s|-)(?P<unit>{_UNIT_ALT})(?![a-z]))?\b",
    re.IGNORECASE,
)
_WORD_ORDINAL = re.compile(r"\b(?P<w>" + "|".join(_ORDINALS) + r")\b", re.IGNORECASE)
_CODE = re.compile(r"\b(?=[a-z]*\d)(?=\d*[a-z])[a-z0-9]+(?:-[a-z0-9]+)*\b", re.IGNORECASE)


def _word_value(word: str) -> int | None:
    word = word.lower().replace("-", " ")
    parts = word.split()
    if parts[0] in _TENS:
        return _TENS[parts[0]] + (_SMALL[parts[1]] if len(parts) > 1 else 0)
    return _SMALL.get(parts[0])


def _number_text(digits: str, scale: int = 1) -> str:
    """The number ``digits`` writes (thousands commas allowed) times ``scale``, as canonical text: "5", "5.0" and
    "5.00" are "5"; "1.5" with scale 1000 is "1500". Exact at any length: read as floats, two order numbers of 17
    digits could be one value (a hit for the other's answer), and 320 digits were infinity, whose int() raised
    (a 500 on every lookup that met such an entry; found in a security review)."""
    value = decimal.Decimal(digits.replace(",", ""))
    exact = decimal.Context(prec=len(digits) + 12)  # room for every digit and the scale's zeros: nothing rounds
    return format(exact.normalize(exact.multiply(value, scale)), "f")


_QUALIFIER_CLASSES: dict[str, str] = {
    **dict.fromkeys(["up to", "at most", "no more than", "not more than"], "at most"),
    **dict.fromkeys(["at least", "no less than", "not less than", "no fewer than"], "at least"),
    **dict.fromkeys(
        ["more than", "greater than", "higher than", "bigger than", "larger than", "over", "above", "exceeding"],
        "more than",
    ),
    **dict.fromkeys(["less than", "fewer than", "lower than", "smaller than", "under", "below"], "less than"),
    **dict.fromkeys(["before", "until", "till"], "before"),
    **dict.fromkeys(["after", "since"], "after"),
    **dict.fromkeys(["around", "about", "approximately", "roughly", "nearly", "almost", "close to"], "about"),
    **{q: q for q in ("by", "to", "from")},
}
"""Words directly before a number that say how it is meant; synonyms share a class ("over 5" is "more than 5")."""
_WHEN_QUALIFIER = {"to": "before", "by": "before", "from": "after"}
"""Before a time or a year, "to" and "by" end a span as "until" does, and "from" starts one as "since" does: "open
9am to 5pm" is "until 5pm", "by 2030" is "before 2030" (before amounts, "by 10%" and "to 10%" differ)."""
# One or two spaces between: a span blanked in between ("until 9pm 7 days") must not qualify the next number.
_QUALIFIER = re.compile(
    r"\b(?P<q>" + "|".join(sorted((re.escape(q) for q in _QUALIFIER_CLASSES), key=len, reverse=True)) + r")\s{1,2}$",
    re.IGNORECASE,
)


def _qualifier(text: str, start: int, *, when: bool = False) -> str | None:
    """The class of the qualifier written directly before ``text[start:]`` ("up to 3" -> "at most"), if any;
    ``when``: the number is a time or a year."""
    # the longest qualifier ("approximately ", "not less than ") fits in 20 characters: the search stays constant
    found = _QUALIFIER.search(text, max(0, start - 20), start)
    if found is None:
        return None
    word = _QUALIFIER_CLASSES[" ".join(found["q"].lower().split())]
    return _WHEN_QUALIFIER.get(word, word) if when else word


@dataclass(frozen=True, slots=True)
class _Numbers:
    values: frozenset[str]
    units: frozenset[tuple[str, str]]
    times: frozenset[str]
    meridiem: frozenset[tuple[str, str]]
    qualifiers: frozenset[tuple[str, str]]
    spelled: tuple[tuple[str, str], ...]


def _take(pattern: re.Pattern[str], text: str, handle: Callable[[re.Match[str]], bool]) -> str:
    """Call ``handle`` on every match of ``pattern`` and blank the matches it accepts, in one pass.

    Blanking (not deleting) keeps offsets and word boundaries, so a number read once is not read
    again by a later, looser pattern.
    """

    def replace(match: re.Match[str]) -> str:
        return " " * (match.end() - match.start()) if handle(match) else match.group()

    return pattern.sub(replace, text)


_SCALES = {"k": 10**3, "thousand": 10**3, "m": 10**6, "million": 10**6, "bn": 10**9, "billion": 10**9}
_BIG = {"hundred": 100, "thousand": 1000, "million": 1_000_000}


_ATTACHED_VERSION = re.compile(r"(?<![\w.])(?P<w>[A-Za-z]+)-?(?P<num>\d+(?:\.\d+)+)(?![\w.])")
"""A version written onto its name ("v3.10", "python3.10", "python-3.10"): no number at all for the number pass, so
"v3.10" against "v3.1" was a hit (a review). Read as if spaced: "v 3.10" is a version like "version 3.10"."""


def _spaced_version(match: re.Match[str]) -> str:
    if match["w"].lower() in _VERSION_LEADS:
        return f"{match['w']} {match['num']}"
    return match.group()


def _read_numbers(text: str) -> tuple[_Numbers, str]:
    """Times, amounts, counts and ordinals in ``text``; returns them and ``text`` with their spans blanked."""
    text = _ATTACHED_VERSION.sub(_spaced_version, text)
    values: set[str] = set()
    units: set[tuple[str, str]] = set()
    times: set[str] = set()
    meridiem: set[tuple[str, str]] = set()
    qualifiers: set[tuple[str, str]] = set()
    spelled: list[tuple[str, str]] = []  # in the text's order: "3.1 to 3.10" is not "3.10 to 3.1"

    def qualify(key: str, match: re.Match[str], *, when: bool = False) -> None:
        qualifier = _qualifier(match.string, match.start(), when=when)
        if qualifier is not None:
            qualifiers.add((key, qualifier))

    def add_time(hour: int, minute: int, part: str | None, match: re.Match[str]) -> bool:
        if not 0 <= hour <= 24 or not 0 <= minute < 60:
            return False
        if part is None and hour == 0:  # "00:30" is half past midnight: it was "12:30" either way (a review)
            part = "am"
        if part is None and hour > 12:
            part = "pm"
        key = f"{(hour % 12) or 12}:{minute:02d}"
        times.add(key)
        if part:
            meridiem.add((key, part))
        qualify(key, match, when=True)  # "until 9pm" / "from 9pm"
        return True

    def ampm(match: re.Match[str]) -> bool:
        return add_time(
            int(match["h"]), int(match["m"] or 0), "am" if match["ap"].lower().startswith("a") else "pm", match
        )

    def spoken(match: re.Match[str]) -> bool:
        raw = match["h"] or match["h2"]
        hour = int(raw) if raw.isdigit() else _word_value(raw)
        part = (match["part"] or "").lower()
        return hour is not None and add_time(hour, 0, "am" if "morning" in part else ("pm" if part else None), match)

    def clock(match: re.Match[str]) -> bool:
        return add_time(int(match["h"]), int(match["m"]), None, match)

    def noon(match: re.Match[str]) -> bool:
        return add_time(12, 0, "am" if match["w"].lower() == "midnight" else "pm", match)

    def money(match: re.Match[str]) -> bool:
        key = _number_text(match["num"], _SCALES.get((match["scale"] or "").lower(), 1))
        values.add(key)
        units.add((key, _CURRENCY_SYMBOLS[match["cur"]]))
        qualify(key, match)
        return True

    def ordinal(match: re.Match[str]) -> bool:
        values.add(match["num"])
        return True

    def number(match: re.Match[str]) -> bool:
        raw, unit = match["num"], match["unit"]
        if _VERSION.fullmatch(raw):  # "17.0.1": a version or an address, whose every digit counts
            key = raw
        else:
            scale = _SCALES[match["scale"].lower()] if match["scale"] else 1000 if match["k"] else 1
            key = _number_text(raw, scale)
        if match["sign"] and key != "0":
            key = "-" + key
        values.add(key)
        bare = not (unit or match["scale"] or match["k"] or match["sign"])
        qualify(key, match, when=bare and _YEAR.fullmatch(raw) is not None)
        if bare and _TWO_PARTS.fullmatch(raw):
            before = _WORD_BEFORE.search(match.string, max(0, match.start() - 40), match.start())
            if before is not None and _names_a_version(match.string, before):
                spelled.append((key, raw))
        # a one-letter unit must touch its number ("5m", "2g"): "18 in the UK" is not eighteen inches
        if unit and (len(unit) > 1 or not match.group()[: -len(unit)].endswith(" ")):
            units.add((key, _UNIT_FAMILIES[unit.lower()]))
        return True

    def word_number(match: re.Match[str]) -> bool:
        value = _word_value(match["w"])
        # "one" is mostly a pronoun ("the first one", "one of your shops"): a number only before a unit
        if value is None or (match["w"].lower() == "one" and not match["unit"] and not match["big"]):
            return False
        value *= _BIG.get((match["big"] or "").lower(), 1)
        values.add(str(value))
        qualify(str(value), match)
        if match["unit"]:
            units.add((str(value), _UNIT_FAMILIES[match["unit"].lower()]))
        return True

    def word_ordinal(match: re.Match[str]) -> bool:
        values.add(str(_ORDINALS[match["w"].lower()]))
        return True

    # most specific first: "7.30pm" is a time before "7.30" could be a number
    for pattern, handle in (
        (_TIME_AMPM, ampm),
        (_TIME_WORDS, spoken),
        (_TIME_CLOCK, clock),
        (_NOON, noon),
        (_MONEY, money),
        (_ORDINAL, ordinal),
        (_NUMBER, number),
        (_WORD_NUMBER, word_number),
        (_WORD_ORDINAL, word_ordinal),
    ):
        text = _take(pattern, text, handle)
    numbers = _Numbers(
        frozenset(values),
        frozenset(units),
        frozenset(times),
        frozenset(meridiem),
        frozenset(qualifiers),
        tuple(spelled),
    )
    return numbers, text


# -- dates ------------------------------------------------------------------------------------------

# One calendar vocabulary for the whole service (the event-time parser uses the same names).
_WEEKDAY_NAMES = WEEKDAYS
_MONTH_NAMES = tuple(MONTH_NAMES)
_AMBIGUOUS_MONTHS = frozenset({"may", "march"})  # also a modal verb and a verb/noun
_DATE_CONTEXT_BEFORE = re.compile(
    r"(?:\b(?:in|on|from|by|until|till|since|of|this|next|last|early|late|mid|end|start|during|before|after)"
    r"|\d(?:st|nd|rd|th)?)\s*-?\s*$",
    re.IGNORECASE,
)
_RANGES = (
    (re.compile(r"\bmon(?:day)?s?\s*(?:-|to|through|thru|till|until)\s*fri(?:day)?s?\b", re.IGNORECASE), "cal:weekday"),
    (re.compile(r"\bsat(?:urday)?s?\s*(?:and|&|-|to)\s*sun(?:day)?s?\b", re.IGNORECASE), "cal:weekend"),
)
_RELATIVE = re.compile(
    r"\b(?P<rel>today|tonight|tomorrow|yesterday|overnight|same[\s-]day|next[\s-]day|"
    r"(?:this|next|last|coming|following|previous|past)\s+(?:week|weekend|month|year|term|quarter|season|night|"
    r"morning|afternoon|evening|spring|summer|autumn|winter)|(?:this|tomorrow|yesterday)\s+"
    r"(?:morning|afternoon|evening|night))\b",
    re.IGNORECASE,
)
_NAMED_DAY = (
    "monday|tuesday|wednesday|thursday|friday|saturday|sunday|january|february|april|june|july|august|september|"
    "october|november|december"
)
_RELATIVE_NAMED = re.compile(
    rf"\b(?P<rel>this|next|last|coming|following|previous|past)\s+(?=(?:{_NAMED_DAY})\b)", re.IGNORECASE
)
"""The word that says which Monday (or June): "next Monday" against "this Monday" or "Monday" was a hit (a review).
Only the word is taken: the day or month is read as ever. May and March are left out: "this may help"."""
_CALENDAR_WORDS = re.compile(
    r"\b(?P<w>weekdays?|weekends?|weeknights?|christmas(?:\s+(?:eve|day))?|boxing\s+day|new\s+year'?s?(?:\s+(?:eve|day))?"
    r"|easter|halloween|bank\s+holidays?|thanksgiving|spring|summer|autumn|winter)\b",
    re.IGNORECASE,
)
_WORD_IN_TEXT = re.compile(r"[A-Za-z]+")


def _always(_match: re.Match[str]) -> bool:
    return True


def _read_dates(cased: str) -> tuple[frozenset[str], tuple[str, ...], str]:
    """Weekdays, months, holidays, seasons and relative days in ``cased``, as a set and in the order they are
    written; ``cased`` with their spans blanked."""
    keys: set[str] = set()
    placed: list[tuple[int, str]] = []

    def add(key: str, match: re.Match[str]) -> None:
        keys.add(key)
        placed.append((match.start(), key))

    def relative(match: re.Match[str]) -> bool:
        add("rel:" + " ".join(match["rel"].lower().replace("-", " ").split()), match)
        return True

    def named(match: re.Match[str]) -> bool:
        add("rel:" + match["rel"].lower() + " <day>", match)
        return True

    def calendar(match: re.Match[str]) -> bool:
        word = " ".join(match["w"].lower().replace("'", "").split())
        word = word.removesuffix("s") if word.startswith(("week", "bank")) else word
        add("cal:" + word.replace("new years", "new year"), match)
        return True

    def name(match: re.Match[str]) -> bool:
        word = match.group().lower()
        found = _calendar_word(word)
        if found is None:
            return False
        if found.startswith("month:") and word in _AMBIGUOUS_MONTHS:
            # "May I ..." and "march on": a month only when capitalized mid-sentence or next to a date word
            text = match.string
            before = text[max(0, match.start() - 12) : match.start()]
            after = text[match.end() : match.end() + 6]
            capital_mid = match.group()[0].isupper() and match.start() > 0 and not re.search(r"[.?!\n]\s*$", before)
            if not (capital_mid or _DATE_CONTEXT_BEFORE.search(before) or re.match(r"\s*\d", after)):
                return False
        add(found, match)
        return True

    text = cased
    for pattern, key in _RANGES:
        found = pattern.search(text)
        if found:
            add(key, found)
            text = _take(pattern, text, _always)
    text = _take(_RELATIVE, text, relative)
    text = _take(_RELATIVE_NAMED, text, named)
    text = _take(_CALENDAR_WORDS, text, calendar)
    text = _take(_WORD_IN_TEXT, text, name)
    return frozenset(keys), tuple(key for _, key in sorted(placed)), text


_CALENDAR_EXACT: dict[str, str] = {
    **{name: "day:" + name for name in _WEEKDAY_NAMES},
    **{name + "s": "day:" + name for name in _WEEKDAY_NAMES},
    **{name: f"month:{i + 1}" for i, name in enumerate(_MONTH_NAMES)},
}
_CALENDAR_PREFIXES = frozenset(name[:2] for name in (*_WEEKDAY_NAMES, *_MONTH_NAMES))


@lru_cache(maxsize=4096)
def _calendar_word(word: str) -> str | None:
    """``day:<weekday>`` or ``month:<n>`` for a weekday or month name, misspelt ones included ("Mondys")."""
    exact = _CALENDAR_EXACT.get(word)
    if exact is not None or len(word) < 5 or word[:2] not in _CALENDAR_PREFIXES:
        return exact
    forms = (word, word[:-1]) if word.endswith("s") and len(word) >= 6 else (word,)
    for form in forms:
        for name in _WEEKDAY_NAMES:
            if form[:2] == name[:2] and _damerau(form, name, 2) <= (1 if len(name) < 8 else 2):
                return "day:" + name
        for i, name in enumerate(_MONTH_NAMES):
            if len(form) >= 6 and len(name) >= 6 and form[:2] == name[:2] and _damerau(form, name, 1) <= 1:
                return f"month:{i + 1}"
    return None


# -- the facts of one query -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryFacts:
    """What the guards read from one query; computed once by :func:`analyze` and reused."""

    text: str
    tokens: tuple[str, ...]
    """Lowercase word tokens of the normalized text, numbers and dates included."""
    stems: frozenset[str]
    """Stems of every token outside numbers and dates (function words included)."""
    words: frozenset[str]
    """Every token and its stem, numbers and dates included: what :func:`mentions` looks names up in."""
    surface: tuple[str, ...]
    """Stems of every word outside numbers and dates, fillers dropped, in order: the sentence's shape."""
    content: tuple[str, ...]
    """Stems of the content words: no function words, fillers, numbers, dates or scope words."""
    negations: int
    numbers: frozenset[str]
    units: frozenset[tuple[str, str]]
    times: frozenset[str]
    meridiem: frozenset[tuple[str, str]]
    qualifiers: frozenset[tuple[str, str]]
    """(value, qualifier class) for a number with a comparison word or preposition directly before it:
    ("3", "at most") for "up to 3", ("10", "by") for "by 10%"."""
    spelled: tuple[tuple[str, str], ...]
    """(value, digits as written) for a two-part decimal with no unit right after a word: ("3.1", "3.10") for
    "Python 3.10", a version, where 2.50 and 2.5 as amounts are one value. In the text's order."""
    dates: frozenset[str]
    names: frozenset[str]
    """Proper names (lowercase keys), from :func:`memos.graph.entities.extract_entities` plus alphanumeric codes."""
    scope: frozenset[tuple[str, str]]
    """(dimension, pole) pairs, e.g. ("comparison", "more")."""
    particles: frozenset[tuple[str, str]]
    """(verb stem, particle) for phrasal verbs: ("turn", "off"), ("opt", "in")."""
    possessed: frozenset[tuple[str, str]]
    """(noun stem, person) after a possessive determiner: ("password", "1"), ("name", "2")."""
    number_order: tuple[str, ...]
    """Every number written in digits, in order ("2024-05-01" -> 2024, 5, 1): what swapping operands changes."""
    date_order: tuple[str, ...]
    """The date keys (weekdays, months, holidays...), in the order they are written: "from June to May" is not
    "from May to June"."""
    name_order: tuple[str, ...]
    """The names, in the order of their first mention."""
    letters: frozenset[tuple[str, str]]
    """(word stem, letter) for a capital letter alone after a content word: ("hepatitis", "b"), ("vitamin", "d")."""
    any_letters: frozenset[tuple[str, str]]
    """The same for a letter alone after a content word in any case ("hepatitis b"): what ``letters`` meets."""
    operators: tuple[str, ...]
    """Arithmetic operators, in order, symbols and words alike ("2+2" -> +; "12 divided by 4" -> /)."""
    to_pairs: frozenset[tuple[str, str]]
    """(stem before, stem after) of "to"/"into" between two content words: ("english", "german")."""
    than_pairs: frozenset[tuple[str, str]]
    """(content stem of the clause before "than", first content stem after it): ("cat", "dog") and ("bigger", "dog")
    for "is a cat bigger than a dog"."""
    sources: frozenset[str]
    """Content stems after "from"."""
    targets: frozenset[str]
    """Content stems after "to"/"into"/"onto"."""
    asks_reason: bool
    joined: str
    """The tokens run together ("wi fi" -> "wifi"): what :func:`mentions` looks a joined-up name up in."""
    unread: bool
    """The text has letters of a script the guards cannot read (not Latin: Cyrillic, CJK, Greek, Devanagari...)."""
    plain: str
    """The text compatibility-normalized, case-folded, its spaces collapsed: what "the same words" compares."""


_POSSESSIVE_PERSON = {"my": "1", "our": "1", "your": "2", "his": "3", "her": "3", "their": "3", "its": "3"}
_PREPOSITION_STOP = frozenset(
    [
        "to",
        "into",
        "onto",
        "from",
        "for",
        "with",
        "at",
        "in",
        "on",
        "by",
        "of",
        "about",
        "via",
        "and",
        "or",
        "but",
        "so",
        "if",
        "when",
        "where",
        "which",
        "that",
        "while",
        "as",
        "than",
    ]
)
_SCOPE_INDEX: dict[str, tuple[str, str]] = {
    word: (dimension, pole)
    for dimension, poles in SCOPE_POLES.items()
    for pole, group in poles.items()
    for word in group
}
_SCOPE_WORDS = frozenset(_SCOPE_INDEX)
_NAME_NOISE = frozenset({"i", "ok", "okay", "hi", "hello", "hey", "please", "thanks", "um", "uh"})


@lru_cache(maxsize=8192)
def analyze(text: str) -> QueryFacts:
    """Read the facts of ``text`` that the guards compare. Memoized: a cached query is read once."""
    cased = _normalize(text)
    lowered = cased.lower()
    tokens = tuple(_TOKEN.findall(lowered))
    numbers, rest = _read_numbers(cased)
    dates, date_order, rest = _read_dates(rest)
    rest_lower = rest.lower()
    rest_tokens = _TOKEN.findall(rest_lower)
    stems_all = [stem(t) for t in rest_tokens]

    negations = sum(1 for t in rest_tokens if t in NEGATORS)

    scope = {_SCOPE_INDEX[t] for t in rest_tokens if t in _SCOPE_INDEX and t not in COMPARATIVE_PREPOSITIONS}
    # "over £50" is a comparison; "over to Vanguard" and "under the warranty" are not
    scope.update(_SCOPE_INDEX[m["w"].lower()] for m in _COMPARATIVE.finditer(cased))

    particles: set[tuple[str, str]] = set()
    for i, token in enumerate(rest_tokens[1:], start=1):
        if token in OPPOSED_PARTICLES:
            verb = rest_tokens[i - 1]
            if verb not in STOPWORDS and verb not in FILLERS and not verb.isdigit():
                particles.add((stem(verb), token))

    possessed: set[tuple[str, str]] = set()
    for i, token in enumerate(rest_tokens[:-1]):
        person = _POSSESSIVE_PERSON.get(token)
        if person is not None:
            for nxt in rest_tokens[i + 1 : i + 4]:
                if nxt not in STOPWORDS and nxt not in FILLERS:
                    possessed.add((stem(nxt), person))
                    break

    sources = _phrase_after(rest_tokens, {"from"})
    targets = _phrase_after(rest_tokens, {"to", "into", "onto"})

    # "how much" already asks for a price ("how much is it" = "how much does it cost"), "what time" for a time
    implied = (_IMPLIED_BY_HOW_MUCH if "how much" in rest_lower else frozenset()) | (
        _TIME_WORD if "what time" in rest_lower else frozenset()
    )
    content = tuple(
        s
        for t, s in zip(rest_tokens, stems_all, strict=True)
        if s not in implied
        if t not in STOPWORDS
        and t not in FILLERS
        and t not in NEGATORS
        and t not in _SCOPE_WORDS
        and s not in STOPWORDS
        and not t.isdigit()
        and len(t) > 1
    )

    # order numbers, postcodes, model names: "48213" is a number, "HC-20931" / "LS6 2AB" / "J5" are codes
    codes = [m for m in _CODE.finditer(cased) if not _is_unit_code(m.group())]
    names = {
        e.key
        for e in extract_entities(cased)
        if e.kind is EntityKind.NAME
        and e.key not in _NAME_NOISE
        and not _is_calendar_key(e.key)
        and not any(m.start() <= e.start < m.end() for m in codes)
        and _is_name(cased, e.text)
    }
    names.update(m.group().lower() for m in codes)
    # "PulseFit", "HubSpot", "HSBC" are names even where the extractor skips them (at a sentence start);
    # not in shouted text, where every word is in capitals
    letters = [c for c in cased if c.isalpha()]
    if sum(c.isupper() for c in letters) * 2 < len(letters):
        names.update(m.group().lower() for m in _MARKED_NAME.finditer(cased) if m.group().lower() not in _NAME_NOISE)

    letter_kinds, any_letters = _letters_after(cased)
    return QueryFacts(
        letters=letter_kinds,
        any_letters=any_letters,
        number_order=tuple(_number_key(m.group()) for m in _NUMERAL.finditer(lowered)),
        date_order=date_order,
        name_order=tuple(sorted(names, key=lambda name: (lowered.find(name), name))),
        operators=tuple(_OPERATOR_WORDS.get(m.group().strip(), m.group().strip()) for m in _OPERATOR.finditer(lowered)),
        than_pairs=_than_pairs(rest_tokens),
        to_pairs=frozenset(
            (stem(before), stem(after))
            for before, word, after in zip(rest_tokens, rest_tokens[1:], rest_tokens[2:], strict=False)
            if word in ("to", "into") and _content_word(before) and _content_word(after)
        ),
        text=text,
        tokens=tokens,
        stems=frozenset(stems_all),
        words=frozenset(tokens) | {stem(t) for t in tokens},
        surface=tuple(s for t, s in zip(rest_tokens, stems_all, strict=True) if t not in FILLERS),
        content=content,
        negations=negations,
        numbers=numbers.values,
        units=numbers.units,
        times=numbers.times,
        meridiem=numbers.meridiem,
        qualifiers=numbers.qualifiers,
        spelled=numbers.spelled,
        dates=dates,
        names=frozenset(names),
        scope=frozenset(scope),
        particles=frozenset(particles),
        possessed=frozenset(possessed),
        sources=sources,
        targets=targets,
        asks_reason=bool(REASON_MARKERS.search(lowered)),
        joined="".join(tokens),
        unread=any(_unreadable(c) for c in text),
        plain=" ".join(unicodedata.normalize("NFKC", text).casefold().split()),
    )


_NUMERAL = re.compile(r"\d+(?:[.,]\d+)*")
_OPERATOR_WORDS = {
    "plus": "+",
    "minus": "-",
    "times": "*",
    "multiplied by": "*",
    "x": "*",
    "\u00d7": "*",
    "divided by": "/",
    "\u00f7": "/",
    "to the power of": "^",
}
# A symbol between two numbers ("7-5", "2 * 3"), or an operator word anywhere.
_OPERATOR = re.compile(
    r"(?<=\d)\s*[-+*/^x\u00d7\u00f7](?=\s*\d)|\b(?:plus|minus|times|multiplied by|divided by|to the power of)\b"
)


def _than_pairs(tokens: Sequence[str]) -> frozenset[tuple[str, str]]:
    """Each content word of the few before a "than" (up to a clause word), paired with the first content word after
    it: the two sides of a comparison, whatever comparative stands between them."""
    out: set[tuple[str, str]] = set()
    for i, word in enumerate(tokens):
        if word != "than":
            continue
        after = next((t for t in tokens[i + 1 : i + 4] if _content_word(t)), None)
        if after is None:
            continue
        for before in reversed(tokens[max(0, i - 5) : i]):
            if before in _CLAUSE_BREAK:
                break
            if _content_word(before):
                out.add((stem(before), stem(after)))
    return frozenset(out)


_CLAUSE_BREAK = frozenset({"and", "or", "but", "than", "if", "because", "when", "which", "that"})


def _content_word(token: str) -> bool:
    return token not in STOPWORDS and token not in FILLERS and not token.isdigit() and len(token) > 1


def _number_key(raw: str) -> str:
    """ "05" and "5", "1,000" and "1000", "2.50" and "2.5" are one number."""
    text = raw.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text.lstrip("0") or "0"


_TO = frozenset({"to"})
_INFINITIVE_BEFORE = words(
    "want wants wanted need needs like how way have has had able going try trying wish plan hope love decide "
    "possible allowed easy best where what when whether used due about ok okay"
)


def _phrase_after(tokens: Sequence[str], heads: set[str]) -> frozenset[str]:
    out: set[str] = set()
    for i, word in enumerate(tokens):
        if word not in heads:
            continue
        if word in _TO and i > 0 and tokens[i - 1] in _INFINITIVE_BEFORE:
            continue  # "want to move", "how to transfer": an infinitive, not a destination
        for nxt in tokens[i + 1 : i + 6]:
            if nxt in _PREPOSITION_STOP:
                break
            if nxt not in STOPWORDS and nxt not in FILLERS:
                out.add(stem(nxt))
    return frozenset(out)


_COMPARATIVE = re.compile(
    r"\b(?P<w>" + "|".join(COMPARATIVE_PREPOSITIONS) + r")\s+(?:the\s+)?(?:age\s+of\s+)?[$£€₹¥]?\s?\d",
    re.IGNORECASE,
)
_IMPLIED_BY_HOW_MUCH = frozenset({"cost", "price", "charge", "pay"})
_TIME_WORD = frozenset({"time"})
_MARKED_NAME = re.compile(r"\b[A-Z][a-z]+[A-Z][A-Za-z]*\b|\b[A-Z]{2,}\b")
_LETTER_AFTER = re.compile(r"\b(?P<w>[A-Za-z]{2,}) (?P<l>[A-Za-z])(?=[\s?!,;:)]|[.](?!\w)|$)")
"""A letter standing alone right after a word: "hepatitis B", "vitamin D", "plan B". Not one glued to more ("C++",
"C#", "B's", "B.Sc", "A-level", "E=mc^2")."""


def _letters_after(cased: str) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
    """(word stem, letter) for each letter alone after a word that is not a function word: first those written as a
    capital (not I, nor U as in "love U"), then every one in any case."""
    capitals: set[tuple[str, str]] = set()
    every: set[tuple[str, str]] = set()
    for match in _LETTER_AFTER.finditer(cased):
        word = match["w"].lower()
        if word in STOPWORDS or word in FILLERS or word in NEGATORS:
            continue
        key = (stem(word), match["l"].lower())
        every.add(key)
        if match["l"].isupper() and match["l"] not in "IU":
            capitals.add(key)
    return frozenset(capitals), frozenset(every)


_SENTENCE_END = frozenset('.!?:;\n"(')


def _is_name(text: str, surface: str) -> bool:
    """A capitalized word is a name if it is more than one word, has inner capitals or digits ("IronWorks",
    "HSBC"), or is capitalized somewhere other than at the start of a sentence ("Done." twice is not a name).
    """
    if " " in surface or any(c.isupper() or c.isdigit() for c in surface[1:]):
        return True
    for match in re.finditer(re.escape(surface), text):
        # walk back over blanks instead of slicing the text before each match: that was quadratic in a long text
        i = match.start() - 1
        while i >= 0 and text[i] in " \t":
            i -= 1
        if i >= 0 and text[i] not in _SENTENCE_END:
            return True
    return False


def _is_calendar_key(key: str) -> bool:
    return any(_calendar_word(part) is not None for part in key.split())


_UNIT_CODE = re.compile(rf"^\d+(?:\.\d+)?(?:k|{_UNIT_ALT}|st|nd|rd|th|am|pm)$", re.IGNORECASE)


def _is_unit_code(token: str) -> bool:
    return bool(_UNIT_CODE.match(token))


# -- the guards -------------------------------------------------------------------------------------

Guard = Callable[[QueryFacts, QueryFacts], "str | None"]


def _fmt(items: Iterable[str]) -> str:
    listed = sorted(items)
    return ", ".join(listed) if listed else "nothing"


@lru_cache(maxsize=8192)
def _unreadable(char: str) -> bool:
    """A letter the guards' tokens ([a-z0-9]) cannot hold, nor one of its accented Latin forms."""
    return char.isalpha() and "LATIN" not in unicodedata.name(char, "")


def script_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Only the same words are served for a query in a script the guards cannot read.

    Every other guard reads Latin letters and digits: in Chinese, Russian, Japanese, Korean, Greek or Hindi they
    saw no words at all, so "cancel my subscription" and "do not cancel my subscription" (cosine 0.86 in
    Chinese), "delete" and "create my account" (1.00) were hits (found in review). Such a query is answered
    only by an entry of the same text, up to case, spacing and compatibility forms.
    """
    if (a.unread or b.unread) and a.plain != b.plain:
        return "written in a script these guards cannot read: only the same words are served"
    return None


def negation_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Polarity: an odd number of negators on one side only ("cancel" vs "don't cancel"), or a prefixed opposite."""
    if a.negations % 2 != b.negations % 2:
        return f"negation differs ({a.negations} vs {b.negations} negations)"
    only_a = a.stems - b.stems
    only_b = b.stems - a.stems
    # Each word's possible opposites are built and looked up (linear), not every pair tried (quadratic in a long
    # text); the first pair in sorted order is reported, as a pairwise scan would.
    for x in sorted(only_a):
        found = [y for y in _prefix_partners(x) if y in only_b and _prefixed_opposites(x, y)]
        if found:
            return f"negation differs: {x!r} vs {min(found)!r}"
    return None


def _prefix_partners(word: str) -> set[str]:
    """Every word that :func:`_prefixed_opposites` could pair with ``word`` (a superset: callers re-check)."""
    out = {prefix + word for prefix in NEGATIVE_PREFIXES}
    out.update(word[len(prefix) :] for prefix in NEGATIVE_PREFIXES if word.startswith(prefix))
    for left, right in OPPOSED_PREFIXES:
        if word.startswith(left):
            out.add(right + word[len(left) :])
        if word.startswith(right):
            out.add(left + word[len(right) :])
    return out


def antonym_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Opposite words, each used on its own side only: add/remove, benefits/drawbacks, increase/decrease."""
    only_a = a.stems - b.stems
    only_b = b.stems - a.stems
    if not only_a or not only_b:
        return None
    for left, right in ANTONYM_PAIRS:
        for x, y in ((left, right), (right, left)):
            hit_a = only_a & x
            hit_b = only_b & y
            if hit_a and hit_b and not (a.stems & y) and not (b.stems & x):
                return f"opposite meaning: {_fmt(hit_a)!s} vs {_fmt(hit_b)!s}"
    for verb, particle in sorted(a.particles):
        if (verb, OPPOSED_PARTICLES[particle]) in b.particles and (verb, particle) not in b.particles:
            return f"opposite meaning: '{verb} {particle}' vs '{verb} {OPPOSED_PARTICLES[particle]}'"
    # on/off reverse whatever verb carries them ("turn the water on" / "cut the water off")
    on_off_a = {p for _, p in a.particles if p in ("on", "off")}
    on_off_b = {p for _, p in b.particles if p in ("on", "off")}
    if len(on_off_a) == 1 and len(on_off_b) == 1 and on_off_a != on_off_b:
        return f"opposite meaning: {_fmt(on_off_a)} vs {_fmt(on_off_b)}"
    return None


def number_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Numbers, amounts, units and clock times must be the same on both sides.

    Walked in sorted order, and a value's units compared as sets (a value one side gives no unit is not
    compared): walking the sets as they hash let the reason, and for a value written with two units
    the decision, change with PYTHONHASHSEED."""
    if a.numbers != b.numbers:
        return f"numbers differ: {_fmt(a.numbers)} vs {_fmt(b.numbers)}"
    units_a, units_b = _grouped(a.units), _grouped(b.units)
    for value in sorted(units_a.keys() & units_b.keys()):
        if _unmatched(units_a[value], units_b[value]) or _unmatched(units_b[value], units_a[value]):
            return f"units differ for {value}: {_fmt(units_a[value])} vs {_fmt(units_b[value])}"
    # "Python 3.10" / "Python 3.1": after a name, a two-part number is a version, not an amount (a review);
    # compared only where both sides write it after a word, so "2.50" and "2.5" elsewhere stay one amount
    # compared in the order written: "from python 3.1 to Python 3.10" and the other way round hold the same two
    # spellings of 3.1, and compared as sets they were a hit for the opposite migration (a review)
    spelled_a, spelled_b = _in_order(a.spelled), _in_order(b.spelled)
    for value in sorted(spelled_a.keys() & spelled_b.keys()):
        if spelled_a[value] != spelled_b[value]:
            return f"versions differ: {', '.join(spelled_a[value])} vs {', '.join(spelled_b[value])}"
    if a.times != b.times:
        return f"times differ: {_fmt(a.times)} vs {_fmt(b.times)}"
    parts_a, parts_b = _grouped(a.meridiem), _grouped(b.meridiem)
    for key in sorted(parts_a.keys() & parts_b.keys()):
        if parts_a[key] != parts_b[key]:
            return f"times differ: {key} {_fmt(parts_a[key])} vs {key} {_fmt(parts_b[key])}"
    # "by 10%" / "to 10%", "up to 3" / "at least 3": the same number, asked about another way (a review). A
    # number one side qualifies and the other does not is not compared ("3 bags" / "up to 3 bags").
    quals_a, quals_b = _grouped(a.qualifiers), _grouped(b.qualifiers)
    for value in sorted(quals_a.keys() & quals_b.keys()):
        if quals_a[value] != quals_b[value]:
            return f"qualifiers differ for {value}: {_fmt(quals_a[value])} vs {_fmt(quals_b[value])}"
    return None


def _unmatched(units: set[str], others: set[str]) -> bool:
    """Whether a unit of ``units`` matches none of ``others`` ("pounds" matches "£" and "lb")."""
    return any(u not in others and not any(frozenset({o, u}) in _AMBIGUOUS_UNITS for o in others) for u in units)


def _in_order(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Each key's distinct values, in the order they first come."""
    grouped: dict[str, dict[str, None]] = {}
    for key, value in pairs:
        grouped.setdefault(key, {})[value] = None
    return {key: tuple(values) for key, values in grouped.items()}


def _grouped(pairs: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    grouped: dict[str, set[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, set()).add(value)
    return grouped


def date_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Weekdays, months, holidays, seasons and relative days (today, next week) must match."""
    if a.dates != b.dates:
        return (
            f"dates differ: {_fmt(k.split(':', 1)[1] for k in a.dates)} vs {_fmt(k.split(':', 1)[1] for k in b.dates)}"
        )
    return None


def entity_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Every proper name or code on one side must appear (in any case) on the other side."""
    missing_in_b = {name for name in a.names if not mentions(b, name)}
    missing_in_a = {name for name in b.names if not mentions(a, name)}
    if missing_in_b and missing_in_a:
        return f"entities differ: {_fmt(missing_in_b)} vs {_fmt(missing_in_a)}"
    if missing_in_b:
        return f"entity only in the cached query: {_fmt(missing_in_b)}"
    if missing_in_a:
        return f"entity only in the new query: {_fmt(missing_in_a)}"
    # One-letter words are no content words (a stray "a" or "s" is everywhere), so "hepatitis B" / "hepatitis C"
    # and "vitamin D" / "vitamin A" were hits (a review). A capital letter after a word names a kind of it: the
    # other side may give that word another letter (in any case), not drop it ("article V" added is left alone).
    for x, y in ((a, b), (b, a)):
        for word, letter in sorted(x.letters):
            others = {other for w, other in y.any_letters if w == word}
            if others and letter not in others:
                return f"entities differ: {word} {letter.upper()} vs {word} {_fmt(o.upper() for o in others)}"
    return None


def mentions(facts: QueryFacts, name: str) -> bool:
    """True when every word of ``name`` occurs in ``facts``' text, in any case ("Fahrenheit" in "in fahrenheit")."""
    parts = _TOKEN.findall(name)
    if all(p in facts.words or stem(p) in facts.words for p in parts):
        return True
    # "Wi-Fi" vs "wifi", "LS6 2AB" vs "ls62ab"
    joined = "".join(parts)
    return len(joined) >= 4 and joined in facts.joined  # joined once per text: per name, it was quadratic


def scope_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Quantity (all vs some), order (first vs last), time relation (before vs after) and comparison (more vs less)."""
    dims = {d for d, _ in a.scope} | {d for d, _ in b.scope}
    for dim in sorted(dims):
        poles_a = {p for d, p in a.scope if d == dim}
        poles_b = {p for d, p in b.scope if d == dim}
        # one side silent is not a conflict ("export my data" / "download all my data"); opposite poles are
        if poles_a and poles_b and poles_a != poles_b:
            return f"scope differs ({dim}): {_fmt(poles_a)} vs {_fmt(poles_b)}"
    return None


def direction_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Source and destination swapped: "from savings to current account" vs "from current account to savings"."""
    if (a.sources & b.targets) and (a.targets & b.sources):
        return f"direction reversed: {_fmt(a.sources & b.targets)} moves between 'from' and 'to'"
    # one side names only the destination: "from X to Y" vs "move my Y thing over to X"
    for x, y in ((a, b), (b, a)):
        moved = (x.sources & y.targets) - y.sources
        if moved and x.targets and not (x.targets & y.targets):
            return f"direction reversed: {_fmt(moved)} moves between 'from' and 'to'"
    return None


def order_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """The same numbers or names in another order, or other operators between them: "2024-05-01" /
    "2024-01-05", "12 divided by 4" / "4 divided by 12", "Does Alice owe Bob" / "Does Bob owe Alice", "2+2" /
    "2*2". The number and entity guards compare sets, which such pairs pass (found in review). A paraphrase
    that only reorders ("in 2020, 3 kids" / "3 kids in 2020") is refused too: a miss, never a wrong answer."""
    if a.number_order != b.number_order and sorted(a.number_order) == sorted(b.number_order):
        return f"numbers in another order: {', '.join(a.number_order)} vs {', '.join(b.number_order)}"
    # the date guard compares sets: "from June to May" / "from May to June" was a hit (a review)
    if a.date_order != b.date_order and sorted(a.date_order) == sorted(b.date_order):
        return f"dates in another order: {', '.join(a.date_order)} vs {', '.join(b.date_order)}"
    shared = set(a.name_order) & set(b.name_order)
    if len(shared) >= 2:
        order_a = [name for name in a.name_order if name in shared]
        order_b = [name for name in b.name_order if name in shared]
        if order_a != order_b:
            return f"names in another order: {', '.join(order_a)} vs {', '.join(order_b)}"
    if a.operators and b.operators and a.operators != b.operators:
        return f"operators differ: {' '.join(a.operators)} vs {' '.join(b.operators)}"
    # "English to German" / "German to English" (the direction guard needs a "from")
    swapped = {(x, y) for x, y in a.to_pairs if (y, x) in b.to_pairs and (x, y) not in b.to_pairs}
    if swapped:
        x, y = min(swapped)
        return f"direction reversed: '{x} to {y}' vs '{y} to {x}'"
    # "is a cat bigger than a dog" / "is a dog bigger than a cat": the names check needs capitals (a review)
    swapped = {(x, y) for x, y in a.than_pairs if (y, x) in b.than_pairs and (x, y) not in b.than_pairs}
    if swapped:
        x, y = min(swapped)
        return f"comparison reversed: '{x} ... than {y}' vs '{y} ... than {x}'"
    return None


def person_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """Whose thing it is: "my name" vs "your name"."""
    owners_a: dict[str, set[str]] = {}
    for noun, person in a.possessed:
        owners_a.setdefault(noun, set()).add(person)
    for noun, person in b.possessed:
        if noun in owners_a and person not in owners_a[noun]:
            return f"possessor differs for {noun!r}"
    return None


def question_guard(a: QueryFacts, b: QueryFacts) -> str | None:
    """A question asking why is not answered by one asking how or what."""
    if a.asks_reason != b.asks_reason:
        return "one query asks why, the other does not"
    return None


def wording_guard(a: QueryFacts, b: QueryFacts, *, max_diff: int = 3, min_overlap: float = 0.7) -> str | None:
    """Near-identical queries that differ in a few content words differ on purpose.

    "Is the chicken dish gluten-free?" / "Is the beef dish gluten-free?", "symptoms of flu" /
    "symptoms of flu in babies": when most content words are shared and the rest are neither
    spellings of one another nor synonyms, the changed words are the point of the question.
    Queries that share few words are left to the similarity threshold.
    """
    only_a, only_b, shared = _content_diff(a.content, b.content)
    if not only_a and not only_b:
        return None
    if not shared or len(only_a) + len(only_b) > max_diff:
        return None
    if len(shared) < len(only_a) + len(only_b) - 1:
        return None
    # only sentences built alike: a reworded paraphrase shares content words but not its shape
    shape = SequenceMatcher(None, a.surface, b.surface, autojunk=False)
    if shape.quick_ratio() < min_overlap:  # an upper bound of ratio(), linear
        return None
    if len(a.surface) * len(b.surface) <= SURFACE_BUDGET and shape.ratio() < min_overlap:
        return None
    # past the budget the exact ratio is quadratic: a long text with all but a few words shared is taken as built
    # alike, so the changed words object (a miss, never a wrong answer)
    if only_a and only_b:
        return f"different words: {_fmt(only_a)} vs {_fmt(only_b)}"
    extra = only_a or only_b
    side = "cached" if only_a else "new"
    return f"qualifier only in the {side} query: {_fmt(extra)}"


def _content_diff(a: Sequence[str], b: Sequence[str]) -> tuple[set[str], set[str], set[str]]:
    set_a, set_b = set(a), set(b)
    shared = set_a & set_b
    only_a = set_a - shared
    only_b = set_b - shared
    if len(only_a) * len(only_b) > PAIRING_BUDGET:
        return only_a, only_b, shared  # far more different words than the wording guard looks at
    # spellings and synonyms pair off
    for x in sorted(only_a):
        match = next((y for y in sorted(only_b) if similar_words(x, y) or _synonyms(x, y)), None)
        if match is not None:
            only_a.discard(x)
            only_b.discard(match)
            shared.add(x)
    # compounds: "wifi" vs "wi fi", "checkbox" vs "check box": the word and both its parts pair off
    for side, other_side, other in ((only_a, only_b, list(b)), (only_b, only_a, list(a))):
        for x, y in itertools.pairwise(other):
            if x + y in side:
                side.discard(x + y)
                other_side.discard(x)
                other_side.discard(y)
    return only_a, only_b, shared


def _synonyms(x: str, y: str) -> bool:
    gx = SYNONYMS.get(x)
    return gx is not None and gx == SYNONYMS.get(y)


GUARDS: tuple[tuple[str, Guard], ...] = (
    ("script", script_guard),
    ("negation", negation_guard),
    ("antonym", antonym_guard),
    ("number", number_guard),
    ("date", date_guard),
    ("entity", entity_guard),
    ("scope", scope_guard),
    ("direction", direction_guard),
    ("order", order_guard),
    ("person", person_guard),
    ("question", question_guard),
    ("wording", wording_guard),
)
"""Every guard, in the order :func:`check` runs them (cheapest and most specific first)."""

GUARD_NAMES = frozenset(name for name, _ in GUARDS)


def check(cached: str, query: str, *, disabled: frozenset[str] = frozenset()) -> str | None:
    """``None`` when ``query`` may be answered by the answer cached for ``cached``, else the first reason why not.

    The reason starts with the guard's name ("number: numbers differ: 5 vs 50").
    """
    a, b = analyze(cached), analyze(query)
    for name, guard in GUARDS:
        if name in disabled:
            continue
        reason = guard(a, b)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def check_all(cached: str, query: str) -> list[str]:
    """Every guard's objection (for explanations and tests); empty when the queries are compatible."""
    a, b = analyze(cached), analyze(query)
    out = []
    for name, guard in GUARDS:
        reason = guard(a, b)
        if reason is not None:
            out.append(f"{name}: {reason}")
    return out

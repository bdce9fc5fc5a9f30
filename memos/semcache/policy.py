"""Cache categories: similarity threshold, time to live and context policy per category, and feedback.

A category groups cached answers that share a risk profile: chat small talk can be answered by a
looser match than a code question, and volatile data (prices, stock, weather) must expire fast. A
:class:`CachePolicy` maps category names to :class:`CategoryPolicy` values; :func:`parse_policy`
builds one from plain JSON-like data (a cube's configuration) and names the offending field of a
malformed one. :func:`apply_feedback` is the adaptive part: a reported false hit raises that
category's threshold above the hit's similarity, correct hits lower it slowly, always within the
category's bounds. Everything here is pure: values in, new values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from memos.semcache.guards import GUARD_NAMES

__all__ = [
    "DEFAULT_CATEGORY",
    "DEFAULT_POLICY",
    "CachePolicy",
    "CategoryPolicy",
    "ContextPolicy",
    "PolicyError",
    "apply_feedback",
    "category_json",
    "parse_category",
    "parse_policy",
]

DEFAULT_CATEGORY = "default"


class ContextPolicy(StrEnum):
    """How a category treats conversation context (the turns before the query).

    - ``auto``: an entry stored with a context answers a lookup whose context is compatible (similar
      embedding, no conflicting numbers, dates or names); a self-contained query may also be answered
      across conversations when the history cannot change its meaning. A context-free entry answers
      lookups without context and self-contained queries.
    - ``strict``: as ``auto`` but without the self-contained exceptions: context-bound entries need a
      compatible context, context-free entries answer only lookups that carry no context.
    - ``ignore``: context plays no part (reference answers that never depend on the conversation).
    """

    AUTO = "auto"
    STRICT = "strict"
    IGNORE = "ignore"


class PolicyError(ValueError):
    """A malformed category configuration; ``field`` names the offending field ("categories.code.threshold")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


DEFAULT_MAX_ENTRIES = 100_000
"""Default quota per category and cube: the size issue 4's latency target is stated for."""
MAX_ENTRIES_LIMIT = 10_000_000
MAX_CATEGORIES = 64
"""Categories per cube, the built-in ones included."""
MAX_CATEGORY_NAME = 64
"""Characters in a category's name."""

NAME_SPACE = (
    " \t\n\x0b\x0c\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
"""What does not count as a category name's character: JSON Schema's (ECMAScript's) ``\\s``, written out, so the
published pattern (``memos.semcache.schemas``) and this check agree whatever regex engine reads the pattern."""
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600

# Bounds every threshold stays within, whatever the configuration or the feedback says. Below 0.5
# all-MiniLM-L6-v2 rates unrelated questions alike; at 1.0 nothing but the same text would hit.
THRESHOLD_FLOOR = 0.5
THRESHOLD_CEILING = 0.999


@dataclass(frozen=True, slots=True)
class CategoryPolicy:
    """Settings of one category. Build with :func:`parse_category` to get validation."""

    name: str
    threshold: float = 0.75
    """Minimum cosine similarity between the cached query and the new one."""
    ttl_seconds: int | None = 7 * 24 * 3600
    """How long an entry may be served after it was stored; ``None`` keeps it until invalidated."""
    context: ContextPolicy = ContextPolicy.AUTO
    context_threshold: float = 0.6
    """Minimum cosine similarity between the stored context and the lookup's context."""
    min_threshold: float = 0.7
    """Feedback never lowers ``threshold`` below this."""
    max_threshold: float = 0.98
    """Feedback never raises ``threshold`` above this."""
    disabled_guards: frozenset[str] = frozenset()
    """Guards this category does not run (names from :data:`memos.semcache.guards.GUARD_NAMES`)."""
    false_hit_floor: float = 0.0
    """Highest similarity of a reported false hit (plus the margin): correct hits never lower the threshold below it."""
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    """Quota: live entries a cube keeps in this category; storing past it evicts the least valuable ones.

    ``None`` lifts the quota (the service still bounds what it keeps in memory).
    """


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The categories of one cube and the one used when a request names none (or an unknown one)."""

    categories: Mapping[str, CategoryPolicy] = field(default_factory=dict)
    default: str = DEFAULT_CATEGORY

    def category(self, name: str | None) -> CategoryPolicy:
        """The policy of ``name``; the default category when ``name`` is ``None`` or not configured."""
        if name is not None and name in self.categories:
            return self.categories[name]
        return self.categories[self.default]

    def with_category(self, policy: CategoryPolicy) -> CachePolicy:
        """A copy with ``policy`` replacing (or adding) its category."""
        return CachePolicy({**self.categories, policy.name: policy}, self.default)


# Defaults chosen on the dev sets (bench/semcache.py), in the middle of flat regions rather than
# at a measured optimum: with the guards, traps-dev precision stays at 0.97 from 0.70 to 0.75 while
# recall falls from 0.72 to 0.67, and 0.80 drops recall under 0.60; the context threshold gives the
# same context-dev result anywhere from 0.50 to 0.65. Code answers are brittle to small wording
# changes (a different flag, a different language), so they need a closer match; volatile data
# lives one hour and never crosses conversations.
DEFAULT_POLICY = CachePolicy(
    {
        "default": CategoryPolicy("default"),
        "chat": CategoryPolicy("chat", threshold=0.75, ttl_seconds=30 * 24 * 3600),
        "code": CategoryPolicy("code", threshold=0.85, ttl_seconds=30 * 24 * 3600, min_threshold=0.8),
        "volatile": CategoryPolicy("volatile", threshold=0.85, ttl_seconds=3600, context=ContextPolicy.STRICT),
    }
)


# -- parsing and validation ----------------------------------------------------------------------

_FIELDS = frozenset(
    {
        "threshold",
        "ttl_seconds",
        "context",
        "context_threshold",
        "min_threshold",
        "max_threshold",
        "disabled_guards",
        "max_entries",
    }
)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(where, f"must be a finite number, not {value!r}")
    try:
        number = float(value)
    except OverflowError:
        # JSON bounds no integer's digits: one past float's range (math.isfinite raises on it too) was a 500 from
        # the API and a traceback from `memos admin import`. Not repr'd: an integer that long is no use in a message.
        raise PolicyError(where, "must be a finite number, not an integer that large") from None
    if not math.isfinite(number):
        raise PolicyError(where, f"must be a finite number, not {value!r}")
    return number


def _whole(value: Any) -> Any:
    """JSON's ``5.0`` is the integer 5 (as JSON Schema counts it); anything else is left for the checks."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _similarity(value: Any, where: str) -> float:
    number = _number(value, where)
    if not THRESHOLD_FLOOR <= number <= THRESHOLD_CEILING:
        raise PolicyError(where, f"must be between {THRESHOLD_FLOOR} and {THRESHOLD_CEILING}, not {number}")
    return number


def parse_category(
    name: str, data: Mapping[str, Any], *, base: CategoryPolicy | None = None, where: str = ""
) -> CategoryPolicy:
    """Validate one category's settings; fields left out keep the values of ``base`` (or the defaults).

    Raises :class:`PolicyError` naming the field, e.g. ``categories.code.threshold``.
    """
    prefix = where or f"categories.{name}"
    if not isinstance(name, str) or not name.strip(NAME_SPACE) or "\x00" in name or len(name) > MAX_CATEGORY_NAME:
        raise PolicyError(
            prefix, f"a category name must be a non-empty string of at most {MAX_CATEGORY_NAME} characters"
        )
    if not isinstance(data, Mapping):
        raise PolicyError(prefix, f"must be an object, not {type(data).__name__}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise PolicyError(f"{prefix}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    current = base if base is not None else DEFAULT_POLICY.categories.get(name, CategoryPolicy(name))
    current = replace(current, name=name)
    changes: dict[str, Any] = {}
    if "threshold" in data:
        changes["threshold"] = _similarity(data["threshold"], f"{prefix}.threshold")
    if "context_threshold" in data:
        changes["context_threshold"] = _similarity(data["context_threshold"], f"{prefix}.context_threshold")
    if "min_threshold" in data:
        changes["min_threshold"] = _similarity(data["min_threshold"], f"{prefix}.min_threshold")
    if "max_threshold" in data:
        changes["max_threshold"] = _similarity(data["max_threshold"], f"{prefix}.max_threshold")
    if "ttl_seconds" in data:
        ttl = _whole(data["ttl_seconds"])
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
                raise PolicyError(f"{prefix}.ttl_seconds", f"must be a positive integer or null, not {ttl!r}")
            if ttl > MAX_TTL_SECONDS:
                raise PolicyError(f"{prefix}.ttl_seconds", "must be at most ten years")
        changes["ttl_seconds"] = ttl
    if "max_entries" in data:
        quota = _whole(data["max_entries"])
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota <= 0):
            raise PolicyError(f"{prefix}.max_entries", f"must be a positive integer or null, not {quota!r}")
        if quota is not None and quota > MAX_ENTRIES_LIMIT:
            raise PolicyError(f"{prefix}.max_entries", f"must be at most {MAX_ENTRIES_LIMIT}")
        changes["max_entries"] = quota
    if "context" in data:
        try:
            changes["context"] = ContextPolicy(data["context"])
        except ValueError:
            allowed = ", ".join(p.value for p in ContextPolicy)
            raise PolicyError(f"{prefix}.context", f"must be one of {allowed}, not {data['context']!r}") from None
    if "disabled_guards" in data:
        guards = data["disabled_guards"]
        if isinstance(guards, str) or not isinstance(guards, list | tuple | frozenset | set):
            raise PolicyError(f"{prefix}.disabled_guards", "must be a list of guard names")
        # Anything but a known name is refused, non-strings too (a {} in the list was a 500: unhashable).
        bad = sorted(
            g if isinstance(g, str) else repr(g) for g in guards if not isinstance(g, str) or g not in GUARD_NAMES
        )
        if bad:
            raise PolicyError(
                f"{prefix}.disabled_guards", f"unknown guard {bad[0]!r} (known: {', '.join(sorted(GUARD_NAMES))})"
            )
        changes["disabled_guards"] = frozenset(guards)
    result = replace(current, **changes)
    if result.min_threshold > result.max_threshold:
        raise PolicyError(f"{prefix}.min_threshold", "must not exceed max_threshold")
    if not result.min_threshold <= result.threshold <= result.max_threshold:
        raise PolicyError(
            f"{prefix}.threshold",
            f"must lie within [min_threshold, max_threshold] = [{result.min_threshold}, {result.max_threshold}]",
        )
    return result


def parse_policy(data: Mapping[str, Any] | None, *, base: CachePolicy = DEFAULT_POLICY) -> CachePolicy:
    """Build a cube's policy from ``{"default": "chat", "categories": {"chat": {"threshold": 0.8}, ...}}``.

    Categories not mentioned keep ``base``'s settings; a mentioned category overrides only the fields
    it lists. ``default`` must name a category. Raises :class:`PolicyError` naming the first bad field.
    """
    if data is None:
        return base
    if not isinstance(data, Mapping):
        raise PolicyError("policy", f"must be an object, not {type(data).__name__}")
    unknown = sorted(set(data) - {"categories", "default"})
    if unknown:
        raise PolicyError(unknown[0], "unknown field (known: categories, default)")
    categories = dict(base.categories)
    raw = data.get("categories", {})
    if not isinstance(raw, Mapping):
        raise PolicyError("categories", f"must be an object, not {type(raw).__name__}")
    if len(categories) + len(set(raw) - set(categories)) > MAX_CATEGORIES:
        raise PolicyError("categories", f"at most {MAX_CATEGORIES} categories (the built-in ones count)")
    for name, settings in raw.items():
        categories[name] = parse_category(name, settings, base=categories.get(name))
    default = data.get("default", base.default)
    if not isinstance(default, str) or default not in categories:
        raise PolicyError("default", f"must name a configured category, not {default!r}")
    return CachePolicy(categories, default)


def category_json(policy: CategoryPolicy) -> dict[str, Any]:
    """A category's settings as :func:`parse_category` reads them (what a cube's configuration stores)."""
    return {
        "threshold": policy.threshold,
        "ttl_seconds": policy.ttl_seconds,
        "context": policy.context.value,
        "context_threshold": policy.context_threshold,
        "min_threshold": policy.min_threshold,
        "max_threshold": policy.max_threshold,
        "disabled_guards": sorted(policy.disabled_guards),
        "max_entries": policy.max_entries,
    }


# -- feedback ------------------------------------------------------------------------------------

FALSE_HIT_MARGIN = 0.01
"""A reported false hit moves the threshold this far above its similarity."""
CORRECT_HIT_STEP = 0.002
"""A confirmed correct hit near the threshold lowers it by this much: ten confirmations undo 0.02."""
CORRECT_HIT_WINDOW = 0.05
"""Only correct hits within this distance above the threshold say anything about the threshold."""


def apply_feedback(policy: CategoryPolicy, similarity: float, *, correct: bool) -> CategoryPolicy:
    """The category after one piece of feedback on a hit served at ``similarity``.

    A wrong hit raises the threshold to just above ``similarity`` (never above ``max_threshold``) and
    records that level, so later correct hits cannot bring the threshold back down to it. A correct
    hit close to the threshold lowers it by a small step, never below ``min_threshold`` nor below the
    recorded false hits. Feedback on a similarity outside [-1, 1] raises ``ValueError``.
    """
    if not math.isfinite(similarity) or not -1.0 <= similarity <= 1.0:
        raise ValueError(f"similarity must be within [-1, 1], not {similarity}")
    if not correct:
        level = min(policy.max_threshold, similarity + FALSE_HIT_MARGIN)
        return replace(
            policy,
            threshold=max(policy.threshold, level),
            false_hit_floor=max(policy.false_hit_floor, level),
        )
    if similarity - policy.threshold > CORRECT_HIT_WINDOW:
        return policy
    floor = max(policy.min_threshold, policy.false_hit_floor)
    # never below the floor, and a correct hit never raises a threshold that already sits under it
    return replace(policy, threshold=min(policy.threshold, max(policy.threshold - CORRECT_HIT_STEP, floor)))

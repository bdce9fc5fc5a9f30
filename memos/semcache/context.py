"""Conversation context: when may an answer cached in one conversation be served in another?

"cancel it" means one thing after a talk about a streaming plan and another after a talk about a gym
membership. A cached entry may carry the turns that came before its query (its *context*), stored as
text and as one embedding of :func:`context_text`. A lookup may carry its own previous turns. This
module decides whether the two contexts are compatible, deterministically and with an explanation:

- the two context embeddings must be close (``context_threshold``), and the contexts must not state
  different facts (one says £4,500 and the other £6,500, Monday vs Wednesday, LS6 vs HS1);
- a bare reply ("yes please", "the second one") means whatever the assistant just offered, so it
  also needs the same last assistant turn, option order included;
- a self-contained query ("Does Flixora offer a free trial?") does not depend on the history: it may
  cross conversations when it names its subject itself, or when both conversations are about the
  same named subject (the ``auto`` context policy; ``strict`` turns these exceptions off).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

import numpy as np
import numpy.typing as npt

from memos.embed.base import Embedder
from memos.semcache.guards import QueryFacts, analyze, check_all, mentions
from memos.semcache.lexicon import FILLERS, STOPWORDS, words
from memos.semcache.policy import ContextPolicy

__all__ = [
    "CONTEXT_WINDOW_CHARS",
    "ContextVerdict",
    "Turn",
    "as_turns",
    "compare_contexts",
    "context_facts",
    "context_text",
    "context_vector",
    "fact_conflict",
    "is_reply",
    "is_standalone",
]

Vector = npt.NDArray[np.float32]

FACTS_WINDOW_CHARS = 8000
"""How much of the newest history is read for facts: a swapped detail may sit many turns back."""

REPLY_TURNS = 2
"""How many of the newest assistant turns a bare reply needs to match."""

REPLY_WINDOW_CHARS = 1000
"""How much of the end of each of those turns the reply check reads (as much as :func:`context_text` embeds).

The offer a bare reply answers closes the turn ("... Want me to book it?"); the facts of the rest are
compared by :func:`fact_conflict`. Reading whole turns made one lookup cost minutes: a stored context may
hold a 64 KiB turn (more, if written before the limits applied to the memories API).
"""
REPLY_WINDOW_TOKENS = 150
"""Most words of each turn's tail compared in order: ``SequenceMatcher`` is quadratic in them (150: ~1 ms)."""

CONTEXT_WINDOW_CHARS = 1000
"""How much of the newest history :func:`context_text` keeps: about the 256 tokens the default encoder reads.

Without a cut the encoder would truncate the *end* of a long conversation, which is the part that
decides what "it" refers to.
"""


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a conversation."""

    role: str
    """``user``, ``assistant`` or ``system``."""
    content: str


def as_turns(items: Iterable[Turn | Mapping[str, Any]] | None) -> tuple[Turn, ...]:
    """Turns from :class:`Turn` values or ``{"role": ..., "content": ...}`` mappings; blank turns are dropped."""
    out: list[Turn] = []
    for i, item in enumerate(items or ()):
        if isinstance(item, Turn):
            turn = item
        elif isinstance(item, Mapping):
            role, content = item.get("role"), item.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(f"context[{i}] needs string 'role' and 'content'")
            turn = Turn(role, content)
        else:
            raise ValueError(f"context[{i}] must be a turn or a mapping, not {type(item).__name__}")
        if turn.content.strip():
            out.append(turn)
    return tuple(out)


def context_text(turns: Sequence[Turn], *, max_chars: int = CONTEXT_WINDOW_CHARS) -> str:
    """The text that stands for a context: the newest turns that fit in ``max_chars``, oldest first.

    Contents only, one turn a line. Role labels are left out: they are the same in every
    conversation and only pull unrelated contexts together. The newest turn is always kept (cut to
    ``max_chars`` if it alone is longer).
    """
    kept: list[str] = []
    size = 0
    for turn in reversed(turns):
        text = " ".join(turn.content.split())
        if kept and size + len(text) + 1 > max_chars:
            break
        kept.append(text[-max_chars:] if not kept else text)
        size += len(text) + 1
    return "\n".join(reversed(kept))


def context_sha256(text: str) -> str:
    """The hash a cached answer's context embedding is stored with: the embedding counts only for this text."""
    return hashlib.sha256(text.encode()).hexdigest()


def context_facts(turns: Sequence[Turn]) -> QueryFacts:
    """The facts (numbers, dates, names) of the newest ``FACTS_WINDOW_CHARS`` of a context; memoized.

    A service can call this when it stores an entry, so lookups find the stored side already read.
    """
    return analyze(context_text(turns, max_chars=FACTS_WINDOW_CHARS))


def context_vector(turns: Sequence[Turn], embed: Embedder | Callable[[list[str]], Vector]) -> Vector | None:
    """Embed :func:`context_text` of ``turns`` with ``embed`` (an embedder or its ``embed`` method).

    ``None`` for no turns: no context is not the same as an empty one.
    """
    if not turns:
        return None
    fn = embed.embed if isinstance(embed, Embedder) else embed
    vectors = np.asarray(fn([context_text(turns)]), dtype=np.float32)
    row: Vector = vectors[0]
    return row


# -- what a query needs from its context --------------------------------------------------------------

_ANAPHORA = words(
    "it its itself they them their theirs themselves he him his himself she her hers herself "
    "then instead again also too else same either former latter above"
)
_DEMONSTRATIVES = frozenset({"that", "this", "these", "those"})
_EXISTENTIAL_AFTER = frozenset({"is", "are", "was", "were", "will", "be", "been", "would", "should", "might", "may"})
_ONE_AFTER = words(
    "the which that this another other new old same first second third last next cheaper cheapest better best "
    "bigger biggest smaller smallest right"
)
_THERE = frozenset({"there"})
_ONE = frozenset({"one", "ones"})
_CONTINUATIONS = frozenset({"and", "but", "or", "also", "plus"})
_SELECTION = re.compile(
    r"\b(?:the|that|this)\s+(?:first|second|third|fourth|fifth|last|latter|former|other|next|previous|earlier|later)\b"
    r"|\b(?:option|number|choice)\s+(?:\d+|one|two|three|four|a|b|c)\b|\bwhat about\b|\bhow about\b",
    re.IGNORECASE,
)
_REPLY_WORDS = words(
    "yes yeah yep yup sure ok okay please go ahead do it that this one first second third last option fine "
    "sound sounds good great perfect thank thanks cheers no nope let lets let's then on right alright absolutely "
    "definitely course of brilliant lovely cool confirm proceed agreed deal both neither either done happy "
    "mate would like love the a an me you i we us will can for with that's it's is that'd"
)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", " ".join(text.lower().replace("\u2019", "'").split()))


def is_reply(query: str) -> bool:
    """A bare answer to the assistant's last turn ("yes please", "the second one", "go ahead").

    Its meaning is entirely that turn, so it may only be served after the very same offer.
    """
    tokens = _tokens(query)
    if not tokens or len(tokens) > 8:
        return False
    return all(t in _REPLY_WORDS or t in FILLERS or t.isdigit() for t in tokens)


def is_standalone(query: str) -> bool:
    """True when ``query`` can be understood without the conversation before it.

    A deterministic, conservative reading: no pronoun or demonstrative pointing back ("it", "that",
    "them", "there" outside "is there"), no selection from earlier options ("the second one", "option
    2"), no opening "and"/"but", not a bare reply, and at least one word of content.
    """
    if is_reply(query) or _SELECTION.search(query):
        return False
    tokens = _tokens(query)
    if not tokens or tokens[0] in _CONTINUATIONS:
        return False
    for i, word in enumerate(tokens):
        prev = tokens[i - 1] if i else ""
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if word in _ANAPHORA:
            return False
        if word in _DEMONSTRATIVES and (not prev or prev in STOPWORDS or prev in FILLERS):
            return False  # "is that allowed", "how do I set that up"; "the plan that I chose" is a relative clause
        if word in _THERE and prev not in _EXISTENTIAL_AFTER and nxt not in _EXISTENTIAL_AFTER:
            return False  # "get there" points back, "is there" does not
        if word in _ONE and (prev in _ONE_AFTER or not nxt):
            return False
    return bool(analyze(query).content)


# -- comparing two contexts ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContextVerdict:
    """Whether a cached entry's context allows it to answer a lookup, and why."""

    compatible: bool
    reason: str
    similarity: float | None = None
    """Cosine similarity of the two context embeddings, when both were compared."""


def fact_conflict(a: QueryFacts, b: QueryFacts) -> str | None:
    """Facts of one kind that each context states and the other does not: a swapped detail.

    One-sided facts are not a conflict (a chattier conversation mentions more); two different
    amounts, dates, times or names, each missing from the other side, are.
    """
    only_a, only_b = a.numbers - b.numbers, b.numbers - a.numbers
    if only_a and only_b:
        return f"the contexts state different numbers: {', '.join(sorted(only_a))} vs {', '.join(sorted(only_b))}"
    only_a, only_b = a.times - b.times, b.times - a.times
    if only_a and only_b:
        return f"the contexts state different times: {', '.join(sorted(only_a))} vs {', '.join(sorted(only_b))}"
    only_a, only_b = a.dates - b.dates, b.dates - a.dates
    if only_a and only_b:
        days_a = ", ".join(sorted(k.split(":", 1)[-1] for k in only_a))
        days_b = ", ".join(sorted(k.split(":", 1)[-1] for k in only_b))
        return f"the contexts state different dates: {days_a} vs {days_b}"
    names_a = {n for n in a.names if not mentions(b, n)}
    names_b = {n for n in b.names if not mentions(a, n)}
    if names_a and names_b:
        return f"the contexts name different things: {', '.join(sorted(names_a))} vs {', '.join(sorted(names_b))}"
    return None


def _shared_subject(a: QueryFacts, b: QueryFacts) -> set[str]:
    """Names both conversations use as names (a capitalized "Account" menu is not the lowercase "account")."""
    return set(a.names & b.names)


def _cosine(a: Vector, b: Vector) -> float:
    return float(np.dot(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)))


def compare_contexts(
    query: str,
    stored: Sequence[Turn] | None,
    stored_vec: Vector | None,
    lookup: Sequence[Turn] | None,
    lookup_vec: Vector | None,
    *,
    policy: ContextPolicy,
    threshold: float,
    reply_overlap: float = 0.9,
) -> ContextVerdict:
    """May an entry stored with context ``stored`` answer ``query`` asked after ``lookup``?

    ``stored``/``lookup`` are the turns before the query (``None`` or empty: no context);
    ``stored_vec``/``lookup_vec`` their :func:`context_vector` embeddings.
    """
    if policy is ContextPolicy.IGNORE:
        return ContextVerdict(True, "context ignored by this category")
    has_stored, has_lookup = bool(stored), bool(lookup)
    if not has_stored and not has_lookup:
        return ContextVerdict(True, "no context on either side")
    strict = policy is ContextPolicy.STRICT
    standalone = is_standalone(query)
    if not has_stored:
        if not strict and standalone:
            return ContextVerdict(True, "context-free entry, and the query is self-contained")
        why = "the category is strict" if strict else "the query depends on its conversation"
        return ContextVerdict(False, f"context-free entry cannot answer a query asked in a conversation ({why})")
    assert stored is not None
    if not has_lookup:
        if not strict and standalone and analyze(query).names:
            return ContextVerdict(True, "the query is self-contained and names its subject; the stored context is moot")
        return ContextVerdict(False, "the entry was stored within a conversation and the lookup carries no context")
    assert lookup is not None

    similarity: float | None = None
    if stored_vec is not None and lookup_vec is not None:
        similarity = _cosine(stored_vec, lookup_vec)
    elif context_text(stored) == context_text(lookup):
        similarity = 1.0

    if similarity is not None and similarity >= threshold:
        conflict = fact_conflict(context_facts(stored), context_facts(lookup))
        if conflict is None and is_reply(query):
            conflict = _reply_conflict(stored, lookup, reply_overlap)
        if conflict is None:
            return ContextVerdict(True, f"contexts agree (similarity {similarity:.3f} >= {threshold:.2f})", similarity)
        # a swapped detail in otherwise similar conversations is final, even for a self-contained query
        return ContextVerdict(False, f"contexts are similar ({similarity:.3f}) but {conflict}", similarity)

    if not strict and standalone:
        names = analyze(query).names
        if names:
            return ContextVerdict(
                True, f"the query is self-contained and names its subject ({', '.join(sorted(names))})", similarity
            )
        shared = _shared_subject(context_facts(stored), context_facts(lookup))
        if shared:
            return ContextVerdict(
                True,
                f"the query is self-contained and both conversations are about {', '.join(sorted(shared))}",
                similarity,
            )
    if similarity is None:
        return ContextVerdict(False, "the contexts differ and no context embeddings were given to compare them")
    return ContextVerdict(False, f"contexts differ (similarity {similarity:.3f} < {threshold:.2f})", similarity)


def _reply_conflict(stored: Sequence[Turn], lookup: Sequence[Turn], min_overlap: float) -> str | None:
    """A bare reply needs the same offer before it: the last assistant turns, word for word and in order.

    Order matters because "the first one" picks by position: the same two options listed the other
    way round are a different offer. Two turns are compared, as an offer is often followed by a
    short recap ("Both include a cabin bag. Want me to book one?").
    """
    recent_stored = _assistant_turns(stored, REPLY_TURNS)
    recent_lookup = _assistant_turns(lookup, REPLY_TURNS)
    if len(recent_stored) != len(recent_lookup):
        return "the reply follows a different exchange (not the same number of assistant turns)"
    for left, right in zip(map(_tail, recent_stored), map(_tail, recent_lookup), strict=True):
        a, b = analyze(left), analyze(right)
        overlap = SequenceMatcher(
            None, a.tokens[-REPLY_WINDOW_TOKENS:], b.tokens[-REPLY_WINDOW_TOKENS:], autojunk=False
        ).ratio()
        if overlap < min_overlap:
            return f"the reply answers a different assistant turn (word overlap {overlap:.2f} < {min_overlap:.2f})"
        objections = check_all(left, right)
        if objections:
            return f"the reply answers a different offer ({objections[0]})"
    return None


def _tail(text: str) -> str:
    """The last ``REPLY_WINDOW_CHARS`` of a turn, from a word's start (all of one long word if it has no space)."""
    text = text.rstrip()  # the cut then ends in a word: never an empty tail, which every other tail would match
    if len(text) <= REPLY_WINDOW_CHARS:
        return text
    tail = text[-REPLY_WINDOW_CHARS:]
    space = re.search(r"\s", tail)
    return tail[space.end() :] if space is not None else tail


def _assistant_turns(turns: Sequence[Turn], count: int) -> list[str]:
    """The assistant turns among the newest ``2 * count`` turns, newest first."""
    return [t.content for t in reversed(turns[-2 * count :]) if t.role == "assistant"][:count]

"""The semantic response cache's decision core: guards, category policies, context chains and ``decide()``.

This package knows nothing of HTTP or the database. The service embeds queries (and contexts with
:func:`context_vector`), fetches the nearest cached entries from its index, and asks :func:`decide`
whether to serve one of them. Importing it is cheap: no model, no torch.

- :mod:`memos.semcache.guards`: deterministic checks that two queries ask the same thing
  (negation, numbers, dates, names, scope, direction, wording).
- :mod:`memos.semcache.policy`: categories (threshold, TTL, context policy), validation, feedback.
- :mod:`memos.semcache.context`: conversation contexts and when they are compatible.
- :mod:`memos.semcache.decide`: the decision, with its explanation.
"""

from memos.semcache.context import (
    ContextVerdict,
    Turn,
    as_turns,
    compare_contexts,
    context_facts,
    context_text,
    context_vector,
    is_reply,
    is_standalone,
)
from memos.semcache.decide import Candidate, Decision, Rejection, decide
from memos.semcache.guards import GUARD_NAMES, QueryFacts, analyze, check, check_all
from memos.semcache.policy import (
    DEFAULT_CATEGORY,
    DEFAULT_POLICY,
    CachePolicy,
    CategoryPolicy,
    ContextPolicy,
    PolicyError,
    apply_feedback,
    category_json,
    parse_category,
    parse_policy,
)

__all__ = [
    "DEFAULT_CATEGORY",
    "DEFAULT_POLICY",
    "GUARD_NAMES",
    "CachePolicy",
    "Candidate",
    "CategoryPolicy",
    "ContextPolicy",
    "ContextVerdict",
    "Decision",
    "PolicyError",
    "QueryFacts",
    "Rejection",
    "Turn",
    "analyze",
    "apply_feedback",
    "as_turns",
    "category_json",
    "check",
    "check_all",
    "compare_contexts",
    "context_facts",
    "context_text",
    "context_vector",
    "decide",
    "is_reply",
    "is_standalone",
    "parse_category",
    "parse_policy",
]

"""Word lists the guards share: function words, conversational filler, antonyms, synonyms, scope poles.

The lists are general English, not phrases from any benchmark: each entry is there because swapping it
changes what a question asks (antonyms, scope words) or because it carries no meaning of its own in a
request (fillers). They are matched on light stems (:func:`stem`), so "increased" meets "increase".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache


def words(block: str) -> frozenset[str]:
    """A word list written as a block of text (easier to read and extend than a literal of 200 strings)."""
    return frozenset(block.split())


_NO_STRIP_S = re.compile(r"(?:ss|us|is|news)$")


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A light, deterministic stem: lowercase, no possessive, no plural and no -ing/-ed (``booking`` -> ``book``).

    Deliberately weaker than Porter: it only has to make inflections of one word meet, and a
    stronger stemmer merges words that mean different things ("general"/"generate").
    """
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.rstrip("'")
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith("sses"):
        return w[:-2]
    if len(w) > 4 and w.endswith(("ches", "shes", "xes", "zes")):
        return w[:-2]
    if len(w) > 5 and w.endswith("ing"):
        base = w[:-3]
        return base[:-1] if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz" else base
    if len(w) > 4 and w.endswith("ied"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith("ed") and not w.endswith("eed"):
        base = w[:-2]
        if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz":
            return base[:-1]
        # "increased" -> "increase", "closed" -> "close": keep the e the -ed ate when the base needs it
        return base + "e" if base.endswith(("as", "os", "us", "ov", "iv", "at", "ag", "uc", "ar", "ok", "in")) else base
    if len(w) > 3 and w.endswith("s") and not _NO_STRIP_S.search(w):
        return w[:-1]
    return w


def stems(items: Iterable[str]) -> frozenset[str]:
    return frozenset(stem(w) for w in items)


STOPWORDS = words(
    """
    a an the this that these those i me my mine myself we us our ours ourselves you your yours yourself
    he him his she her hers it its they them their theirs one ones someone something anyone anything
    do does did doing done can could would will shall should may might must is are was were be been being
    am have has had having get got getting gets obtain acquire request
    what which who whom whose when where why how there here
    and or but if then so than too very just also of in on at by for with about into onto from to up down
    out off over under as per via any some such own same other else again further once only
    let lets let's whether while whilst much many
    set make put give take go want try need needs must ought stay remain available availability offer offers
    provide provides exist exists
    """
)
"""Function words: they shape a question but do not name what it is about."""

FILLERS = words(
    """
    hi hello hey hiya heya howdy morning afternoon evening greetings dear team folks guys there
    um umm uh uhh er erm hmm ah oh well like yeah yes yep ok okay alright right sure so just actually
    really basically literally quickly quick question wondering wonder curious please pls plz kindly
    thanks thank thx cheers ta advance appreciate appreciated help tell know let lol haha btw anyway
    sorry excuse possible able way
    """
)
"""Conversational padding ("Hiya, um, could you tell me ... thanks!") that never changes the answer.

"way", "possible" and "able" are here because "is it possible to X" and "what's the way to X" ask X.
"""

NEGATORS = words("not no never none nobody nothing nowhere neither nor without non cannot")
"""Words that flip a clause's polarity: their count's parity is what the negation guard compares."""

NEGATIVE_PREFIXES = ("un", "non", "dis", "in", "im", "il", "ir", "de", "anti", "mis")
"""A word and the same word with one of these prefixes are opposites: "lock"/"unlock", "refundable"/"non-refundable"."""

OPPOSED_PREFIXES = (("in", "ex"), ("in", "de"), ("im", "ex"), ("up", "down"), ("over", "under"), ("in", "out"))
"""Prefix pairs that make opposites of one stem: include/exclude, increase/decrease, upload/download."""

# Pairs of opposites, one pair per line, alternatives after a slash. General English antonyms of the
# kind a question turns on: the action (add/remove), the direction (import/export), the judgement
# (benefit/drawback), the audience (adult/child). A pair fires only when each side uses its own word
# and not the other's, so "add or remove" in one query never triggers it.
_ANTONYM_TEXT = """
add/include/insert/attach | remove/delete/drop/detach/exclude/kick
accept/approve/confirm/agree/allow | decline/reject/refuse/deny/disagree/dispute
allow/permit/let/enable/authorise/authorize | ban/forbid/prohibit/block/disable/restrict/bar/prevent
legal/legally/lawful/lawfully/allow/permit | illegal/unlawful/ban/forbid/prohibit
include/cover | exclude/omit
increase/raise/grow/expand/extend/boost/higher/bigger/larger/more | decrease/reduce/lower/cut/shrink/smaller/less/fewer
upgrade | downgrade
upload | download
import | export
inbound/incoming/arrival/arrive/entry/enter | outbound/outgoing/departure/depart/exit
input | output
join/enrol/enroll/subscribe/sign/register/opt | leave/unenrol/unsubscribe/cancel/deregister/withdraw
deposit/save | withdraw/spend
buy/purchase | sell
lend | borrow
send | receive
win/won | lose/lost
pass | fail
success/successful | failure/unsuccessful
open/opening | close/closing/shut
start/begin/commence | stop/end/finish/cease
activate/enable | deactivate/disable
connect | disconnect
lock/freeze/block | unlock/unfreeze/unblock
mute | unmute
hide/conceal | show/reveal/display
public | private
visible | hidden/invisible
online | offline/paper/postal
attach | detach
merge | split
encrypt | decrypt
install | uninstall
credit | debit
income/revenue/profit/gain | expense/cost/loss
asset | liability
benefit/advantage/pro/upside/strength | drawback/disadvantage/con/downside/weakness/risk
best/top | worst
good/better/great/excellent/outstanding | bad/worse/poor/inadequate/terrible/awful
safe/harmless | unsafe/dangerous/harmful/risky
legal/lawful/legally/lawfully | illegal/unlawful/illegally/unlawfully
true | false
right/correct | wrong/incorrect
hot/warm/heat | cold/cool/freezing
heavy | light
fast/quick/quickly/rapid | slow/slowly
early/earliest/earlier | late/latest/later
cheap/cheapest/cheaper/affordable | expensive/dearest/pricey
high/highest | low/lowest
long/longest/longer | short/shortest/shorter
big/large/biggest/largest | small/little/smallest/tiny
old/older/oldest/senior/elderly | young/younger/youngest/junior/new/newer/newest
male/man/men/boy/husband/gentleman | female/woman/women/girl/wife/lady
father/dad/son/brother | mother/mum/mom/daughter/sister
adult/grown | child/children/kid/baby/infant/toddler/teen/teenager/minor
busy/crowded/packed | quiet/empty
full | empty/part/partial
wet | dry
compulsory/mandatory/required/obligatory | optional/voluntary/elective
maximum/max/most/upper | minimum/min/least/lower
north/northern | south/southern
east/eastern | west/western
left | right
top/upper | bottom/lower
front | back/rear
inside/indoor/internal | outside/outdoor/external
domestic/national/local | international/overseas/abroad/foreign
positive | negative
plus | minus
easy/simple/easier/easiest | hard/difficult/harder/complex/complicated
rich | poor
love/like | hate/dislike
happy | sad
eat/take/use/recommend/drink | avoid
keep/continue/renew/retain | cancel/end/terminate/stop/discontinue
employer | employee
buyer | seller
tenant/renter | landlord/landlady
lender | borrower
sender | recipient
teacher | student/pupil
day | night
morning | evening/afternoon
"""

ANTONYM_PAIRS: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (stems(left.split("/")), stems(right.split("/")))
    for left, right in (line.split("|") for line in _ANTONYM_TEXT.strip().splitlines())
    if left.strip() and right.strip()
    for left, right in [(left.strip(), right.strip())]
)
"""(one side, the other side) stem sets."""

OPPOSED_PARTICLES = {"on": "off", "off": "on", "in": "out", "out": "in", "up": "down", "down": "up"}
"""Particles that reverse a phrasal verb: "turn on"/"turn off", "opt in"/"opt out", "log in"/"log out"."""

# Groups of words that mean the same in a request. General synonyms only; a missing one costs a
# cache miss, never a wrong answer.
_SYNONYM_TEXT = """
change/switch/update/modify/edit/amend/alter
start/begin/commence
make/create/generate/set/setup
buy/purchase/order
remove/delete/erase
shop/store/branch
street/road
fix/repair/mend
cost/price/fee/charge/pay
check/view/see/find/look
contact/reach/call/phone/ring
help/assist/support
kid/child/children/kids
car/vehicle
home/house
trip/journey/travel
fast/quick/quickly/soon/rapid
cancel/end/terminate
big/large
small/little
end/finish
register/enrol/enroll/sign
permit/allow/let
allowed/permitted
document/paperwork/docs
holiday/vacation/leave
phone/mobile/cell
money/funds/cash
talk/speak
answer/reply/respond
need/require
able/can
error/problem/issue/fault
submit/file/lodge
dispute/challenge/contest
"""

SYNONYMS: dict[str, int] = {
    stem(word): group for group, line in enumerate(_SYNONYM_TEXT.strip().splitlines()) for word in line.split("/")
}
"""Stem -> synonym group id; two stems with the same id count as the same word in the content comparison."""

SCOPE_POLES: dict[str, dict[str, frozenset[str]]] = {
    "quantity": {
        "all": words("all every each both entire whole everything everyone everybody always"),
        "some": words("some any single several few partial sometimes either"),
        "none": words("none nothing nobody neither"),
    },
    "order": {
        "first": words("first earliest initial"),
        "last": words("last final latest"),
        "next": words("next following upcoming"),
        "previous": words("previous prior preceding"),
    },
    "time relation": {
        "before": words("before prior ahead pre until till"),
        "after": words("after post since later"),
        "during": words("within during inside while"),
    },
    "comparison": {
        "more": words("more greater higher bigger larger longer most maximum max exceed exceeding above over"),
        "less": words("less fewer lower smaller shorter least minimum min below under"),
    },
}
"""Scope dimensions and their poles. Two queries that take different poles of one dimension ask different things."""

COMPARATIVE_PREPOSITIONS = frozenset({"over", "under", "above", "below"})
"""Scope words only when a number follows ("orders over £50"); otherwise plain prepositions ("under the warranty")."""

REASON_MARKERS = re.compile(r"\bwhy\b|\bhow come\b|\bwhat (?:is |are )?(?:the )?(?:cause|causes|reason|reasons)\b")
"""A question asking for a reason; its answer is not the answer to "how" or "what" about the same thing."""

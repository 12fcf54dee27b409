"""Who rated what, and how much one rater may weigh: what keeps a single caller from steering the retraining data.

A *rater* is the identity a vote can be pinned on: its API key when the service runs with keys (a key is one rater,
whatever client ids it sends, so inventing client ids under one key buys nothing), else its client id (without keys
the service cannot tell callers apart; it is meant for 127.0.0.1 then). Two rules use it, both in
``monitor.retrain_data``:

- ``min_raters``: a generation's good rating counts only once that many distinct raters voted on it;
- ``max_rater_share``: of the generations that end up kept, one rater's votes may count on at most that share
  (rounded down, and always at least one). ``settle`` finds the votes that stay within it: it asks the caller which
  generations would be kept with the votes counted so far, and where a rater is over the limit it stops counting that
  rater's newest votes on kept generations, then asks again, until every rater is within the limit of what is kept.
  Only votes on kept generations are ever set aside (a low vote always counts), each round sets at least one aside,
  so it ends; a generation whose good votes came from one heavy rater leaves the data, one that others rated well
  too stays on their votes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence


@dataclass(frozen=True)
class Vote:
    """One feedback row with a rating or a thumb (thumbs as +1/-1)."""

    feedback_id: int
    generation_id: str
    rater: str
    rating: Optional[float]
    thumbs: Optional[float]


def rater_of(client_id: str, api_key_id: Optional[int]) -> str:
    """The rater behind a feedback row: its key (``key:<id>``) when it has one, else its client id."""
    return f"key:{int(api_key_id)}" if api_key_id is not None else f"client:{client_id}"


def one_per_rater(votes: Iterable[Vote]) -> list[Vote]:
    """One vote per (generation, rater): a key that sent several client ids on one generation is one rater there,
    its ratings (and thumbs) averaged, dated by its first row. Ordered by that first row."""
    groups: dict[tuple[str, str], list[Vote]] = defaultdict(list)
    for v in votes:
        groups[(v.generation_id, v.rater)].append(v)
    out = []
    for (gid, rater), vs in groups.items():
        r = [float(v.rating) for v in vs if v.rating is not None]
        t = [float(v.thumbs) for v in vs if v.thumbs is not None]
        out.append(Vote(min(v.feedback_id for v in vs), gid, rater, sum(r) / len(r) if r else None,
                        sum(t) / len(t) if t else None))
    return sorted(out, key=lambda v: v.feedback_id)


@dataclass(frozen=True)
class Tally:
    """A generation's counted votes: mean rating and count, mean thumbs and count, the raters, and how many of its
    votes were set aside (over their rater's share)."""

    generation_id: str
    rating: Optional[float]
    ratings: int
    thumbs: Optional[float]
    thumbs_n: int
    raters: frozenset[str]
    set_aside: int = 0


def tally(votes: Iterable[Vote], set_aside: frozenset[int] | set[int] = frozenset()) -> dict[str, Tally]:
    """Per generation, the tally of its votes not in ``set_aside`` (a generation with none counted is absent)."""
    ratings: dict[str, list[float]] = defaultdict(list)
    thumbs: dict[str, list[float]] = defaultdict(list)
    raters: dict[str, set[str]] = defaultdict(set)
    aside: dict[str, int] = defaultdict(int)
    for v in votes:
        if v.feedback_id in set_aside:
            aside[v.generation_id] += 1
            continue
        raters[v.generation_id].add(v.rater)
        if v.rating is not None:
            ratings[v.generation_id].append(float(v.rating))
        if v.thumbs is not None:
            thumbs[v.generation_id].append(float(v.thumbs))
    out = {}
    for gid, who in raters.items():
        r, t = ratings[gid], thumbs[gid]
        out[gid] = Tally(gid, sum(r) / len(r) if r else None, len(r), sum(t) / len(t) if t else None, len(t),
                         frozenset(who), aside[gid])
    return out


def share_limit(max_share: float, kept: int) -> int:
    """How many kept generations one rater's votes may count on: ``max_share`` of them, rounded down, at least 1."""
    return max(1, math.floor(max_share * kept + 1e-9))


@dataclass
class Settled:
    """The outcome of ``settle``: the tallies of the counted votes, the kept generations (in the order ``select``
    gave them), the set-aside vote ids, the final per-rater limit, and per rater the kept generations it counts on."""

    tallies: dict[str, Tally]
    kept: list[str]
    set_aside: set[int]
    limit: int
    counted_on: dict[str, int] = field(default_factory=dict)
    rounds: int = 0


def settle(votes: Sequence[Vote], select: Callable[[dict[str, Tally]], list[str]], max_share: float) -> Settled:
    """Set aside the fewest newest votes that bring every rater within ``max_share`` of the kept generations.

    ``select(tallies)`` returns the generations that would be kept given those tallies (the caller's rules: ratings,
    ``min_raters``, images, ``max_new_images``). A rater's oldest votes count first: a rater cannot push out its own
    earlier votes, or anyone else's, by voting more. ``votes`` are first reduced to one per rater and generation."""
    ordered = one_per_rater(votes)
    set_aside: set[int] = set()
    rounds = 0
    while True:
        rounds += 1
        tallies = tally(ordered, set_aside)
        kept = select(tallies)
        limit = share_limit(max_share, len(kept))
        in_kept = set(kept)
        per_rater: dict[str, list[Vote]] = defaultdict(list)
        for v in ordered:
            if v.feedback_id not in set_aside and v.generation_id in in_kept:
                per_rater[v.rater].append(v)
        over = {v.feedback_id for vs in per_rater.values() for v in vs[limit:]}
        if not over:
            counted = {r: len(vs) for r, vs in per_rater.items()}
            return Settled(tallies, kept, set_aside, limit, counted, rounds)
        set_aside |= over

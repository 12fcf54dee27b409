"""``sdloop review summary DIR``: B's win rate over A with a 95% interval and a two-sided sign test, from the votes
that count, and what did not count and why.

A vote counts when its reviewer id was signed by this folder's secret (``finetune.evaluation.review``): the page
stores no other vote, so the only stored votes that do not count are ones cast before reviewer ids were signed, or
under another secret (``review.secret`` replaced). Votes the page refused (a reviewer cookie it never signed, an
altered one, a malformed request) were never stored; their counts per reason are reported beside the result, so a
flood of invented reviewers shows up as refused, never as evidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune.evaluation.metrics import sign_test, wilson
from finetune.evaluation.review import (REVIEWER_ID, DatabaseError, ReviewError, database, load_review, review_secret,
                                        secret_id)

DROPPED_WORDS = {"unsigned": "cast before reviewer ids were signed", "other_secret": "signed by another secret "
                 "(review.secret was replaced)", "no_secret": "the folder has no review.secret to check them with"}
REFUSED_WORDS = {"unsigned": "reviewer cookie not made by this page (invented)", "bad_signature": "reviewer cookie "
                 "altered or signed by another secret", "no_cookie": "no reviewer cookie",
                 "bad_request": "malformed vote (pair or choice)", "too_large": "request too large",
                 "no_length": "no Content-Length", "timeout": "request not sent in time"}


@dataclass
class ReviewSummary:
    folder: str
    pairs: int
    votes: int                        # votes that count
    reviewers: int
    a_wins: int
    b_wins: int
    ties: int
    b_win_rate: Optional[float]       # among votes with a preference
    interval: tuple[Optional[float], Optional[float]]
    p_value: Optional[float]          # two-sided sign test against "no difference"
    runs: dict[str, str]
    dropped: dict[str, int] = field(default_factory=dict)   # stored votes not counted, per reason
    refused: dict[str, int] = field(default_factory=dict)   # votes the page refused, per reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        rate = "n/a" if self.b_win_rate is None else (
            f"{self.b_win_rate:.2f} (95% interval {self.interval[0]:.2f}-{self.interval[1]:.2f}, Wilson)")
        if self.p_value is None:
            test = "no votes with a preference yet"
        else:
            test = (f"p = {self.p_value:.3g}: " + ("the runs differ (p < 0.05)" if self.p_value < 0.05 else
                                                    "no significant difference at 0.05"))
        dropped = ", ".join(f"{n} {DROPPED_WORDS.get(k, k)}" for k, n in self.dropped.items()) or "none"
        refused = ", ".join(f"{n} {REFUSED_WORDS.get(k, k)}" for k, n in self.refused.items()) or "none"
        return [f"review {self.folder}: A = {self.runs.get('a')}, B = {self.runs.get('b')}, {self.pairs} pairs",
                f"votes:        {self.votes} from {self.reviewers} signed reviewer(s): A preferred {self.a_wins}, "
                f"B preferred {self.b_wins}, no preference {self.ties}",
                f"B win rate:   {rate} (votes with a preference)",
                f"sign test:    {test} (two-sided exact binomial against 50/50, no-preference votes left out)",
                f"not counted:  {sum(self.dropped.values())} stored vote(s): {dropped}",
                f"refused:      {sum(self.refused.values())} vote(s) the page did not store: {refused}"]


def _why_dropped(reviewer: str, sid: Optional[str], ours: Optional[str]) -> Optional[str]:
    """None when a stored vote counts, else the reason (a key of DROPPED_WORDS)."""
    if sid is None or not REVIEWER_ID.fullmatch(str(reviewer)):
        return "unsigned"
    if ours is None:
        return "no_secret"
    return None if sid == ours else "other_secret"


def summarize(review_dir: str | Path) -> ReviewSummary:
    """Win rate of B over A with a 95% interval, vote and reviewer counts, and a two-sided sign test, from the votes
    of signed reviewers only; the votes not counted and the votes refused, per reason."""
    folder = Path(review_dir).expanduser()
    data = load_review(folder)
    if not (folder / "votes.sqlite").is_file():
        raise ReviewError(f"{folder} has no votes.sqlite; serve the review with `sdloop review RUN_A RUN_B`.")
    secret = review_secret(folder, create=False)
    ours = secret_id(secret) if secret else None
    try:
        with database(folder / "votes.sqlite") as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(votes)")}
            sid = "secret_id" if "secret_id" in columns else "NULL"
            rows = conn.execute(f"SELECT reviewer, winner, {sid} FROM votes").fetchall()
            has_refused = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'refused'").fetchone()
            refused = dict(conn.execute("SELECT reason, count FROM refused ORDER BY reason").fetchall()) \
                if has_refused else {}
    except DatabaseError as e:
        raise ReviewError(f"{folder / 'votes.sqlite'} cannot be read ({e}); it is damaged.") from None
    dropped: dict[str, int] = {}
    counted = []
    for reviewer, winner, vote_sid in rows:
        why = _why_dropped(reviewer, vote_sid, ours)
        if why is None:
            counted.append((reviewer, winner))
        else:
            dropped[why] = dropped.get(why, 0) + 1
    a_wins = sum(w == "a" for _, w in counted)
    b_wins = sum(w == "b" for _, w in counted)
    decided = a_wins + b_wins
    return ReviewSummary(str(folder), len(data["pairs"]), len(counted), len({r for r, _ in counted}), a_wins, b_wins,
                         len(counted) - decided, b_wins / decided if decided else None, wilson(b_wins, decided),
                         sign_test(b_wins, a_wins), data.get("runs", {}), dropped, refused)

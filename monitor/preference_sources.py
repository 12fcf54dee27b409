"""Where a preference retraining's evidence comes from: feedback rows, two-candidate choices, review votes.

Part of ``monitor.preference_data`` (which decides, weighs the raters and writes the folder): each source turns its
rows into candidate ``Example``s (a single image, or a pair of images of one prompt) and ``Vote``s on them, in the
form ``monitor.raters`` weighs, so a thumbs, a choice and a review vote are capped by one rule. A pair's vote is +1
for its first side and -1 for its second (``Vote.thumbs``), so the mean over raters says which side won and by how
much. A source marks an example it can never use (``problem``: its image is gone, its generation is not in the log),
and counts the votes it skips outright (``unsigned``, ``unknown_pair``, ``no_preference``) with a note each.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from monitor.config import MonitorConfig
from monitor.raters import Vote, rater_of
from monitor.retrain_select import image_of
from monitor.store import Store


@dataclass
class Example:
    """One candidate example: a single (``images`` = [image]) or a pair ([side a, side b]) with its votes."""

    key: str
    kind: str                              # "single" | "pair"
    prompt: str
    images: list[Optional[Path]]
    source: str                            # "feedback" | "choice" | "review"
    ids: list[Optional[str]]               # generation ids (or review pair images) of the sides, for the record
    problem: str = ""                      # a reason it can never be used (missing_image, unknown_generation)
    detail: str = ""


def singles(store: Store, since: Optional[dt.datetime]) -> tuple[dict[str, Example], list[Vote]]:
    rows, _ = store.rating_votes(since)
    examples = {}
    for r in rows:
        image = image_of(r["image_path"])
        examples[r["generation_id"]] = Example(
            r["generation_id"], "single", r["prompt"], [image], "feedback", [r["generation_id"]],
            "" if image else "missing_image", "" if image else f"its image {r['image_path'] or '(none kept)'} is gone")
    votes = [Vote(int(r["feedback_id"]), r["generation_id"], rater_of(r["client_id"], r["api_key_id"]), r["rating"],
                  r["thumbs"]) for r in rows]
    return examples, votes


def choices(store: Store, since: Optional[dt.datetime]) -> tuple[dict[str, Example], list[Vote]]:
    """Two-candidate choices: one example per pair; each choice a vote, +1 for side a, -1 for side b."""
    examples: dict[str, Example] = {}
    votes = []
    for r in store.pair_choices(since):
        key = f"pair:{r['pair_id']}"
        if key not in examples:
            sides = [(r["generation_a"], r["prompt_a"], r["image_a"]), (r["generation_b"], r["prompt_b"], r["image_b"])]
            ex = Example(key, "pair", r["prompt_a"] or r["prompt_b"] or "", [image_of(s[2]) for s in sides],
                         "choice", [s[0] for s in sides])
            gone = [s[0] for s in sides if s[1] is None]
            if gone:
                ex.problem, ex.detail = "unknown_generation", f"generation {gone[0]} is not in the generation log"
            elif None in ex.images:
                miss = sides[ex.images.index(None)]
                ex.problem, ex.detail = "missing_image", f"one side's image ({miss[2] or 'none kept'}) is gone"
            examples[key] = ex
        votes.append(Vote(int(r["choice_id"]), key, rater_of(r["client_id"], r["api_key_id"]), None,
                          1.0 if r["chosen"] == r["generation_a"] else -1.0))
    return examples, votes


def review_folders(cfg: MonitorConfig) -> list[Path]:
    """The review folders whose votes count: ``review_dirs``, else every review folder in the workspace."""
    from sdloop.workspace import home

    if cfg.review_dirs:
        return [Path(d).expanduser() for d in cfg.review_dirs]
    root = home() / "reviews"
    return sorted(p for p in root.iterdir() if (p / "review.json").is_file()) if root.is_dir() else []


def reviews(folders: list[Path], skipped: Counter, notes: list[dict[str, Any]],
             first_id: int) -> tuple[dict[str, Example], list[Vote]]:
    """Review votes: one example per (folder, pair); a vote for run a is +1, for run b -1; "none" is no vote.
    Votes of reviewers the page did not sign, and votes for a pair the folder does not hold, are skipped."""
    from finetune.evaluation.review import REVIEWER_ID, DatabaseError, ReviewError, database, load_review, \
        review_secret, secret_id

    examples: dict[str, Example] = {}
    votes: list[Vote] = []
    next_id = first_id
    for folder in folders:
        tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
        try:
            data = load_review(folder)
            secret = review_secret(folder, create=False)
            ours = secret_id(secret) if secret else None
            with database(folder / "votes.sqlite") as conn:
                cols = {row[1] for row in conn.execute("PRAGMA table_info(votes)")}
                sid = "secret_id" if "secret_id" in cols else "NULL"
                rows = conn.execute(f"SELECT id, reviewer, pair, winner, {sid} FROM votes ORDER BY id").fetchall()
        except (ReviewError, DatabaseError, OSError) as e:
            notes.append({"source": "review", "folder": str(folder), "decision": "out",
                          "reason": f"the review folder cannot be read: {e}"})
            continue
        pairs = {p["id"]: p for p in data["pairs"]}
        for vid, reviewer, pair, winner, vote_sid in rows:
            key = f"review:{tag}:{pair}"
            if vote_sid is None or ours is None or vote_sid != ours or not REVIEWER_ID.fullmatch(str(reviewer)):
                skipped["unsigned"] += 1
                continue
            if pair not in pairs:
                skipped["unknown_pair"] += 1
                notes.append({"source": "review", "folder": str(folder), "pair": pair, "decision": "out",
                              "reason": f"unknown_pair: a vote for pair {pair}, which {folder / 'review.json'} does "
                                        "not hold; skipped"})
                continue
            if winner not in ("a", "b"):
                skipped["no_preference"] += 1
                continue
            if key not in examples:
                p = pairs[pair]
                sides = [folder / p["a"], folder / p["b"]]
                ex = Example(key, "pair", p["prompt"], [s if s.is_file() else None for s in sides], "review",
                             [f"{folder.name}/{p['a']}", f"{folder.name}/{p['b']}"])
                if None in ex.images:
                    ex.problem, ex.detail = "missing_image", f"{sides[ex.images.index(None)]} is gone"
                examples[key] = ex
            next_id += 1
            votes.append(Vote(next_id, key, f"review:{reviewer}", None, 1.0 if winner == "a" else -1.0))
    return examples, votes

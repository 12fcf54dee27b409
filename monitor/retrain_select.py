"""Which rated generations join the retraining data, which are held out for the gate, and why the others stay out.

Part of ``monitor.retrain_data`` (which adds the champion's data, places the files and runs the dataset check). The
votes are read one by one (``Store.rating_votes``) and weighed per rater (``monitor.raters``): a generation joins when
the mean of its counted ratings is at or above ``keep_rating`` (or its thumbs are up, without ratings), nobody's
votes pull it to ``drop_rating`` or a thumbs down, at least ``min_raters`` distinct raters voted on it and its image is
still there; the best first, at most ``max_new_images``; and no rater's votes count on more than ``max_rater_share`` of
the kept ones. Of the kept generations a fixed share (``gate_holdout_share``, chosen by a hash of the generation id,
so the same ones on every retraining) is held out of the training data: the gate's KID reference, images neither
the champion nor the challenger trained on.

Every generation with a vote gets one decision and one reason, and each reason is counted: ``dropped_low``,
``middling``, ``too_few_raters``, ``rater_cap`` (good only with votes over their rater's share), ``missing_image``,
``over_limit``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from monitor.config import MonitorConfig
from monitor.raters import Settled, Tally, Vote, one_per_rater, rater_of, settle, tally
from monitor.store import Store

REASONS = ("dropped_low", "middling", "too_few_raters", "rater_cap", "missing_image", "over_limit")


def judge(t: Tally, cfg: MonitorConfig) -> tuple[str, str]:
    """("keep" | "dropped_low" | "middling" | "too_few_raters", the reason with its numbers) for one tally."""
    said = []
    if t.rating is not None:
        said.append(f"mean rating {t.rating:.2f} of {t.ratings} rater(s)")
    if t.thumbs is not None:
        said.append(f"thumbs {t.thumbs:+.2f} (mean of {t.thumbs_n})")
    votes = ", ".join(said)
    if t.rating is not None and t.rating <= cfg.drop_rating:
        return "dropped_low", f"{votes}: at or below drop_rating {cfg.drop_rating}"
    if t.thumbs is not None and t.thumbs < 0:
        return "dropped_low", f"{votes}: thumbs down"
    if (t.rating is not None and t.rating >= cfg.keep_rating) or (t.rating is None and (t.thumbs or 0) > 0):
        why = f"{votes}: " + (f"at or above keep_rating {cfg.keep_rating}" if t.rating is not None else "thumbs up")
        if len(t.raters) < cfg.min_raters:
            return "too_few_raters", f"{why}, but from {len(t.raters)} distinct rater(s), fewer than min_raters " \
                                     f"{cfg.min_raters}"
        return "keep", why
    return "middling", f"{votes}: between drop_rating {cfg.drop_rating} and keep_rating {cfg.keep_rating}"


def image_of(image_path: Optional[str]) -> Optional[Path]:
    """The stored image of a generation (a relative path is under the workspace's generations folder), or None."""
    from sdloop.workspace import generations_dir

    if not image_path:
        return None
    path = Path(image_path).expanduser()
    if not path.is_absolute():
        path = generations_dir() / path
    return path if path.is_file() else None


def holdout_size(kept: int, share: float) -> int:
    """How many of ``kept`` generations the gate holds out: ``share`` of them, at least 2 (KID needs two reference
    images), at most half; none when fewer than 4 are kept or the share is 0."""
    if share <= 0 or kept < 4:
        return 0
    return min(kept // 2, max(2, round(share * kept)))


def _holdout_rank(gid: str) -> str:
    return hashlib.sha256(f"sdloop-gate-holdout:{gid}".encode()).hexdigest()


@dataclass
class Selection:
    """The decision on every voted generation (entries in ``retrain_data.json``'s form), the counts, the raters."""

    entries: list[dict[str, Any]]
    counts: dict[str, int]
    raters: dict[str, Any]
    disliked: dict[str, str] = field(default_factory=dict)   # generation id -> why, for the champion's data


def select_generations(store: Store, cfg: MonitorConfig, since: Optional[dt.datetime],
                       hold_out: bool) -> Selection:
    """Decide every generation voted on since ``since``: in (the training data), gate (held out, when
    ``hold_out``), or out with its reason; see the module docstring."""
    rows, unrated = store.rating_votes(since)
    info = {r["generation_id"]: r for r in rows}
    votes = one_per_rater(Vote(int(r["feedback_id"]), r["generation_id"], rater_of(r["client_id"], r["api_key_id"]),
                               r["rating"], r["thumbs"]) for r in rows)
    images = {gid: image_of(r["image_path"]) for gid, r in info.items()}

    def best_first(t: Tally) -> tuple:
        created = info[t.generation_id]["created"]
        return (-(t.rating or 0.0), -(t.thumbs or 0.0), -(t.ratings + t.thumbs_n),
                -(created.timestamp() if created else 0.0), t.generation_id)

    def select(tallies: dict[str, Tally]) -> list[str]:
        ok = [t for t in tallies.values() if judge(t, cfg)[0] == "keep" and images[t.generation_id] is not None]
        return [t.generation_id for t in sorted(ok, key=best_first)][:cfg.max_new_images]

    settled = settle(votes, select, cfg.max_rater_share)
    everyone = tally(votes)  # what the votes say when every one of them counts
    aside = {gid: sum(v.feedback_id in settled.set_aside for v in votes if v.generation_id == gid)
             for gid in {v.generation_id for v in votes if v.feedback_id in settled.set_aside}}
    n_hold = holdout_size(len(settled.kept), cfg.gate_holdout_share) if hold_out else 0
    held = set(sorted(settled.kept, key=_holdout_rank)[:n_hold])
    counts = {"rated": len(info), "unrated": unrated, **dict.fromkeys(REASONS, 0), "held_out": 0,
              "votes_set_aside": len(settled.set_aside)}
    entries, disliked = [], {}
    kept = set(settled.kept)
    for gid in sorted(info, key=lambda g: best_first(settled.tallies.get(g) or everyone[g])):
        entries.append(_decide(gid, info[gid], settled, everyone[gid], aside.get(gid, 0), images[gid], kept, held,
                               cfg, counts, disliked))
    return Selection(entries, counts, _raters_summary(votes, settled, cfg), disliked)


def _decide(gid: str, row: dict[str, Any], settled: Settled, full: Tally, aside: int, image: Optional[Path],
            kept: set[str], held: set[str], cfg: MonitorConfig, counts: dict[str, int],
            disliked: dict[str, str]) -> dict[str, Any]:
    """One generation's entry; counts its reason and records it in ``disliked`` when its votes drop it."""
    t = settled.tallies.get(gid)
    verdict, why = judge(t, cfg) if t is not None else ("rater_cap", "")
    e = {"source": "generation", "generation_id": gid, "source_path": row["image_path"], "caption": row["prompt"],
         "rating": (t or full).rating, "thumbs": (t or full).thumbs, "raters": len((t or full).raters),
         "file": None, "decision": "out", "reason": why}
    if gid in kept:
        suffix = image.suffix.lower() if image and image.suffix else ".png"
        if gid in held:
            counts["held_out"] += 1
            e.update(file=f"gate/{gid}{suffix}", source_path=str(image), decision="gate",
                     reason=f"{why}; held out of the training data as the gate's KID reference")
        else:
            e.update(file=f"generated/{gid}{suffix}", source_path=str(image), decision="in")
        return e
    if verdict == "dropped_low":
        disliked[gid] = why
    full_verdict, full_why = judge(full, cfg)
    if t is None or (verdict != "keep" and full_verdict == "keep"):
        verdict = "rater_cap"
        e["reason"] = (f"{full_why}; but {aside} vote(s) on it were over "
                       f"their rater's share (max_rater_share {cfg.max_rater_share:g}: at most {settled.limit} "
                       f"kept generation(s) per rater) and do not count" + (f": without them {why}" if why else ""))
    elif verdict == "keep" and image is None:
        verdict = "missing_image"
        e["reason"] = f"{why}, but its image {row['image_path'] or '(none stored)'} is missing"
    elif verdict == "keep":
        verdict = "over_limit"
        e["reason"] = f"{why}, but max_new_images={cfg.max_new_images} better ones are in already"
    counts[verdict] += 1
    return e


def _raters_summary(votes: list[Vote], settled: Settled, cfg: MonitorConfig) -> dict[str, Any]:
    """How many raters voted, how many count on a kept generation, the largest shares, the limit."""
    kept = len(settled.kept)
    top = sorted(settled.counted_on.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return {"voted": len({v.rater for v in votes}), "contributed": len(settled.counted_on),
            "min_raters": cfg.min_raters, "max_rater_share": cfg.max_rater_share,
            "limit_per_rater": settled.limit, "kept_generations": kept,
            "largest": [{"rater": r, "generations": n, "share": round(n / kept, 4) if kept else 0.0} for r, n in top],
            "votes_set_aside": len(settled.set_aside), "rounds": settled.rounds}

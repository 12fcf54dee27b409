"""Preference data from the loop: what users preferred, as a preference dataset folder a kto or dpo retraining
trains on.

Where ``monitor.retrain_data`` keeps only the generations users liked (sft), a preference objective learns from
the rest of the evidence too:

- *kto* (Diffusion-KTO): single images marked desirable or undesirable, from thumbs and ratings. A generation whose
  counted ratings average at or above ``desirable_rating`` (or, unrated, whose thumbs are up) is desirable once
  ``min_raters`` distinct raters voted on it; at or below ``drop_rating``, or thumbs down, undesirable (whatever the
  count, as sft keeps it out whatever the count); in between, left out (``middling``).
- *dpo* (Diffusion-DPO): pairs of images of one prompt where one was preferred, from the two-candidate serving mode's
  choices (``POST /choose``) and the review page's votes (``sdloop review``: left or right is a pair, "no
  preference" none). A pair's raters may disagree: the side most of its counted raters chose wins, with the
  margin as its weight (2 of 3: 0.33); a tie is no pair. Only votes of reviewers the page signed count, as in
  ``sdloop review summary``.

Raters are weighed as for sft (``monitor.raters``): a rater is an API key, else a client id (a review page's
reviewer id for votes); no rater's votes count on more than ``max_rater_share`` of the examples kept (its newest
are set aside first), so one caller cannot dominate a preference set; at most ``max_new_images`` examples, best
evidence first. As for sft, a fixed share of the positive images (``gate_holdout_share``: desirable singles, the
chosen sides of pairs) is held out with its example, into ``gate_dir``: the gate's KID reference.

Every example and every vote that did not make one is recorded with its reason in ``preference_data.json`` (the
counts per reason, the raters and their largest shares, the settings), like ``retrain_data.json``: a vote for a
pair the review folder does not hold, a choice whose generation is gone, a pair with one image missing: reported,
skipped. Images are hard links (copies across filesystems) of the service's kept PNGs and the review folders'
images, which are only ever read; the folder is built under a hidden name and renamed into place.

The folder's format (the preference dataset reader's, ``sdloop data check``): images and ``preferences.jsonl``, one
JSON object a line, a pair ``{"prompt", "chosen", "rejected", "rater", "weight"}`` or a single ``{"prompt",
"image", "label": "desirable"|"undesirable", "rater", "weight"}``, paths relative to the folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from monitor.config import MonitorConfig
from monitor.preference_sources import Example, choices, review_folders, reviews, singles
from monitor.raters import Tally, Vote, one_per_rater, settle, tally
from monitor.retrain_data import _check_out_dir, _fsync_tree, _place
from monitor.retrain_select import _holdout_rank, holdout_size
from monitor.store import Store
from sdloop.atomic import temp_dir_beside

RECORD_NAME = "preference_data.json"
PREFERENCES = "preferences.jsonl"
RECORD_FORMAT = "sdloop-preference-data"
SINGLE_REASONS = ("middling", "too_few_raters", "rater_cap", "missing_image", "over_limit")
PAIR_REASONS = ("no_preference", "too_few_raters", "rater_cap", "missing_image", "unknown_generation",
                "unknown_pair", "unsigned", "over_limit")


@dataclass
class PreferenceData:
    """The built folder, its record, the counts and the raters; ``examples`` is what went into preferences.jsonl."""

    data_dir: Path
    record: Path
    objective: str
    counts: dict[str, int]
    raters: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    gate_dir: Optional[Path] = None

    @property
    def gate_images(self) -> int:
        return int(self.counts.get("held_out", 0))

    def summary(self) -> str:
        """One line: what went in, what was held out, what stayed out per reason."""
        c = self.counts
        skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in c.items()
                            if k in SINGLE_REASONS + PAIR_REASONS + ("skipped_by_check",) and n) or "nothing"
        what = "pair(s)" if self.objective == "dpo" else "single(s)"
        return (f"Preference data ({self.objective}) {self.data_dir}: {c['in']} {what} from {c['raters']} rater(s); "
                f"{c.get('held_out', 0)} held out for the gate; left out: {skipped}")


def _label(t: Tally, cfg: MonitorConfig) -> tuple[str, str]:
    """("desirable" | "undesirable" | "middling" | "too_few_raters", why) for one generation's counted votes."""
    said = []
    if t.rating is not None:
        said.append(f"mean rating {t.rating:.2f} of {t.ratings}")
    if t.thumbs is not None:
        said.append(f"thumbs {t.thumbs:+.2f} of {t.thumbs_n}")
    votes = ", ".join(said)
    if (t.rating is not None and t.rating <= cfg.drop_rating) or (t.thumbs is not None and t.thumbs < 0):
        return "undesirable", f"{votes}: at or below drop_rating {cfg.drop_rating} or thumbs down"
    if (t.rating is not None and t.rating >= cfg.desirable_rating) or (t.rating is None and (t.thumbs or 0) > 0):
        why = f"{votes}: at or above desirable_rating {cfg.desirable_rating} or thumbs up"
        if len(t.raters) < cfg.min_raters:
            return "too_few_raters", f"{why}, but from {len(t.raters)} rater(s), fewer than min_raters {cfg.min_raters}"
        return "desirable", why
    return "middling", f"{votes}: between drop_rating {cfg.drop_rating} and desirable_rating {cfg.desirable_rating}"


# -- the decision -------------------------------------------------------------------------------------------------

def _decide(objective: str, examples: dict[str, Example], votes: list[Vote], cfg: MonitorConfig
            ) -> tuple[list[dict[str, Any]], Counter, dict[str, Any]]:
    """Settle the raters' shares and decide every example: (entries, counts, raters summary)."""
    def verdict(t: Tally) -> tuple[str, str]:
        if objective == "kto":
            return _label(t, cfg)
        margin = t.thumbs or 0.0
        said = f"{t.thumbs_n} rater(s), margin {margin:+.2f} for the first side"
        if margin == 0:
            return "no_preference", f"{said}: a tie"
        if len(t.raters) < cfg.pair_min_raters:
            return "too_few_raters", f"{said}, fewer than pair_min_raters {cfg.pair_min_raters}"
        return "pair", said

    def strength(t: Tally) -> tuple:
        return (-abs(t.thumbs or 0.0), -(t.ratings + t.thumbs_n), t.generation_id)

    def select(tallies: dict[str, Tally]) -> list[str]:
        ok = [t for t in tallies.values() if not examples[t.generation_id].problem
              and verdict(t)[0] in ("desirable", "undesirable", "pair")]
        return [t.generation_id for t in sorted(ok, key=strength)][:cfg.max_new_images]

    settled = settle(votes, select, cfg.max_rater_share)
    full = tally(one_per_rater(votes))  # what the votes say when every one of them counts
    lead: dict[str, str] = {}  # each example's first counted rater: the line's "rater" (all of them: the record)
    for v in sorted(one_per_rater(votes), key=lambda v: v.feedback_id):
        if v.feedback_id not in settled.set_aside:
            lead.setdefault(v.generation_id, v.rater)
    everyone = {v.generation_id for v in votes}
    kept = set(settled.kept)
    counts: Counter = Counter()
    entries = []
    for key in sorted(everyone | set(examples)):
        ex = examples[key]
        t = settled.tallies.get(key)
        e = {"key": key, "kind": ex.kind, "source": ex.source, "prompt": ex.prompt, "ids": ex.ids,
             "raters": sorted(t.raters) if t else [], "decision": "out"}
        if key in kept and t is not None:
            word, why = verdict(t)
            e.update(decision="in", reason=why, rater=lead.get(key, ""),
                     weight=1.0 if ex.kind == "single" else round(abs(t.thumbs or 0), 4),
                     label=word if ex.kind == "single" else None,
                     first_wins=(t.thumbs or 0) > 0 if ex.kind == "pair" else None)
        elif ex.problem:
            e["reason"] = f"{ex.problem}: {ex.detail}; skipped"
            counts[ex.problem] += 1
        elif t is None:
            e["reason"] = "rater_cap: every vote on it was over its rater's share (max_rater_share)"
            counts["rater_cap"] += 1
        else:
            word, why = verdict(t)
            usable = ("desirable", "undesirable", "pair")
            if word in usable or verdict(full[key])[0] in usable:
                word = "rater_cap" if t.set_aside else "over_limit"
                why = (f"{why}; {t.set_aside} vote(s) on it were over their rater's share (max_rater_share "
                       f"{cfg.max_rater_share:g}: at most {settled.limit} example(s) per rater)" if t.set_aside
                       else f"{why}, but max_new_images={cfg.max_new_images} stronger ones are in already")
            e["reason"] = f"{word}: {why}"
            counts[word] += 1
        entries.append(e)
    top = sorted(settled.counted_on.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    n = len(settled.kept)
    raters = {"voted": len({v.rater for v in one_per_rater(votes)}), "contributed": len(settled.counted_on),
              "max_rater_share": cfg.max_rater_share, "limit_per_rater": settled.limit, "kept": n,
              "largest": [{"rater": r, "examples": k, "share": round(k / n, 4) if n else 0.0} for r, k in top],
              "votes_set_aside": len(settled.set_aside)}
    return entries, counts, raters


# -- the folder ---------------------------------------------------------------------------------------------------

def _line(e: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """The preferences.jsonl line of an example: its first counted rater names it (``sdloop data check`` counts
    lines per rater); every counted rater is in the record."""
    rater = e["rater"]
    if e["kind"] == "single":
        return {"prompt": e["prompt"], "image": files[0], "label": e["label"], "rater": rater, "weight": e["weight"]}
    chosen, rejected = (files[0], files[1]) if e["first_wins"] else (files[1], files[0])
    return {"prompt": e["prompt"], "chosen": chosen, "rejected": rejected, "rater": rater, "weight": e["weight"]}


def _check(folder: Path) -> dict[str, Any]:
    """The dataset stage's reading of the folder (what the trainer will read, ``sdloop data check``): its counts and
    every line or image it would skip, recorded with the rest (the trainer skips them too)."""
    from finetune.data.preference import scan_preferences

    scan = scan_preferences(folder, PREFERENCES, progress=False)
    return {"stats": {k: v for k, v in scan.stats.items() if not isinstance(v, dict)},
            "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in scan.skipped]}


def build_preference_data(store: Store, cfg: MonitorConfig, out_dir: Path, objective: Optional[str] = None,
                          since: Optional[dt.datetime] = None, gate_dir: Optional[Path] = None,
                          say: Optional[Callable[[str], None]] = None) -> PreferenceData:
    """Build the preference folder for ``objective`` (default ``cfg.objective``; kto or dpo) at ``out_dir`` (new or
    empty) from the evidence since ``since``; with ``gate_dir``, the held-out positive images go there. See the
    module docstring."""
    objective = objective or cfg.objective
    if objective not in ("kto", "dpo"):
        raise ValueError(f"preference data is for kto or dpo, not {objective!r}")
    folders = review_folders(cfg) if objective == "dpo" else []
    out = _check_out_dir(Path(out_dir), folders)
    gate = _check_out_dir(Path(gate_dir), folders + [out]) if gate_dir is not None else None
    skipped: Counter = Counter()
    notes: list[dict[str, Any]] = []
    if objective == "kto":
        examples, votes = singles(store, since)
    else:
        examples, votes = choices(store, since)
        more, review_votes = reviews(folders, skipped, notes, max((v.feedback_id for v in votes), default=0))
        examples.update(more)
        votes += review_votes
    entries, counts, raters = _decide(objective, examples, votes, cfg)
    counts.update(skipped)
    chosen = [e for e in entries if e["decision"] == "in"]
    positives = [e for e in chosen if e["kind"] == "pair" or e["label"] == "desirable"]
    held = {e["key"] for e in sorted(positives, key=lambda e: _holdout_rank(e["key"]))[
        :holdout_size(len(positives), cfg.gate_holdout_share) if gate else 0]}
    tmp = temp_dir_beside(out)
    gate_tmp = temp_dir_beside(gate) if gate else None
    try:
        lines = []
        for e in chosen:
            ex = examples[e["key"]]
            stem = hashlib.sha256(e["key"].encode()).hexdigest()[:16]
            files = [f"images/{stem}-{i}{(p.suffix or '.png').lower()}" for i, p in enumerate(ex.images)]
            if e["key"] in held:
                good = 0 if e["kind"] == "single" or e["first_wins"] else 1
                name = Path(files[good]).name
                _place(ex.images[good], gate_tmp / name)
                e.update(decision="gate", file=name, reason=f"{e['reason']}; held out (with its example) as the "
                                                            "gate's KID reference")
                continue
            for src, rel in zip(ex.images, files):
                _place(src, tmp / rel)
            e["files"] = files
            lines.append(_line(e, files))
        (tmp / PREFERENCES).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                       encoding="utf-8")
        check = _check(tmp)
        counts.update({"in": len(lines), "held_out": len(held), "raters": raters["contributed"],
                       "votes": len(votes), "examples": len(examples), "skipped_by_check": len(check["skipped"])})
        record = {"format": RECORD_FORMAT, "version": 1, "objective": objective,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "since": since.isoformat() if since else None,
                  "review_dirs": [str(f) for f in folders],
                  "settings": {k: getattr(cfg, k) for k in ("desirable_rating", "drop_rating", "min_raters",
                                                            "pair_min_raters", "max_rater_share", "max_new_images",
                                                            "gate_holdout_share")},
                  "counts": dict(counts), "raters": raters, "gate_dir": str(gate) if gate else None,
                  "examples": entries, "notes": notes, "check": check}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n",
                                       encoding="utf-8")
        _fsync_tree(tmp)
        if gate is not None and gate_tmp is not None:
            _fsync_tree(gate_tmp)
            os.replace(gate_tmp, gate)
        os.replace(tmp, out)
    finally:
        for folder in (tmp, gate_tmp):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    result = PreferenceData(out, out / RECORD_NAME, objective, dict(counts), raters, lines, gate)
    if say:
        say(result.summary())
    return result


def retrain_inputs(store: Store, cfg: MonitorConfig, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The data phase of a kto or dpo retraining (``monitor.retrain``): the preference folder under ``work``, the
    held-out images beside it, in the form the later phases read (dir, record, summary, gate_dir, left_out,
    raters)."""
    say(f"[1/6] data: preference data ({cfg.objective}) from "
        + ("thumbs and ratings" if cfg.objective == "kto" else "two-candidate choices and review votes")
        + ", raters capped, a share of the preferred images held out for the gate")
    result = build_preference_data(store, cfg, work / "data", cfg.objective, gate_dir=work / "gate-reference")
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    say(f"      {result.summary()}")
    say(f"      {counts}; record: {result.record}")
    if not result.counts.get("in"):
        from sdloop.errors import UserError

        raise UserError(f"no {cfg.objective} example survived the rules ({counts}); see {result.record}, or "
                        "retrain with objective=sft")
    return {"dir": result.data_dir, "record": str(result.record), "summary": counts, "gate_dir": result.gate_dir,
            "gate_images": result.gate_images,
            "left_out": {k: v for k, v in result.counts.items() if k in SINGLE_REASONS + PAIR_REASONS},
            "raters": result.raters}

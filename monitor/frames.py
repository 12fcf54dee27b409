"""The generation log of a window as pandas DataFrames: what the Evidently report compares.

One row per generation: the prompt, offline prompt descriptors, the four image descriptors the service logged, the
latency, the model version and the feedback on it (mean rating over clients, share of thumbs down). Prompt
descriptors are computed here, with no model and no download (Evidently's NLTK-based text descriptors fail offline):
length in characters, words, the share of characters that are not letters or spaces, and the share of words never
seen in the reference window's prompts. The last one catches a change of subject that keeps lengths equal; for the
reference rows themselves it is measured leave-one-out (a word counts as unseen when no other reference prompt has
it), so both windows are measured the same way and an unchanged stream does not look drifted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from sdloop.descriptors import DESCRIPTOR_NAMES

if TYPE_CHECKING:
    from monitor.store import Store
    from monitor.windows import Window

PROMPT_COLUMNS = ("prompt_chars", "prompt_words", "prompt_nonletter_share", "prompt_unseen_share")
IMAGE_COLUMNS = tuple(DESCRIPTOR_NAMES)
FEEDBACK_COLUMNS = ("rating", "thumbs_down")
SERVICE_COLUMNS = ("latency_s",)
NUMERIC_COLUMNS = PROMPT_COLUMNS + IMAGE_COLUMNS + FEEDBACK_COLUMNS + SERVICE_COLUMNS + ("feedback_rows",)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def words(prompt: str) -> list[str]:
    """Lower-case words (letters only): the vocabulary the unseen-word share counts."""
    return [w.lower() for w in _WORD.findall(prompt)]


@dataclass
class WindowData:
    """A window's generations (``frame``) and the counts a report states."""

    frame: pd.DataFrame
    generations: int
    feedback: int
    rated: int
    failures: int
    requests: int = 0  # answered requests: a request for several images logged one generation per image

    def counts(self) -> dict[str, int]:
        return {"generations": self.generations, "feedback": self.feedback, "rated": self.rated,
                "failures": self.failures}


def _nonletter_share(prompt: str) -> float:
    chars = [c for c in prompt if not c.isspace()]
    return float(sum(not c.isalpha() for c in chars) / len(chars)) if chars else 0.0


def _unseen_share(tokens: list[str], vocab: Counter, own: Optional[Counter] = None) -> float:
    """Share of ``tokens`` absent from ``vocab`` (a Counter of prompt-level word presence); with ``own`` (this
    prompt's presence, already inside ``vocab``) the prompt itself does not count as having seen its words."""
    if not tokens:
        return 0.0
    unseen = sum(1 for t in tokens if vocab[t] - (own[t] if own else 0) <= 0)
    return float(unseen / len(tokens))


def vocabulary(prompts: list[str]) -> Counter:
    """How many prompts each word appears in."""
    vocab: Counter = Counter()
    for p in prompts:
        vocab.update(set(words(p)))
    return vocab


def _feedback_by_generation(store: "Store", window: "Window") -> pd.DataFrame:
    return pd.DataFrame(store.feedback_votes(window.since, window.until),
                        columns=["generation_id", "rating", "thumbs"])


def window_data(store: "Store", window: "Window", vocab: Optional[Counter] = None) -> WindowData:
    """The window's frame and counts (only ``window.model_version``'s generations when it names one; failed requests
    are counted over the whole time range, since a failure may have no version). ``vocab``: the reference
    vocabulary (None: this is the reference, measured leave-one-out against itself)."""
    rows = store.generations(since=window.since, until=window.until)
    fb = _feedback_by_generation(store, window)
    if window.model_version is not None:  # a window of one version: its generations and the feedback on them
        rows = [r for r in rows if r["model_version"] == window.model_version]
        fb = fb[fb["generation_id"].isin({r["id"] for r in rows})].reset_index(drop=True)
    prompts = [r["prompt"] for r in rows]
    ref_vocab = vocab if vocab is not None else vocabulary(prompts)
    records = []
    for r in rows:
        tokens = words(r["prompt"])
        own = Counter(set(tokens)) if vocab is None else None
        desc = r["descriptors"] or {}
        records.append({
            "generation_id": r["id"], "created": r["created"], "prompt": r["prompt"],
            "model_version": r["model_version"],
            "prompt_chars": float(len(r["prompt"])), "prompt_words": float(len(tokens)),
            "prompt_nonletter_share": _nonletter_share(r["prompt"]),
            "prompt_unseen_share": _unseen_share(tokens, ref_vocab, own),
            **{name: float(desc.get(name, np.nan)) for name in IMAGE_COLUMNS},
            "latency_s": float(r["latency_s"]),
        })
    columns = ["generation_id", "created", "prompt", "model_version", *PROMPT_COLUMNS, *IMAGE_COLUMNS, "latency_s"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    if len(fb):
        fb["thumbs_down"] = np.where(fb["thumbs"].isna(), np.nan, (fb["thumbs"] < 0).astype(float))
        agg = fb.groupby("generation_id").agg(rating=("rating", "mean"), thumbs_down=("thumbs_down", "mean"),
                                              feedback_rows=("generation_id", "size"))
        frame = frame.join(agg, on="generation_id")
    else:
        frame = frame.assign(rating=np.nan, thumbs_down=np.nan, feedback_rows=0)
    frame["feedback_rows"] = frame["feedback_rows"].fillna(0).astype(float)
    for c in NUMERIC_COLUMNS:
        frame[c] = frame[c].astype(float)
    requests = round(sum(1 / _images_asked(r["params"]) for r in rows))
    return WindowData(frame=frame, generations=len(frame), feedback=len(fb), rated=int(frame["rating"].notna().sum()),
                      failures=store.count_failures(window.since, window.until), requests=requests)


def _images_asked(params: Any) -> int:
    """Images the request of a logged generation asked for (its params carry num_images; 1 when absent)."""
    n = params.get("num_images") if isinstance(params, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def window_pair(store: "Store", current: "Window", reference: Optional["Window"]
                ) -> tuple[WindowData, Optional[WindowData]]:
    """Current and reference data, the current one's unseen-word share measured against the reference's words."""
    ref = window_data(store, reference) if reference is not None else None
    vocab = vocabulary(ref.frame["prompt"].tolist()) if ref is not None else Counter()
    return window_data(store, current, vocab), ref

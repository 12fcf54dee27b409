"""Statistics of a checked dataset: sizes, shapes, captions, and how concentrated the captions are.

A LoRA learns whatever its captions repeat. If one term sits in most captions the model ties it to everything, and a
handful of images teaches a narrow look; these numbers and plain-language warnings let the user see that before
spending hours of training on it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

STOPWORDS = frozenset(
    "a an the on of in at to with and or for by from is are it its this that as into over under near".split()
)
SIDE_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2048)          # shorter side, pixels
ASPECT_EDGES = (0.0, 0.5, 0.67, 0.9, 1.11, 1.5, 2.0)          # width / height
WORD_EDGES = (0, 5, 10, 20, 40, 60)                           # caption length, words
TOP_TERMS = 20
CONCENTRATED_SHARE = 0.5
FEW_ITEMS = 10
LONG_CAPTION_WORDS = 60  # CLIP reads 77 tokens; longer captions are cut


def terms(caption: str) -> list[str]:
    """Lowercased words of a caption without stopwords (the unit of the term statistics)."""
    return [w for w in re.findall(r"[a-z0-9][a-z0-9'_-]*", caption.lower()) if w not in STOPWORDS]


def _label(edges: Sequence[float], i: int, fmt: str) -> str:
    lo = edges[i]
    if i + 1 < len(edges):
        return f"{lo:{fmt}}-{edges[i + 1]:{fmt}}"
    return f">={lo:{fmt}}"


def histogram(values: Sequence[float], edges: Sequence[float], fmt: str = "g") -> dict[str, int]:
    """Counts per bin [edges[i], edges[i+1]); the last bin is open-ended. Empty bins are kept, so tables align."""
    counts = [0] * len(edges)
    for v in values:
        i = max(k for k, e in enumerate(edges) if v >= e) if v >= edges[0] else 0
        counts[i] += 1
    return {_label(edges, i, fmt): c for i, c in enumerate(counts)}


def caption_stats(captions: Sequence[str]) -> dict[str, Any]:
    """Length, vocabulary, most frequent terms and concentration of the captions."""
    lengths = [len(c.split()) for c in captions]
    per_item = [set(terms(c)) for c in captions]
    occurrences: Counter[str] = Counter(t for c in captions for t in terms(c))
    items_with: Counter[str] = Counter(t for s in per_item for t in s)
    n = len(captions)
    # rank by how many captions contain the term (what concentration is about), then by raw count, then name
    ranked = sorted(items_with, key=lambda t: (-items_with[t], -occurrences[t], t))
    top = [{"term": t, "count": occurrences[t], "items": items_with[t],
            "share": round(items_with[t] / n, 4)} for t in ranked[:TOP_TERMS]]
    top5 = set(ranked[:5])
    total = sum(occurrences.values())
    entropy = -sum((c / total) * math.log(c / total) for c in occurrences.values()) if total else 0.0
    vocab = len(occurrences)
    return {
        "words": {
            "min": min(lengths) if lengths else 0,
            "mean": round(sum(lengths) / n, 2) if n else 0.0,
            "max": max(lengths) if lengths else 0,
            "histogram": histogram(lengths, WORD_EDGES, "d"),
        },
        "vocabulary_size": vocab,
        "top_terms": top,
        "concentration": {
            "top_term": ranked[0] if ranked else None,
            "top_term_share": round(items_with[ranked[0]] / n, 4) if ranked else 0.0,
            "top5_coverage": round(sum(1 for s in per_item if s & top5) / n, 4) if n else 0.0,
            "normalised_entropy": round(entropy / math.log(vocab), 4) if vocab > 1 else 0.0,
        },
    }


def warnings_for(usable: int, captions: dict[str, Any]) -> list[str]:
    """Plain-language warnings about too little or too concentrated data."""
    out: list[str] = []
    if usable == 0:
        return ["No usable images: fix or add images (see the skipped list) before training."]
    if usable < FEW_ITEMS:
        out.append(f"Only {usable} usable image(s): the model will copy them rather than learn a concept; "
                   f"aim for at least 15-50 varied images.")
    conc = captions["concentration"]
    if conc["top_term"] and conc["top_term_share"] > CONCENTRATED_SHARE and usable > 1:
        out.append(f"The term '{conc['top_term']}' is in {conc['top_term_share']:.0%} of captions: the model will "
                   f"tie it to everything it learns. That is intended for a trigger word; otherwise vary the "
                   f"captions or add images without it.")
    if captions["vocabulary_size"] > 1 and conc["normalised_entropy"] < 0.5:
        out.append(f"Captions use few distinct terms (normalised entropy {conc['normalised_entropy']:.2f}): "
                   f"describe what differs between images so the model can tell them apart.")
    if captions["words"]["max"] > LONG_CAPTION_WORDS:
        out.append(f"Some captions have more than {LONG_CAPTION_WORDS} words; the text encoder reads 77 tokens, "
                   f"so the end of them is ignored.")
    return out


def compute_stats(found: int, items: Sequence[Any], skipped: Sequence[Any], reasons: dict[str, str],
                  orphan_captions: int = 0) -> dict[str, Any]:
    """All statistics of the report: counts, size and aspect histograms, caption statistics and warnings."""
    by_reason = {code: 0 for code in reasons}
    for s in skipped:
        by_reason[s.reason] = by_reason.get(s.reason, 0) + 1
    captions = caption_stats([it.caption for it in items])
    return {
        "counts": {"found": found, "usable": len(items), "skipped": len(skipped),
                   "skipped_by_reason": {k: v for k, v in by_reason.items() if v},
                   "orphan_captions": orphan_captions},
        "shorter_side_histogram": histogram([min(it.width, it.height) for it in items], SIDE_EDGES, "d"),
        "aspect_ratio_histogram": histogram([it.width / it.height for it in items], ASPECT_EDGES, "g"),
        "captions": captions,
        "warnings": warnings_for(len(items), captions),
    }

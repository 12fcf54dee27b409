"""The drift score of one descriptor, finite and meaningful when the reference window has no spread.

Evidently's normed Wasserstein distance divides the distance between the two windows by the reference's standard
deviation, floored at 0.001. A descriptor with no spread in the reference then scores in thousandths: when every
reference prompt has 9 words and a third of today's have 10, the distance is 0.33 words and the score 330, against a
threshold of 0.5 (the demo showed 359 and 762). The score no longer measures "how far did the distribution move,
in units of its usual variation": it only says "not exactly the same", and any change at all is drift.

Our score divides by the reference's spread or a floor, whichever is larger:

    score = W1(reference, current) / max(std(reference), floor)
    floor = max(unit, RELATIVE_FLOOR * |mean(reference)|)

``unit`` is the smallest change of the descriptor that means something (one character or word of a prompt, 1 % of
the luma range of brightness and contrast, ...: ``SPREAD_UNITS``); the relative part says that a shift by a tenth of
a descriptor's typical value is one unit of spread (9-word prompts: 0.9 words). What happens then:

- the reference has spread (the usual case): nothing changes, the score is Evidently's (std above the floor);
- the reference has none, and the current window neither (both all 9 words): distance 0, score 0, no drift;
- the reference has none, the current moved a little (a third of the prompts one word longer): 0.33 / 0.9 = 0.37,
  under 0.5: no drift; it moved clearly (every prompt 12 words): 3 / 0.9 = 3.3, drift; the score stays finite and
  reads as "distance in units of the floor".

Each column gets its own registered Evidently stat test (``sdloop_wasserstein:<column>``), so the scores in
Evidently's own report, its JSON and the workspace are these ones. ``method_for`` maps the config's method: only
``wasserstein`` is replaced; the other methods (PSI, KS, ...) do not divide by the spread and are Evidently's own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RELATIVE_FLOOR = 0.1
PREFIX = "sdloop_wasserstein:"

# The smallest meaningful change of each descriptor, in its own units (the spread floor when the mean is near 0).
SPREAD_UNITS: dict[str, float] = {
    "prompt_chars": 1.0,               # characters
    "prompt_words": 1.0,               # words
    "prompt_nonletter_share": 0.01,    # share of characters
    "prompt_unseen_share": 0.05,       # share of words (one word in 20)
    "brightness": 0.01,                # mean luma in [0, 1]
    "contrast": 0.01,                  # std of luma in [0, 1]
    "sharpness": 1e-4,                 # variance of the Laplacian of luma, (0..1 units)^2
    "colourfulness": 1.0,              # Hasler-Suesstrunk M3 on 0..255 values
    "latency_s": 0.01,                 # seconds
}
DEFAULT_UNIT = 1e-3                    # Evidently's own floor, for a column not listed


def spread_floor(column: str, reference: Any) -> float:
    """The smallest spread the score divides by for ``column`` with this reference (see the module docstring)."""
    ref = np.asarray(reference, dtype=float)
    ref = ref[np.isfinite(ref)]
    mean = abs(float(ref.mean())) if ref.size else 0.0
    return max(SPREAD_UNITS.get(column, DEFAULT_UNIT), RELATIVE_FLOOR * mean)


def drift_score(column: str, reference: Any, current: Any) -> float:
    """W1 distance of the two samples over max(reference std, the column's floor): finite for any finite input."""
    from scipy import stats

    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if not ref.size or not cur.size:
        return 0.0
    norm = max(float(ref.std()), spread_floor(column, ref))
    score = float(stats.wasserstein_distance(ref, cur)) / norm
    return score if math.isfinite(score) else 0.0


_registered: set[str] = set()


def method_for(column: str, method: str) -> str:
    """The Evidently method name to use for ``column``: our floored Wasserstein for ``wasserstein``, registered with
    Evidently on first use; any other method unchanged."""
    if method != "wasserstein":
        return method
    name = PREFIX + column
    if name not in _registered:
        from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
        from evidently.legacy.core import ColumnType

        def _score(reference: Any, current: Any, feature_type: Any, threshold: float) -> tuple[float, bool]:
            value = drift_score(column, reference, current)
            return value, value >= threshold

        _score.__name__ = f"sdloop_wasserstein_{column}"
        register_stattest(StatTest(name=name, display_name=f"Wasserstein distance (normed, spread floor of {column})",
                                   allowed_feature_types=[ColumnType.Numerical], default_threshold=0.5), _score)
        _registered.add(name)
    return name

"""The latency the export gate decides on, measured as the benchmarks measure: paired and repeated.

The figures each export recorded (``latency.export_s`` in its manifest) were timed by different processes, at
different times, under whatever else the machine was doing; two of them differ by the load as much as by the models.
So the gate times both exports itself: loaded side by side in this process with the same threads, the same size,
steps, prompt and seed, one warm-up image each, then ``repeats`` back-to-back pairs whose order alternates (a load
that drifts hits both alike). Each pair gives a challenger/champion ratio; the 95% interval of their geometric mean
(Student t over the log ratios) is what ``monitor.gate.latency_check`` compares, so a difference inside the noise
is reported as no difference, never as a pass or a fail it did not measure.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPEATS = 5            # timed pairs (plus one warm-up image each)
PROMPT = "a red circle on a blue background"
# two-sided 95% Student t quantiles by degrees of freedom (n - 1); beyond 30 the normal's 1.96 is close enough
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The two-sided 95% t quantile for ``df`` degrees of freedom (the next tabulated lower df: conservative)."""
    if df <= 0:
        return math.inf
    if df > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= df)]


def log_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): the 95% t interval of the mean of log(values), back on the original scale.
    One value has no spread to measure: its interval is (0, inf), i.e. says nothing."""
    logs = [math.log(v) for v in values]
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), 0.0, math.inf
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


@dataclass
class PairedLatency:
    """Seconds per image of both exports, timed in pairs, and the challenger/champion ratio with its interval."""

    champion_s: list[float]
    challenger_s: list[float]
    size: int
    steps: int
    threads: Optional[int]

    @property
    def repeats(self) -> int:
        return len(self.ratios)

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.champion_s, self.challenger_s)]

    def ratio_interval(self) -> tuple[float, float, float]:
        return log_interval(self.ratios)

    def challenger_interval(self) -> tuple[float, float, float]:
        return log_interval(self.challenger_s)

    def to_dict(self) -> dict[str, Any]:
        ratio, low, high = self.ratio_interval()
        c, c_low, c_high = self.challenger_interval()
        return {**asdict(self), "repeats": self.repeats, "paired": True, "ratio": ratio, "ratio_low": low,
                "ratio_high": high, "challenger": c, "challenger_low": c_low, "challenger_high": c_high,
                "champion": log_interval(self.champion_s)[0]}


def time_pairs(run_a: Callable[[], None], run_b: Callable[[], None], repeats: int = REPEATS,
               clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """Seconds of ``run_a`` and ``run_b`` in ``repeats`` back-to-back pairs, a first then b, then b first, and so
    on (after one untimed call of each: first runs allocate)."""
    run_a()
    run_b()
    a_s, b_s = [], []
    for r in range(repeats):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = clock()
            (run_a if which == 0 else run_b)()
            (a_s if which == 0 else b_s).append(clock() - start)
    return a_s, b_s


def measure_paired(champion_dir: Path, challenger_dir: Path, repeats: int = REPEATS, steps: Optional[int] = None,
                   say: Callable[[str], None] = lambda s: None) -> PairedLatency:
    """Load both exports (each as its manifest says, both with the challenger's intra-op threads) and time them in
    pairs at the challenger's native size and the steps its export timed (``steps`` overrides)."""
    import gc

    from export.fuse import generate
    from sdloop.exportload import open_export

    challenger = open_export(challenger_dir)
    threads = challenger.runtime.get("intra_op_num_threads") or None
    champion = open_export(champion_dir, threads=threads)
    size = challenger.manifest.native_width
    steps = int(steps or challenger.manifest.latency.get("steps") or 20)
    for opened in (champion, challenger):
        opened.pipe.set_progress_bar_config(disable=True)
    say(f"      latency: champion and challenger timed in {repeats} back-to-back pairs ({size}x{size}, {steps} steps, "
        f"{threads or 'default'} thread(s))")
    try:
        a_s, b_s = time_pairs(lambda: generate(champion.pipe, [(PROMPT, 0)], steps, size, 7.5),
                              lambda: generate(challenger.pipe, [(PROMPT, 0)], steps, size, 7.5), repeats)
    finally:
        del champion, challenger
        gc.collect()
    return PairedLatency([round(s, 5) for s in a_s], [round(s, 5) for s in b_s], size, steps, threads)

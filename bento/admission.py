"""Admission control of one worker: how many requests may wait for its one pipeline, and what a request will cost.

Why: a worker runs one generation at a time (``bento.runtime.ModelHolder.lock``). Without a bound, a busy day piles
requests up behind the lock until each one's deadline passes, and every caller waits for nothing. So:
- At most ``queue`` requests wait besides the one running; one more is refused at once (``QueueFull``, a 429 whose
  ``Retry-After`` is the queue ahead of it times the recent time of one request), which is cheaper for everyone
  than a 504 after its whole deadline.
- The seconds per denoising step are measured per shape (width, height, images, guidance on or off) from the steps
  that ran; a request of a shape already measured that cannot finish before its deadline is refused before its first
  step (``WontFinish``) rather than run until it is interrupted. Shapes not yet measured are never refused by guess:
  per-step time is far from linear in pixels at small sizes, and a wrong guess would refuse work that fits; those
  still end within one step of their deadline.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

Shape = tuple[int, int, int, bool]  # width, height, images, classifier-free guidance


class QueueFull(Exception):
    """Too many requests already wait for this worker's pipeline; ``retry_after`` is an estimate in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the worker is busy: {waiting} request(s) already wait for its pipeline; retry in about "
                         f"{retry_after} s")
        self.retry_after = retry_after


class WontFinish(Exception):
    """The request's deadline is shorter than its steps take at this shape as measured; nothing was run."""


class Admission:
    """The count of requests inside one worker (waiting or running) and the timings that size its estimates."""

    def __init__(self, queue: int, smoothing: float = 0.3, shapes_kept: int = 64) -> None:
        self.queue, self.smoothing, self.shapes_kept = queue, smoothing, shapes_kept
        self._guard = threading.Lock()
        self.inside = 0  # waiting for the pipeline or running in it
        self.request_s: Optional[float] = None  # smoothed time one request held the pipeline
        self._step_s: dict[Shape, float] = {}  # smoothed seconds per denoising step, per shape

    @property
    def waiting(self) -> int:
        return max(0, self.inside - 1)

    def enter(self) -> None:
        """Count a request in, or raise ``QueueFull`` when ``queue`` already wait besides the one running."""
        with self._guard:
            if self.inside > self.queue:
                raise QueueFull(self.inside - 1, self.retry_after(self.inside))
            self.inside += 1

    def leave(self) -> None:
        with self._guard:
            self.inside -= 1

    def retry_after(self, ahead: int) -> int:
        """Whole seconds until ``ahead`` requests are likely done (at least 1): the smoothed request time times them."""
        return max(1, math.ceil(ahead * (self.request_s or 1.0)))

    def _smooth(self, old: Optional[float], new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def ran(self, seconds: float) -> None:
        """A request held the pipeline for ``seconds``."""
        with self._guard:
            self.request_s = self._smooth(self.request_s, seconds)

    def stepped(self, shape: Shape, seconds_per_step: float) -> None:
        """Steps of ``shape`` took ``seconds_per_step`` each (between step ends, so text encoding is left out)."""
        with self._guard:
            if shape not in self._step_s and len(self._step_s) >= self.shapes_kept:
                self._step_s.pop(next(iter(self._step_s)))
            self._step_s[shape] = self._smooth(self._step_s.get(shape), seconds_per_step)

    def seconds_per_step(self, shape: Shape) -> Optional[float]:
        return self._step_s.get(shape)

    def check_time(self, shape: Shape, steps: int, left_s: float, guess_per_step: Optional[float] = None) -> None:
        """Raise ``WontFinish`` when ``steps`` steps of a measured ``shape`` need more than the ``left_s`` seconds.

        A shape not measured yet is judged by ``guess_per_step`` (the model's fitted cost, ``bento.budget``) only
        when even half that guess cannot finish: a fit from two sizes is a guess, and it must not refuse work that
        fits."""
        per = self._step_s.get(shape)
        if per is not None and steps * per > left_s:
            raise WontFinish(f"{steps} steps at {shape[0]}x{shape[1]} x {shape[2]} image(s) need about "
                             f"{steps * per:.2f} s on this worker ({per:.4f} s per step as measured) and "
                             f"{max(0.0, left_s):.2f} s of the deadline are left; nothing was run")
        if per is None and guess_per_step and steps * guess_per_step / 2 > left_s:
            raise WontFinish(f"{steps} steps at {shape[0]}x{shape[1]} x {shape[2]} image(s) need about "
                             f"{steps * guess_per_step:.2f} s on this worker (predicted from the model's measured "
                             f"cost) and {max(0.0, left_s):.2f} s of the deadline are left; nothing was run")

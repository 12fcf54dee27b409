"""What a request costs one worker in memory and time, and the memory that worker may use.

Why: one ordinary 768x768 request took a worker from 1.85 GB to 8 GB. A diffusion UNet's self-attention at its
finest level holds a (tokens x tokens) score matrix per head and per image (tokens = width/8 * height/8), so memory
grows with the square of the pixel count: 4x the pixels is up to 16x the memory. A budget that is a fixed side limit
would either refuse sizes a small model draws easily or let a large model take the host down. So each worker
measures its loaded model (``calibrate``: short generations at half its native side, at its native side and, while
affordable, above it; the process's peak resident memory reset before each through ``/proc/self/clear_refs``) and
fits

    bytes(width, height, images) = images * (a * tokens + b * tokens**2)        (a, b >= 0)

and the same shape for the seconds of one denoising step. Both fits use classifier-free guidance (the default), so a
request without it is predicted conservatively. A request whose predicted peak, on top of what the worker holds
now, would pass the worker's budget is refused before it waits or runs (``TooLarge``: 413), naming the largest size
and the most images that fit. The budget defaults to a share of the host's memory (or of the container's limit,
whichever is smaller) split across the workers; SDLOOP_MEMORY_MB sets it per worker.

The decisions here are pure functions of the fitted ``CostModel`` and numbers passed in; only ``calibrate``,
``resident_bytes`` and ``host_memory_bytes`` read the process or the host.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

MIB = 1 << 20
SAFETY = 1.25  # predictions are scaled by this before they are compared with the budget: fits are from two points


class TooLarge(Exception):
    """The request's predicted memory does not fit in the worker's budget; nothing was run or queued."""


@dataclass(frozen=True)
class CostModel:
    """Per image: ``a * tokens + b * tokens**2`` bytes at peak (above the resident model) and ``sa * tokens +
    sb * tokens**2`` seconds per denoising step, with guidance on; ``samples`` are the measurements it came from."""

    a: float
    b: float
    sa: float
    sb: float
    samples: tuple[dict[str, float], ...] = ()

    def bytes_for(self, width: int, height: int, images: int) -> float:
        t = (width // 8) * (height // 8)
        return images * (self.a * t + self.b * t * t) * SAFETY

    def seconds_per_step(self, width: int, height: int, images: int) -> float:
        t = (width // 8) * (height // 8)
        return images * (self.sa * t + self.sb * t * t)

    def public(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "samples"}, "safety": SAFETY,
                "samples": list(self.samples)}


def fit(samples: list[dict[str, float]]) -> CostModel:
    """Fit the two-term model through the origin to samples {tokens, bytes, seconds_per_step} of one image each,
    keeping both coefficients non-negative (a negative quadratic would promise large sizes for free)."""
    def two_terms(xs: list[float], ys: list[float]) -> tuple[float, float]:
        if len(xs) == 1:
            return max(0.0, ys[0]) / xs[0], 0.0
        # least squares of y = a x + b x^2, then clamp: with b < 0 fall back to the linear fit, with a < 0 the square
        sxx = sum(x * x for x in xs)
        sx3 = sum(x ** 3 for x in xs)
        sx4 = sum(x ** 4 for x in xs)
        sxy = sum(x * y for x, y in zip(xs, ys))
        sx2y = sum(x * x * y for x, y in zip(xs, ys))
        det = sxx * sx4 - sx3 * sx3
        a, b = ((sxy * sx4 - sx2y * sx3) / det, (sxx * sx2y - sx3 * sxy) / det) if det else (sxy / sxx, 0.0)
        if b < 0:
            return max(0.0, sxy / sxx), 0.0
        if a < 0:
            return 0.0, max(0.0, sx2y / sx4)
        return a, b

    xs = [float(s["tokens"]) for s in samples]
    a, b = two_terms(xs, [float(s["bytes"]) for s in samples])
    sa, sb = two_terms(xs, [float(s["seconds_per_step"]) for s in samples])
    return CostModel(a, b, sa, sb, tuple(samples))


@dataclass(frozen=True)
class Budget:
    """The memory one worker may use (``limit`` bytes, ``source``: how it was set) and what its model costs."""

    limit: float
    source: str
    model: Optional[CostModel] = None

    def check(self, width: int, height: int, images: int, resident: float, sides: tuple[int, int, int]) -> None:
        """Raise ``TooLarge`` when ``images`` at ``width`` x ``height`` would take the worker, now holding
        ``resident`` bytes, past its limit; the message names the largest size (same aspect) and the most images that
        fit. ``sides`` is (min side, max side, multiple) of the served model."""
        if self.model is None:
            return
        need = self.model.bytes_for(width, height, images)
        room = self.limit - resident
        if need <= room:
            return
        hints = []
        size = self.largest_size(width, height, images, room, sides)
        if size:
            hints.append(f"{size[0]}x{size[1]}" + (f" x {images} images" if images > 1 else ""))
        if images > 1:
            most = max((n for n in range(1, images) if self.model.bytes_for(width, height, n) <= room), default=0)
            if most:
                hints.append(f"{most} image(s) at {width}x{height}")
        fits = ("the largest that fits now: " + ", or ".join(hints)) if hints else \
            "nothing fits now, not even the smallest size: retry later or on another replica"
        raise TooLarge(f"{width}x{height} x {images} image(s) needs about {need / MIB:.0f} MiB on this worker, which "
                       f"holds {resident / MIB:.0f} MiB of its {self.limit / MIB:.0f} MiB budget ({self.source}); "
                       f"{fits}")

    def largest_size(self, width: int, height: int, images: int, room: float,
                     sides: tuple[int, int, int]) -> Optional[tuple[int, int]]:
        """The largest (width, height) with the request's aspect, on the model's grid, whose cost fits ``room``."""
        low, high, m = sides
        if self.model is None:
            return None
        for h in range(min(high, height) // m * m, low - 1, -m):
            w = min(high, max(low, round(h * width / height / m) * m))
            if self.model.bytes_for(w, h, images) <= room:
                return w, h
        return None

    def public(self, resident: float) -> dict[str, Any]:
        return {"memory_limit_mib": round(self.limit / MIB, 1), "source": self.source,
                "resident_mib": round(resident / MIB, 1),
                "cost_model": self.model.public() if self.model else None}


def host_memory_bytes() -> float:
    """The memory this process may count on: the host's total, or its container's limit (cgroup v2, then v1) when
    that is smaller."""
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, float(text))
    return total


def budget_for(memory_mb: int, share: float, workers: int) -> tuple[float, str]:
    """The per-worker limit in bytes and how it was set: SDLOOP_MEMORY_MB when given, else ``share`` of the host's
    memory split across ``workers``."""
    if memory_mb:
        return memory_mb * MIB, "SDLOOP_MEMORY_MB"
    return host_memory_bytes() * share / max(1, workers), f"SDLOOP_MEMORY_SHARE={share:g} of the host / {workers} " \
                                                          "worker(s)"


def _status_kib(field: str) -> Optional[int]:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def resident_bytes() -> float:
    """This process's resident memory now (0 where /proc is missing: then every request fits)."""
    kib = _status_kib("VmRSS")
    return float(kib or 0) * 1024


def give_back(collect: bool = False) -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``: 1-11 ms): after a large request the
    allocator keeps freed pages otherwise, and a worker's resident memory stays at its peak. ``collect`` runs a full
    garbage collection first: only around a measurement, since under load one took 0.4-0.7 s, which after every
    request cut the served throughput several times (benchmarks/serve.py); a request's arrays are freed by reference
    counting anyway."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def configure_allocator(mmap_threshold: int = 256 * 1024) -> bool:
    """Serve every allocation above ``mmap_threshold`` bytes with its own mapping, returned to the system when freed.

    Why: glibc raises its mmap threshold after a large block is freed (up to 32 MiB), so after one large request the
    next ones' activations come from the heap, which keeps its peak; and a measurement then sees memory reused, not
    taken. A fixed threshold turns that off. Measured on the tiny export (one process, 2 busy cores): 256x256 x 4
    peaked 262 MiB above the model instead of 396-400 MiB, and resident memory came back to 595 MiB after it either
    way. It costs page faults: 10 steps at 128x128 took 0.112-0.150 s with it against 0.092-0.130 s without (three
    alternating runs, 15-20%), where a step is a few milliseconds; SDLOOP_MMAP_THRESHOLD_KIB=0 turns it off. Returns
    whether glibc took the setting (False elsewhere: nothing changes)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    except (OSError, AttributeError):
        return False


class PeakMeter:
    """The peak resident memory of a block: the kernel's high-water mark reset before it (``clear_refs``), or, where
    that is not allowed, a thread sampling the resident size every 5 ms."""

    def __enter__(self) -> "PeakMeter":
        give_back(collect=True)
        self.before = resident_bytes()
        self._sampled, self._stop = self.before, threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._thread = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, resident_bytes())

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled
        else:
            self.peak = float(_status_kib("VmHWM") or 0) * 1024
        self.peak = max(self.peak, self.before)
        give_back(collect=True)

    @property
    def extra(self) -> float:
        return self.peak - self.before


def calibrate(run: Callable[[int, int, Callable[[], None]], None], native: tuple[int, int], multiple: int,
              max_side: int, room: float) -> CostModel:
    """Measure the model (one image, guidance on, two steps per size) and fit the cost model.

    ``run(width, height, on_step)`` draws one image and calls ``on_step`` after each step. Sizes: half the native
    side and the native side, then twice and four times it while a fit of what was measured so far predicts the next
    size takes under a quarter of ``room`` (the memory the worker may still use) and it is within ``max_side``.
    Why upward: a small model's cost at and below its native size is a few MiB, inside the allocator's noise, and a
    fit of noise extrapolated 16x in pixels says nothing; a large model (SD-1.5: about 2 GiB above its weights at
    512x512, mostly attention scores) is measured well at its native size and is never drawn larger here, since
    that is what the budget protects the host from."""
    samples: list[dict[str, float]] = []
    w0, h0 = native
    for scale in (0.5, 1.0, 2.0, 4.0):
        w = max(multiple, round(w0 * scale / multiple) * multiple)
        h = max(multiple, round(h0 * scale / multiple) * multiple)
        if scale > 1 and (max(w, h) > max_side or fit(samples).bytes_for(w, h, 1) > room / 4):
            break
        ends: list[float] = []
        with PeakMeter() as meter:
            run(w, h, lambda: ends.append(time.monotonic()))
        per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) >= 2 else 0.0
        samples.append({"width": w, "height": h, "tokens": (w // 8) * (h // 8), "bytes": max(0.0, meter.extra),
                        "seconds_per_step": per_step})
    return fit(samples)

"""How many CPU threads torch gets for a command: what is free on this machine, not what it has.

Why: torch's default is one intra-op thread per core. On a small machine that other work keeps busy, a thread that
waits for a busy core stalls every operation it takes part in; the tiny models' operations are too small to gain from
splitting. Measured on 2 shared cores (`benchmarks/threads.py`, figures in the README): with one other process busy,
a training step took several times longer on 2 threads than on 1, while on an idle machine 2 threads were at best a
little faster. So the default is the cores this process may use minus the machine's load (its 1-minute average),
at least 1; `SDLOOP_CPU_THREADS` (or a command's `--threads`) says otherwise.
"""

from __future__ import annotations

import os
from typing import Optional

from sdloop.errors import UserError

ENV = "SDLOOP_CPU_THREADS"


class ThreadsError(UserError):
    """SDLOOP_CPU_THREADS is not a whole number in range; the message says what to set."""


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def free_cores(cores: int, load: float) -> int:
    """The cores left when `load` of them are busy (a 1-minute load average), at least 1: a pure rule, tested."""
    return max(1, min(cores, int(cores - load + 0.5)))


def choose_threads(requested: Optional[int] = None) -> int:
    """The torch thread count of a command: `requested` (a `--threads`), else SDLOOP_CPU_THREADS, else the free
    cores."""
    if requested is not None:
        if requested < 1:
            raise ThreadsError(f"--threads {requested}: give a whole number of threads, at least 1")
        return requested
    raw = os.environ.get(ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ThreadsError(f"{ENV}={raw!r}: give a whole number of threads, at least 1 (or unset it: the free "
                               "cores are used)")
        return int(raw)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return free_cores(usable_cores(), load)


def apply_threads(requested: Optional[int] = None) -> int:
    """Set torch's intra-op threads for this process (before any work); returns the number set."""
    threads = choose_threads(requested)
    import torch

    torch.set_num_threads(threads)
    return threads

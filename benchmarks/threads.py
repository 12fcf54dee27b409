"""Torch threads for the commands on a small machine: 1, 2 or the free cores, idle and with one core kept busy.

Why: torch gives a process one thread per core. On 2 shared cores that other work keeps busy, a thread that waits for
a core stalls each operation, and the tiny models' operations are too small to gain from splitting. This measures the
real commands (`sdloop train`, `sdloop eval`, as a user runs them: a fresh process each, imports included) with
SDLOOP_CPU_THREADS=1, =2 and unset (sdloop's rule: the cores minus the 1-minute load), alternating the order, on the
machine as it is and with one busy-loop process beside them, and prints the medians and the ratios to 1 thread.

    python benchmarks/threads.py [--rounds 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spin(stop: "mp.synchronize.Event") -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def _run(cmd: list[str], threads: str, cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "SDLOOP_CPU_THREADS"}
    if threads != "auto":
        env["SDLOOP_CPU_THREADS"] = threads
    env.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def _fresh_copy(run: Path, to: Path) -> str:
    """A copy of the run without its eval/ folder, so every evaluation draws and scores its images anew."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("eval"))
    return str(to)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per condition (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdloop-threads-"))
    os.environ["SDLOOP_HOME"] = str(work / "home")
    subprocess.run(["sdloop", "base", "tiny", str(work / "base")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sdloop", "data", "synth", str(work / "data"), "--n", "32", "--seed", "0"], check=True,
                   stdout=subprocess.DEVNULL)
    train = ["sdloop", "train", "--base", str(work / "base"), "--data", str(work / "data"), "--max-steps",
             str(args.steps), "--resolution", "64", "--quiet", "--output"]
    subprocess.run(train + [str(work / "run")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workloads = {"train": lambda i: train + [str(work / f"run-{i}")],
                 "eval": lambda i: ["sdloop", "eval", _fresh_copy(work / "run", work / f"eval-{i}"), "--n", "8",
                                    "--steps", "10", "--quiet"]}
    variants = ["1", "2", "auto"]
    times: dict[tuple[str, str, str], list[float]] = {}
    loads: dict[str, list[float]] = {"idle": [], "one core busy": []}
    counter = 0
    for condition in ("idle", "one core busy"):
        stop = mp.Event()
        spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if condition != "idle" else None
        if spinner:
            spinner.start()
            time.sleep(5)
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, make in workloads.items():
                for threads in order:
                    counter += 1
                    loads[condition].append(os.getloadavg()[0])
                    times.setdefault((condition, name, threads), []).append(_run(make(counter), threads, work))
        if spinner:
            stop.set()
            spinner.join()
    print(f"cores {os.cpu_count()}, {args.rounds} rounds, train {args.steps} steps at 64 px, eval 8+8 images "
          f"x 10 steps; seconds per command (median), ratio to 1 thread")
    print("| condition | load avg | command | 1 thread | 2 threads | free cores (default) | 2 vs 1 | default vs 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for condition in loads:
        load = statistics.median(loads[condition])
        for name in workloads:
            m = {t: statistics.median(times[(condition, name, t)]) for t in variants}
            print(f"| {condition} | {load:.1f} | {name} | {m['1']:.1f} | {m['2']:.1f} | {m['auto']:.1f} | "
                  f"{m['1'] / m['2']:.2f}x | {m['1'] / m['auto']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

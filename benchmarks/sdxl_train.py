"""Benchmark: training steps/s on the tiny SDXL base against the same loop on the tiny SD-1.x base, with and without
the latent/text caches, side by side in one run.

    python benchmarks/sdxl_train.py [--steps 30] [--warmup 5] [--repeats 3] [--batch-size 4] [--resolution 64]
                                    [--n 32] [--threads 1] [--wait-idle 120] [--json PATH]

Both bases come from ``sdloop base tiny`` (random weights): the same UNet block layout, VAE and CLIP width, so what
differs is what SDXL adds, the second text encoder, the wider cross-attention (both encoders' states) and the
pooled + size/crop embedding. Each measured run is the real trainer (``finetune.training.train.train``, in this
process, a fresh run folder, no validation split, one sample grid and checkpoint at the end that are not timed):
the step time is the median of the per-step wall-clock deltas of ``metrics.jsonl`` after ``--warmup`` steps. The
four configurations (sd1/sdxl x cached/live) run ``--repeats`` times in a rotating order, so a shared machine's
drift hits them alike; each figure is the median over repeats, each ratio the median of the per-repeat ratios.
Before each run the benchmark waits (up to ``--wait-idle`` s) for the 1-minute load average to drop below the
core count, and prints the load it ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIGS = [("sd1", True), ("sdxl", True), ("sd1", False), ("sdxl", False)]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_idle(max_wait: float) -> float:
    """Wait until the 1-minute load average is below the core count (at most ``max_wait`` s); return the load."""
    cores = os.cpu_count() or 1
    t0 = time.time()
    load = os.getloadavg()[0]
    while load >= cores and time.time() - t0 < max_wait:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def step_ms(run_dir: Path, warmup: int) -> float:
    """Median milliseconds per optimizer step after ``warmup`` steps, from metrics.jsonl's wall clock."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    walls = [r["wall"] for r in rows if "train_loss" in r and "lr" in r]
    deltas = [b - a for a, b in zip(walls, walls[1:])][warmup:]
    return 1000 * statistics.median(deltas)


def one_run(base: Path, data: Path, out: Path, cached: bool, args: argparse.Namespace) -> float:
    from finetune.training.config import TrainConfig
    from finetune.training.train import train

    cfg = TrainConfig(base=str(base), data=str(data), output=str(out), resolution=args.resolution,
                      batch_size=args.batch_size, max_steps=args.steps + args.warmup + 1, use_cache=cached,
                      learning_rate=1e-3, data_config={"validation_split": 0.0}, sample_steps=1, sample_seeds=[0],
                      validation_every=10_000, augment={"crop_p": 0.5, "variants": 2})
    train(cfg, progress=False)
    return step_ms(out, args.warmup)


def unet_params(base: Path) -> int:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    return sum(p.numel() for p in unet.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--n", type=int, default=32, help="images in the synthetic dataset")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wait-idle", type=float, default=120.0, help="seconds to wait for an idle CPU before a run")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)

    import torch

    from finetune.data.synth import make_synthetic_dataset
    from finetune.pretraining.base import write_tiny_base

    torch.set_num_threads(args.threads)
    results: dict[tuple[str, bool], list[float]] = {c: [] for c in CONFIGS}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sdloop-sdxl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["SDLOOP_HOME"] = str(tmp / "home")
        bases = {f: write_tiny_base(tmp / f"base-{f}", seed=0, family=f) for f in ("sd1", "sdxl")}
        data = make_synthetic_dataset(tmp / "data", n=args.n, seed=0, size=args.resolution)
        params = {f: unet_params(b) for f, b in bases.items()}
        for r in range(args.repeats):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for family, cached in order:
                loads.append(wait_idle(args.wait_idle))
                ms = one_run(bases[family], data, tmp / f"run-{family}-{cached}-{r}", cached, args)
                results[(family, cached)].append(ms)
                log(f"repeat {r + 1}/{args.repeats} {family} {'cached' if cached else 'live'}: {ms:.1f} ms/step "
                    f"(load {loads[-1]:.1f})")

    def med(c: tuple[str, bool]) -> float:
        return statistics.median(results[c])

    def ratio(a: tuple[str, bool], b: tuple[str, bool]) -> float:
        return statistics.median(x / y for x, y in zip(results[a], results[b]))

    print(f"training steps on the tiny bases, {args.resolution} px, batch {args.batch_size}, {args.threads} torch "
          f"thread(s), {args.steps} timed steps x {args.repeats} repeats (median; load average "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores)")
    print(f"UNet parameters: sd1 {params['sd1']:,}  sdxl {params['sdxl']:,}")
    print(f"{'':10}{'sd1 steps/s':>13}{'sdxl steps/s':>14}{'sdxl/sd1 time':>15}")
    for cached in (True, False):
        a, b = ("sd1", cached), ("sdxl", cached)
        print(f"{'cached' if cached else 'live':10}{1000 / med(a):13.2f}{1000 / med(b):14.2f}{ratio(b, a):14.2f}x")
    print(f"{'live/cached time':24}{ratio(('sd1', False), ('sd1', True)):5.2f}x (sd1)  "
          f"{ratio(('sdxl', False), ('sdxl', True)):.2f}x (sdxl)")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{f}-{'cached' if c else 'live'}": v for (f, c), v in results.items()}
                                              | {"loads": loads, "unet_params": params}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

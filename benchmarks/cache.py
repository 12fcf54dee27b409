"""Benchmark: one epoch of data loading, live (VAE + text encoder every step) vs from the latent/text caches.

    python benchmarks/cache.py [--n 64] [--resolution 64] [--epochs 2] [--repeats 3] [--base DIR] [--data DIR]

Both sides run in this one process on the same machine, interleaved repeat by repeat so background load hits them
alike, with torch pinned to 2 threads, one warm-up batch each (first-call allocator and kernel set-up), and the
median over repeats x epochs. The live side is ``TrainingFeed(use_cache=False)``, the plain loop a trainer without
caches runs: load, augment, encode, each step. The cache build is timed separately, cold, into a fresh folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _epoch_seconds(feed, epoch: int) -> float:
    t0 = time.perf_counter()
    for batch in feed.epoch_batches(epoch):
        feed.load_batch(batch, epoch)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images in the synthetic dataset (ignored with --data)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="epochs timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variants", type=int, default=1, help="augmented variants cached per image (K)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help="diffusers folder (default: the tiny base, written to a temp dir)")
    p.add_argument("--data", help="dataset folder (default: a synthetic one, written to a temp dir)")
    args = p.parse_args(argv)

    import torch

    from finetune.pretraining.base import write_tiny_base
    from sdloop.pipelines import base_info, load_components
    from finetune.training.config import TrainConfig
    from finetune.data.check import scan_dataset
    from finetune.training.feed import TrainingFeed
    from finetune.data.synth import make_synthetic_dataset

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 1.0:
        # two torch processes with spinning OpenMP threads on the same cores slow each other down many times over,
        # and the compute-bound live side far more than the cached side: the ratio would be inflated
        print(f"warning: load average {load:.1f} at start: other processes share the CPU; the live timings "
              f"(and the ratio) may be unreliable. Rerun on a quiet machine or with --threads 1.", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sdloop-bench-") as tmp_name:
        tmp = Path(tmp_name)
        base = Path(args.base) if args.base else write_tiny_base(tmp / "base")
        data = Path(args.data) if args.data else make_synthetic_dataset(tmp / "data", n=args.n, seed=0,
                                                                        size=max(16, args.resolution))
        items = scan_dataset(data, progress=False).items
        components = load_components(str(base))
        fingerprint = base_info(str(base)).fingerprint
        augment = {"crop_p": 0.5, "flip_p": 0.5, "variants": args.variants}

        def feed(use_cache: bool, ram_mb: int = 2048) -> TrainingFeed:
            cfg = TrainConfig(resolution=args.resolution, batch_size=args.batch_size, use_cache=use_cache,
                              augment=dict(augment), cache_memory_mb=ram_mb)
            return TrainingFeed(items, data, cfg, components, fingerprint, cache_root=tmp / "cache",
                                progress=False)

        live, cached, disk = feed(False), feed(True), feed(True, ram_mb=0)
        first = live.epoch_batches(0)[0]
        live.load_batch(first, 0)  # warm-up: kernels and allocator, so the build below is not charged for it

        t0 = time.perf_counter()
        stats = cached.prepare()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reuse = feed(True).prepare()
        reuse_s = time.perf_counter() - t0
        cached.load_batch(first, 0)
        disk.prepare()

        live_t, cache_t, disk_t = [], [], []
        for _ in range(args.repeats):
            for epoch in range(args.epochs):
                live_t.append(_epoch_seconds(live, epoch))
                cache_t.append(_epoch_seconds(cached, epoch))  # RAM copies after its first epoch
                disk_t.append(_epoch_seconds(disk, epoch))  # cache_memory_mb=0: files read every step

    n_batches = len(live.epoch_batches(0))
    lm, cm, dm = statistics.median(live_t), statistics.median(cache_t), statistics.median(disk_t)
    print(f"sdloop cache benchmark: {len(items)} images at {args.resolution}px, batch {args.batch_size}, "
          f"K={args.variants}, {n_batches} batches/epoch, torch threads {args.threads}, "
          f"median of {len(live_t)} epochs")
    print(f"{'':28}{'s/epoch':>10}{'ms/batch':>10}{'x cache':>10}")
    print(f"{'live (VAE+text each step)':28}{lm:10.3f}{1000 * lm / n_batches:10.1f}{lm / cm:10.1f}")
    print(f"{'from cache files (no RAM)':28}{dm:10.3f}{1000 * dm / n_batches:10.1f}{dm / cm:10.1f}")
    print(f"{'from caches (RAM copies)':28}{cm:10.3f}{1000 * cm / n_batches:10.1f}{1.0:10.1f}")
    print(f"{'cache build (once, cold)':28}{build_s:10.3f}{'':10}{'':10}   = {build_s / lm:.2f} live epochs; "
          f"{stats.latents_built} latent + {stats.text_built} text files, {stats.bytes / 1e6:.2f} MB")
    print(f"{'cache reuse check':28}{reuse_s:10.3f}{'':10}{'':10}   = {reuse_s / lm:.2f} live epochs; "
          f"{reuse.reused} files reused, {reuse.built} built")
    saved = lm - cm
    payback = f"pays back after {build_s / saved:.2f} epochs" if saved > 0 else "never pays back"
    print(f"live/cache-files {lm / dm:.1f}x, live/RAM {lm / cm:.1f}x per epoch; cache build {build_s:.2f} s "
          f"({build_s / lm:.2f} live epochs) {payback}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

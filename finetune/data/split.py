"""The train/validation split: deterministic, and never cutting a group of look-alike images in two.

A validation image that nearly matches a training image measures memorisation, not learning, so images within
``data.split_guard_distance`` (pHash bits) of each other stay on one side. That guard can leave validation empty (one
image; everything in one look-alike group; a split that rounds to nothing), and the fix differs per cause:
``explain_empty_validation`` names the cause and the setting that helps, for the trainer's error and for
``sdloop data check``'s warning.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np

from finetune.training.config import DataConfig
from finetune.data.files import Item


def phash_array(items: list[Item]) -> np.ndarray:
    """The items' perceptual hashes as a uint64 array, for vectorised Hamming distances."""
    return np.array([int(it.phash, 16) for it in items], dtype=np.uint64)


def hamming(h: np.ndarray, one: np.uint64) -> np.ndarray:
    """Bit differences between one hash and every hash in ``h`` (XOR + popcount, no Python loop)."""
    x = np.bitwise_xor(h, np.uint64(one))
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def _groups(items: list[Item], distance: int) -> list[list[int]]:
    """Union-find over pHash distance: images this close end up in one group."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    hashes = phash_array(items)
    for i in range(len(items)):
        for j in np.nonzero(hamming(hashes[i + 1:], hashes[i]) <= distance)[0]:
            a, b = find(i), find(i + 1 + int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _target(n: int, cfg: DataConfig) -> int:
    """How many validation items the split aims for: round(n * split), at least min_validation_items, not all."""
    return min(max(round(n * cfg.validation_split), cfg.min_validation_items), n - 1)


def split_items(items: list[Item], cfg: DataConfig) -> tuple[list[Item], list[Item]]:
    """Deterministic (train, validation) split that keeps near-duplicates on one side, whatever the input order.

    Validation gets round(n * validation_split) items, at least min_validation_items, never all of them. Groups of
    look-alike images (pHash distance <= split_guard_distance) are never cut, or the validation loss would measure
    memorisation; when a group does not fit, validation ends up slightly smaller rather than leaking.
    """
    ordered = sorted(items, key=lambda it: (it.sha256, it.path, it.caption))
    n = len(ordered)
    if cfg.validation_split <= 0 or n < 2:
        return sorted(ordered, key=lambda it: it.path), []
    target = _target(n, cfg)

    def key(group: list[int]) -> str:
        return hashlib.sha256(f"{cfg.split_seed}:{ordered[group[0]].sha256}".encode()).hexdigest()

    val_idx: set[int] = set()
    for group in sorted(_groups(ordered, cfg.split_guard_distance), key=key):
        if len(val_idx) + len(group) <= target:
            val_idx.update(group)
        if len(val_idx) == target:
            break
    train = [it for i, it in enumerate(ordered) if i not in val_idx]
    val = [it for i, it in enumerate(ordered) if i in val_idx]
    return sorted(train, key=lambda it: it.path), sorted(val, key=lambda it: it.path)


def _guard_that_fits(items: list[Item], cfg: DataConfig, target: int) -> Optional[int]:
    """The largest split_guard_distance below the current one whose smallest look-alike group fits the target."""
    for d in range(cfg.split_guard_distance - 1, -1, -1):
        if min(len(g) for g in _groups(items, d)) <= target:
            return d
    return None


def _share_for(n: int, k: int) -> Optional[float]:
    """The smallest validation_split (to 0.001) that makes round(n * split) reach k, or None when none below 1 does."""
    share = math.ceil((k - 0.5) / n * 1000) / 1000
    while share < 1.0 and round(n * share) < k:
        share = round(share + 0.001, 3)
    return share if share < 1.0 and k <= n - 1 else None


def explain_empty_validation(items: list[Item], cfg: DataConfig) -> str:
    """Why ``split_items(items, cfg)`` leaves validation empty, and the changes that fix it (one line).

    The trainer raises it as its error; ``sdloop data check`` prints it as a warning. Returns "" when validation
    is not empty or was turned off on purpose (validation_split = 0). Only advice that would work is given: raising
    the validation share cannot help one image, nor a dataset that is all one look-alike group.
    """
    n = len(items)
    if cfg.validation_split <= 0:
        return ""
    off = "or set data.validation_split=0 to train without validation (no early stopping)"
    if n == 0:
        return "the validation split is empty: there are no usable images; add images (see `sdloop data check`)."
    if n == 1:
        return (f"the validation split is empty: there is only 1 usable image and validation needs another one; "
                f"add images, {off}.")
    if split_items(items, cfg)[1]:
        return ""
    target = _target(n, cfg)
    groups = _groups(items, cfg.split_guard_distance)
    smallest = min(len(g) for g in groups)
    share = _share_for(n, smallest)
    if target < 1 and smallest == 1:
        return (f"the validation split is empty: {n} images x data.validation_split={cfg.validation_split} rounds "
                f"to 0 and data.min_validation_items=0; raise data.validation_split to at least {share:g} or set "
                f"data.min_validation_items=1.")
    where = (f"all {n} usable images are look-alikes in one group" if len(groups) == 1
             else f"the smallest of the {len(groups)} look-alike groups has {smallest} images")
    advice = []
    if share is not None:
        advice.append(f"raise data.validation_split to at least {share:g}")
    fits = _guard_that_fits(items, cfg, target) if target >= 1 else None
    if fits is not None:
        advice.append(f"lower data.split_guard_distance to {fits}")
    advice.append("add images that differ more")
    return (f"the validation split is empty: images within data.split_guard_distance={cfg.split_guard_distance} "
            f"pHash bits of each other stay on one side, and {where}, more than the {target} validation image(s) "
            f"wanted; " + ", or ".join(advice) + f", {off}.")

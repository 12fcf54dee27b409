"""Aspect-ratio buckets, seeded image and caption augmentation, balanced sampling and epoch batching.

Everything here is a pure function of its inputs and an explicit ``random.Random``: the cache build and the live
(uncached) loop call the same functions with the same seeds, so a cached latent and a live one are the same sample.

Each augmentation draws all of its random numbers whether or not it fires (a fixed number of draws per image), so
turning one augmentation on or off does not shift the draws of the others: a seed means the same crop, flip and
angle across configurations.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from sdloop.seeding import py_rng

from finetune.training.config import AugmentConfig

Size = tuple[int, int]  # (width, height) in pixels

# Resampling filter of every resize and rotation: bicubic is antialiased by PIL's resize and sharp enough.
_RESAMPLE = Image.Resampling.BICUBIC


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` for the draw named by ``parts`` (the one seeding scheme: ``sdloop.seeding``)."""
    return py_rng(*parts)


# -- buckets -------------------------------------------------------------------------------------------------------

def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[Size]:
    """All (w, h) bucket sizes: multiples of ``step``, area <= resolution**2, aspect (long/short) <= ``max_aspect``.

    Only the largest buckets are kept: a size is dropped when a side can grow by ``step`` and still fit (the
    Pareto frontier of the area budget), so every aspect ratio trains at close to the full pixel budget.
    ``(resolution, resolution)`` is always included, even when ``resolution`` is not a multiple of ``step``.
    Sorted by aspect ratio w/h, narrow (portrait) first.
    """
    if resolution < 8 or step < 1 or max_aspect < 1.0:
        raise ValueError(f"bucket_sizes needs resolution >= 8, step >= 1, max_aspect >= 1 "
                         f"(got {resolution}, {step}, {max_aspect}).")
    area = resolution * resolution

    def fits(w: int, h: int) -> bool:
        return w * h <= area and max(w, h) <= max_aspect * min(w, h) + 1e-9

    sides = range(step, area // step + 1, step)
    out = {(resolution, resolution)}
    for w in sides:
        for h in sides:
            if w * h > area:
                break
            if fits(w, h) and not fits(w + step, h) and not fits(w, h + step):
                out.add((w, h))
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's, in log space (so 1:2 and 2:1 are equally far from 1:1).

    Ties go to the larger bucket (more pixels kept).
    """
    if not buckets:
        raise ValueError("assign_bucket needs at least one bucket.")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}.")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def item_buckets(sizes: Sequence[Size], resolution: int, cfg: AugmentConfig) -> list[Size]:
    """The bucket of each (width, height); every item gets (resolution, resolution) when bucketing is off."""
    if not cfg.bucketing:
        return [(resolution, resolution)] * len(sizes)
    buckets = bucket_sizes(resolution, cfg.bucket_step, cfg.bucket_max_aspect)
    return [assign_bucket(w, h, buckets) for w, h in sizes]


# -- image augmentation ----------------------------------------------------------------------------------------------

def _crop_box(img_size: Size, size: Size, scale: float, fx: float, fy: float) -> tuple[float, float, float, float]:
    """The source box with the target aspect ratio covering ``scale`` of the largest such box, at fractions fx, fy."""
    W, H = img_size
    tw, th = size
    cover = min(W / tw, H / th)  # source pixels per target pixel for the largest box of the target aspect
    bw, bh = tw * cover * math.sqrt(scale), th * cover * math.sqrt(scale)
    left, top = (W - bw) * fx, (H - bh) * fy
    return (left, top, left + bw, top + bh)


def _rotate_zoomed(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate about the centre and zoom in just enough that the frame stays inside the rotated image.

    Chosen over filling the corners by reflection: reflected corners are content the model would learn to draw;
    a zoom of at most a few percent (for the default 5 degrees) costs only a thin border.
    """
    w, h = img.size
    t = math.radians(abs(degrees))
    zoom = math.cos(t) + max(w / h, h / w) * math.sin(t)
    zoom *= 1.0 + 1.0 / min(w, h)  # half a pixel of margin so bicubic taps never reach the outside fill
    a = math.radians(degrees)
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    cx, cy = w / 2.0, h / 2.0
    # output (x, y) -> input: centre + R(a) / zoom @ ((x, y) - centre)
    coeffs = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    return img.transform((w, h), Image.Transform.AFFINE, coeffs, resample=_RESAMPLE)


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns of the colour wheel in HSV (PIL's 8-bit HSV wraps hue at 256)."""
    hsv = np.array(img.convert("HSV"), dtype=np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 256))) % 256
    channels = [Image.fromarray(np.ascontiguousarray(hsv[..., i])) for i in range(3)]
    return Image.merge("HSV", channels).convert("RGB")


@dataclass(frozen=True)
class CropGeometry:
    """Where a sample came from, as SDXL's size/crop conditioning states it (``add_time_ids``).

    ``original_size`` is the source image's (height, width); ``crop_top_left`` the (top, left) corner of the crop
    in the source scaled to the target (as if the image had been resized, then cropped), mirrored when flipped.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def augment_image(img: Image.Image, size: Size, cfg: AugmentConfig, rng: random.Random,
                  augment: bool = True) -> Image.Image:
    """``augment_image_geometry`` without the geometry: the augmented image alone."""
    return augment_image_geometry(img, size, cfg, rng, augment)[0]


def augment_image_geometry(img: Image.Image, size: Size, cfg: AugmentConfig, rng: random.Random,
                           augment: bool = True) -> tuple[Image.Image, CropGeometry]:
    """Resize ``img`` to cover ``size`` without distortion, crop to it, then maybe flip, rotate and jitter colour.

    - crop: random resized crop with probability ``crop_p`` (area fraction in [crop_scale_min, 1], target aspect,
      uniform position), else a centre crop of the largest box of the target aspect.
    - flip: horizontal, with probability ``flip_p``.
    - rotation: uniform in +-rotation_degrees with probability ``rotation_p``, about the centre, zoomed so no
      corner is filled (see ``_rotate_zoomed``).
    - colour: with probability ``color_p``, brightness, contrast, saturation (PIL's enhancers) and hue (HSV
      shift), in that fixed order.

    ``augment=False`` gives the plain centre crop used for validation. All draws come from ``rng`` and their number
    does not depend on the configuration, so the same seed always gives the same image. The geometry returned with
    the image is what SDXL's size/crop conditioning needs (rotation, a zoom of a few percent, is left out of it).
    """
    tw, th = int(size[0]), int(size[1])
    if tw < 1 or th < 1:
        raise ValueError(f"target size must be positive, got {size}.")
    img = img.convert("RGB")
    # a fixed sequence of draws (see the module docstring)
    crop_u, crop_scale, crop_fx, crop_fy = rng.random(), rng.random(), rng.random(), rng.random()
    flip_u = rng.random()
    rot_u, rot_a = rng.random(), rng.uniform(-1.0, 1.0)
    col_u = rng.random()
    jb, jc, js, jh = (rng.uniform(-1.0, 1.0) for _ in range(4))

    if augment and crop_u < cfg.crop_p:
        scale = cfg.crop_scale_min + (1.0 - cfg.crop_scale_min) * crop_scale
        box = _crop_box(img.size, (tw, th), scale, crop_fx, crop_fy)
    else:
        box = _crop_box(img.size, (tw, th), 1.0, 0.5, 0.5)
    # reducing_gap: large photos are first shrunk by an integer factor (fast box filter), then resampled
    out = img.resize((tw, th), resample=_RESAMPLE, box=box, reducing_gap=3.0)
    px = tw / (box[2] - box[0])  # target pixels per source pixel
    geometry = CropGeometry((img.size[1], img.size[0]), (int(round(box[1] * px)), int(round(box[0] * px))))
    if not augment:
        return out, geometry
    if flip_u < cfg.flip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        geometry = CropGeometry(geometry.original_size,
                                (geometry.crop_top_left[0], int(round((img.size[0] - box[2]) * px))))
    if rot_u < cfg.rotation_p and cfg.rotation_degrees > 0:
        out = _rotate_zoomed(out, rot_a * cfg.rotation_degrees)
    if col_u < cfg.color_p:
        if cfg.brightness:
            out = ImageEnhance.Brightness(out).enhance(1.0 + jb * cfg.brightness)
        if cfg.contrast:
            out = ImageEnhance.Contrast(out).enhance(1.0 + jc * cfg.contrast)
        if cfg.saturation:
            out = ImageEnhance.Color(out).enhance(1.0 + js * cfg.saturation)
        if cfg.hue:
            out = _shift_hue(out, jh * cfg.hue)
    return out, geometry


def image_to_tensor(img: Image.Image) -> "Any":
    """A CHW float32 tensor in [-1, 1], the VAE's input range."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


# -- captions -------------------------------------------------------------------------------------------------------

def split_tags(caption: str, separator: str) -> list[str]:
    """The non-empty, stripped tags of a caption."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def caption_variant(caption: str, cfg: AugmentConfig, rng: random.Random) -> str:
    """The caption with its tags shuffled (the first ``keep_tokens`` stay in place) when ``shuffle_tags`` is on.

    Shuffling teaches the model that tag order carries no meaning, while the kept leading tags (often a trigger
    word or the subject) keep their position. Tags are rejoined with ", ". Without shuffling the caption is
    returned unchanged.
    """
    if not cfg.shuffle_tags:
        return caption
    tags = split_tags(caption, cfg.tag_separator)
    head, tail = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


STOPWORDS = frozenset("""
a an the and or of on in at to with by for from over under near into onto as is are was were be been this that
these those it its his her their there here some very photo image picture of
""".split())


def caption_terms(caption: str) -> set[str]:
    """Lower-case word terms of a caption, stopwords and one-character tokens removed."""
    return {w for w in re.findall(r"[a-z0-9]+", caption.lower()) if len(w) > 1 and w not in STOPWORDS}


def balanced_weights(captions: Sequence[str]) -> list[float]:
    """Sampling weights against over-represented caption terms, normalised to mean 1.

    An item's weight is the mean over its terms of 1 / (number of captions containing the term): an item whose
    words all appear in half the dataset weighs far less than one with a rare subject, so a dominant subject does
    not swamp the rest. Items without terms (empty captions) get the mean weight of the others.
    """
    terms = [caption_terms(c) for c in captions]
    freq = Counter(t for ts in terms for t in ts)
    raw = [sum(1.0 / freq[t] for t in ts) / len(ts) if ts else None for ts in terms]
    known = [w for w in raw if w is not None]
    fill = sum(known) / len(known) if known else 1.0
    weights = [fill if w is None else w for w in raw]
    mean = sum(weights) / len(weights) if weights else 1.0
    return [w / mean for w in weights]


# -- batching -------------------------------------------------------------------------------------------------------

def epoch_batches(buckets: Sequence[Size], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  weights: Optional[Sequence[float]] = None, drop_last: bool = False) -> list[list[int]]:
    """Batches of item indices for one epoch; every index in a batch shares a bucket (so latents stack).

    Deterministic for (seed, epoch). With ``weights`` the epoch's indices are drawn with replacement by weight
    (as many draws as items) before grouping; without, each index appears exactly once. Each bucket's last partial
    batch is kept unless ``drop_last``. With ``shuffle`` the indices and the order of batches are shuffled;
    without, batches follow the first appearance of each bucket and indices keep their order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(buckets)
    rng = seeded_rng("epoch_batches", seed, epoch)
    if weights is not None:
        if len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} items.")
        if n and (min(weights) < 0 or sum(weights) <= 0):
            raise ValueError("sampling weights must be non-negative with a positive sum.")
        order = rng.choices(range(n), weights=weights, k=n) if n else []
    else:
        order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    groups: dict[Size, list[int]] = {}
    for i in order:
        groups.setdefault(tuple(buckets[i]), []).append(i)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    return batches

"""Buckets, seeded image/caption augmentation, balanced weights and epoch batching (finetune.data.augment)."""

from __future__ import annotations

import colorsys
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from finetune.data.augment import (assign_bucket, augment_image, balanced_weights, bucket_sizes, caption_variant,
                              epoch_batches, image_to_tensor, item_buckets)
from finetune.training.config import AugmentConfig


def _scene(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A bright, asymmetric, textured picture: gradients plus a few shapes (no black pixels anywhere)."""
    rs = np.random.RandomState(seed)
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    arr = np.stack([80 + 150 * x * np.ones_like(y), 80 + 150 * y * np.ones_like(x), 200 - 100 * x * y], -1)
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        cx, cy, r = rs.randint(0, w), rs.randint(0, h), rs.randint(4, 12)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rs.randint(100, 255, 3)))
    return img


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _only(**kw: float) -> AugmentConfig:
    return AugmentConfig(**kw)


SIZE = (48, 32)


def _centre(img: Image.Image, size=SIZE) -> Image.Image:
    return augment_image(img, size, AugmentConfig(), random.Random(0), augment=False)


# -- image augmentation ----------------------------------------------------------------------------------------

def test_centre_crop_covers_without_distortion() -> None:
    img = Image.new("RGB", (100, 50), (0, 200, 0))
    ImageDraw.Draw(img).rectangle((0, 0, 24, 49), fill=(255, 0, 0))   # left quarter red
    ImageDraw.Draw(img).rectangle((75, 0, 99, 49), fill=(0, 0, 255))  # right quarter blue
    out = _arr(_centre(img, (32, 32)))
    assert out.shape == (32, 32, 3)
    # only the green middle square is kept (bicubic taps blend a pixel or two at the crop's edges)
    assert np.abs(out[:, 2:-2] - np.array([0, 200, 0])).max() <= 2
    assert out[..., 0].mean() < 2 and out[..., 2].mean() < 2


def test_probability_zero_is_centre_crop_and_no_augment_ignores_probabilities() -> None:
    img = _scene()
    base = _arr(_centre(img))
    off = AugmentConfig(crop_p=0, flip_p=0, rotation_p=0, color_p=0)
    on = AugmentConfig(crop_p=1, flip_p=1, rotation_p=1, color_p=1, rotation_degrees=20, brightness=0.5)
    for seed in range(3):
        assert np.array_equal(_arr(augment_image(img, SIZE, off, random.Random(seed))), base)
        assert np.array_equal(_arr(augment_image(img, SIZE, on, random.Random(seed), augment=False)), base)


def test_flip_mirrors_pixels() -> None:
    img = _scene()
    out = _arr(augment_image(img, SIZE, _only(flip_p=1.0), random.Random(0)))
    assert np.array_equal(out, _arr(_centre(img))[:, ::-1])


def test_random_crop_changes_content_and_scale() -> None:
    # a horizontal ramp: a crop covering a fraction of the width spans a proportionally smaller value range
    ramp = Image.fromarray(np.repeat(np.linspace(0, 255, 200)[None, :, None], 100, 0).repeat(3, 2).astype(np.uint8))
    cfg = _only(crop_p=1.0, crop_scale_min=0.25)
    full = _arr(_centre(ramp, (40, 20)))[..., 0]
    spans = []
    for seed in range(6):
        out = _arr(augment_image(ramp, (40, 20), cfg, random.Random(seed)))[..., 0]
        assert out.shape == full.shape
        spans.append(out[:, -1].mean() - out[:, 0].mean())
    full_span = full[:, -1].mean() - full[:, 0].mean()
    assert max(spans) <= full_span + 1 and min(spans) < full_span * 0.9  # zoomed in: a crop spans less
    assert min(spans) >= full_span * 0.5 - 8  # but never below sqrt(crop_scale_min) of the width
    assert len({round(s) for s in spans}) > 1


def test_rotation_changes_pixels_without_black_corners() -> None:
    img = _scene()
    cfg = _only(rotation_p=1.0, rotation_degrees=30)
    base = _arr(_centre(img))
    for seed in range(4):
        out = _arr(augment_image(img, SIZE, cfg, random.Random(seed)))
        assert np.abs(out - base).mean() > 2
        corners = np.stack([out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]])
        assert corners.min() > 40, "rotation must zoom so no corner is filled black"


def test_colour_jitter_changes_brightness_and_hue() -> None:
    img = _scene()
    base = _centre(img)
    bright = [_arr(augment_image(img, SIZE, _only(color_p=1, brightness=0.5, contrast=0, saturation=0, hue=0),
                                 random.Random(s))).mean() for s in range(6)]
    assert max(abs(b - _arr(base).mean()) for b in bright) > 5

    def mean_hue(im: Image.Image) -> float:
        a = _arr(im).reshape(-1, 3) / 255.0
        h = np.array([colorsys.rgb_to_hsv(*p)[0] for p in a[::7]])
        return float(np.angle(np.exp(2j * np.pi * h).mean()) / (2 * np.pi))

    hue_cfg = _only(color_p=1, brightness=0, contrast=0, saturation=0, hue=0.3)
    shifts = [abs(mean_hue(augment_image(img, SIZE, hue_cfg, random.Random(s))) - mean_hue(base))
              for s in range(6)]
    assert max(shifts) > 0.05


def test_same_seed_same_sample_other_seed_differs() -> None:
    img = _scene()
    cfg = AugmentConfig(crop_p=0.7, flip_p=0.5, rotation_p=0.5, color_p=0.5, hue=0.1)
    a = _arr(augment_image(img, SIZE, cfg, random.Random(123)))
    b = _arr(augment_image(img, SIZE, cfg, random.Random(123)))
    assert np.array_equal(a, b)
    others = [_arr(augment_image(img, SIZE, cfg, random.Random(s))) for s in range(5)]
    assert any(not np.array_equal(a, o) for o in others)


def test_image_to_tensor_range_and_layout() -> None:
    img = Image.new("RGB", (6, 4), (255, 255, 255))
    img.putpixel((0, 0), (0, 0, 0))
    t = image_to_tensor(img)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert t.max().item() == 1.0 and t[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]


# -- buckets ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res,step,aspect", [(512, 64, 2.0), (256, 32, 4.0), (64, 8, 2.0), (32, 8, 2.0)])
def test_bucket_sizes_properties(res: int, step: int, aspect: float) -> None:
    buckets = bucket_sizes(res, step, aspect)
    area = res * res
    assert (res, res) in buckets and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= area
        assert max(w, h) / min(w, h) <= aspect + 1e-9
        assert (h, w) in buckets  # portrait and landscape alike
        # the largest that fits: neither side can grow by a step
        for gw, gh in ((w + step, h), (w, h + step)):
            assert gw * gh > area or max(gw, gh) / min(gw, gh) > aspect
        assert w * h > area - step * max(w, h) * 2  # close to the budget
    assert any(max(w, h) / min(w, h) > 1.2 for w, h in buckets) or res <= step


def test_assign_bucket_nearest_log_aspect() -> None:
    buckets = bucket_sizes(512, 64, 2.0)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(2000, 1000, buckets) == (640, 384)
    assert assign_bucket(1000, 2000, buckets) == (384, 640)
    assert assign_bucket(1100, 1000, buckets) == (512, 512)
    w, h = assign_bucket(1300, 1000, buckets)
    assert w > h
    # log distance: 2:1 and 1:2 are equally far from square, so transposing the image transposes the bucket
    assert assign_bucket(700, 1000, buckets) == tuple(reversed(assign_bucket(1000, 700, buckets)))


def test_item_buckets_without_bucketing_is_square() -> None:
    sizes = [(100, 50), (50, 100), (64, 64)]
    assert item_buckets(sizes, 64, AugmentConfig(bucketing=False)) == [(64, 64)] * 3
    on = item_buckets(sizes, 64, AugmentConfig(bucket_step=8))
    assert on[0][0] > on[0][1] and on[1][0] < on[1][1] and on[2] == (64, 64)


# -- epoch batches ---------------------------------------------------------------------------------------------

BUCKETS = [(64, 64)] * 11 + [(80, 48)] * 7 + [(48, 80)] * 5


def test_epoch_batches_one_bucket_each_and_every_index_once() -> None:
    batches = epoch_batches(BUCKETS, 4, seed=0, epoch=0)
    for b in batches:
        assert len({BUCKETS[i] for i in b}) == 1 and 1 <= len(b) <= 4
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(BUCKETS)))
    # partial batches: 11 -> 4,4,3; 7 -> 4,3; 5 -> 4,1
    assert sorted(len(b) for b in batches) == [1, 3, 3, 4, 4, 4, 4]
    dropped = epoch_batches(BUCKETS, 4, seed=0, epoch=0, drop_last=True)
    assert all(len(b) == 4 for b in dropped) and len(dropped) == 4


def test_epoch_batches_deterministic_per_seed_and_epoch() -> None:
    a = epoch_batches(BUCKETS, 4, seed=1, epoch=3)
    assert a == epoch_batches(BUCKETS, 4, seed=1, epoch=3)
    assert a != epoch_batches(BUCKETS, 4, seed=1, epoch=4)
    assert a != epoch_batches(BUCKETS, 4, seed=2, epoch=3)
    fixed = epoch_batches(BUCKETS, 4, seed=1, epoch=3, shuffle=False)
    assert fixed == epoch_batches(BUCKETS, 4, seed=9, epoch=0, shuffle=False)
    assert fixed[0] == [0, 1, 2, 3]


def test_epoch_batches_weights_change_composition() -> None:
    n = len(BUCKETS)
    weights = [0.01] * n
    weights[20] = 50.0
    batches = epoch_batches(BUCKETS, 4, seed=0, epoch=0, weights=weights)
    flat = [i for b in batches for i in b]
    assert len(flat) == n  # as many draws as items
    assert Counter(flat)[20] > n // 2
    for b in batches:
        assert len({BUCKETS[i] for i in b}) == 1
    with pytest.raises(ValueError):
        epoch_batches(BUCKETS, 4, seed=0, epoch=0, weights=[1.0])


# -- captions --------------------------------------------------------------------------------------------------

def test_caption_shuffle_keeps_first_tags() -> None:
    caption = "sks person,  red hat , beach, sunset,smiling, film grain"
    cfg = AugmentConfig(shuffle_tags=True, keep_tokens=2)
    tags = ["sks person", "red hat", "beach", "sunset", "smiling", "film grain"]
    seen = set()
    for s in range(20):
        out = caption_variant(caption, cfg, random.Random(s))
        parts = out.split(", ")
        assert parts[:2] == tags[:2] and sorted(parts) == sorted(tags)
        seen.add(out)
    assert len(seen) > 3
    assert caption_variant(caption, cfg, random.Random(5)) == caption_variant(caption, cfg, random.Random(5))
    assert caption_variant(caption, AugmentConfig(shuffle_tags=False), random.Random(0)) == caption
    assert caption_variant("a|b|c", AugmentConfig(shuffle_tags=True, keep_tokens=0, tag_separator="|"),
                           random.Random(0)).count(", ") == 2


def test_balanced_weights_favour_rare_terms() -> None:
    captions = ["a photo of a dog on grass"] * 18 + ["a photo of a cat on a sofa"] * 2
    weights = balanced_weights(captions)
    assert len(weights) == 20 and math.isclose(sum(weights) / 20, 1.0)
    assert weights[19] > 3 * weights[0]
    assert balanced_weights(["", "x dog"])[0] > 0  # no terms -> neutral weight, not zero
    rare = set(range(18, 20))
    buckets = [(64, 64)] * 20
    plain = weighted = 0
    for epoch in range(30):
        plain += sum(i in rare for b in epoch_batches(buckets, 4, 0, epoch) for i in b)
        weighted += sum(i in rare for b in epoch_batches(buckets, 4, 0, epoch, weights=weights) for i in b)
    assert plain == 2 * 30
    assert weighted > 3 * plain  # the rare subject now gets a fair share of the steps

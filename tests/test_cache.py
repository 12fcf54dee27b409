"""Latent and text caches (finetune.training.cache) and the trainer's feed (finetune.training.feed): reuse, rebuilds, atomicity,
and cached batches equal to live ones."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from finetune.pretraining.base import write_tiny_base
from sdloop.pipelines import base_info, load_components
from finetune.training.cache import CacheStats, read_tensors
from finetune.training.config import TrainConfig
from finetune.training.feed import TrainingFeed

# (width, height, caption): three aspect ratios so bucketing makes three buckets at resolution 32, step 8
SPECS = [
    (64, 64, "red circle, white background, small"),
    (64, 64, "blue square, grey background, large"),
    (96, 48, "green star, black background, left"),
    (96, 56, "orange triangle, cyan background, right"),
    (48, 96, "purple circle, white background, top"),
    (64, 64, "yellow star, grey background, centre"),
    (70, 64, "red square, black background, bottom"),
]


def _draw(w: int, h: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    base = rs.randint(60, 200, 3)
    ramp = np.linspace(-40, 40, w)[None, :, None] + np.linspace(-30, 30, h)[:, None, None]
    img = Image.fromarray(np.clip(base + ramp, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy, r = rs.randint(10, w - 10), rs.randint(10, h - 10), rs.randint(6, 14)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rs.randint(0, 255, 3)))
    return img


def _item(root: Path, rel: str, img: Image.Image, caption: str):
    from finetune.data.check import Item

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    (root / rel).write_bytes(data)
    return Item(path=rel, caption=caption, width=img.width, height=img.height,
                sha256=hashlib.sha256(data).hexdigest(), phash="0" * 16, mode="RGB", converted=None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here: these models are tiny, so a second thread gains little, and when another torch
    process shares the 2 cores (a training run beside the tests), two spinning OpenMP threads each slow every
    convolution down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Seven drawn images of three aspect ratios; read-only (a test that needs a changed image writes a new file)."""
    root = tmp_path_factory.mktemp("data")
    items = [_item(root, f"img{i}.png", _draw(w, h, i), cap) for i, (w, h, cap) in enumerate(SPECS)]
    return root, items


@pytest.fixture(scope="module")
def comps(tiny_base: Path):
    components = load_components(str(tiny_base))
    return components, base_info(str(tiny_base)).fingerprint


@pytest.fixture(scope="module")
def built(dataset, comps, tmp_path_factory):
    """A cache built once with the default test config, and its stats; copy it before changing it."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    return cache, _feed(dataset, comps, cache, _cfg()).prepare()


@pytest.fixture()
def cache_copy(built, tmp_path: Path) -> Path:
    shutil.copytree(built[0], tmp_path / "cache")
    return tmp_path / "cache"


def _cfg(**kw) -> TrainConfig:
    augment = {"bucket_step": 8, **kw.pop("augment", {})}
    return TrainConfig(resolution=kw.pop("resolution", 32), batch_size=kw.pop("batch_size", 3), augment=augment,
                       **kw)


def _feed(dataset, comps, cache_root: Path, cfg: TrainConfig, train: bool = True, items=None) -> TrainingFeed:
    root, default_items = dataset
    components, fingerprint = comps
    return TrainingFeed(items if items is not None else default_items, root, cfg, components, fingerprint,
                        cache_root=cache_root, train=train, progress=False)


def _files(cache_root: Path, kind: str) -> set[str]:
    return {p.name for p in (cache_root / kind).glob("*")} if (cache_root / kind).exists() else set()


def test_prepare_builds_once_then_reuses(dataset, comps, built) -> None:
    cache, first = built
    cfg = _cfg()
    feed = _feed(dataset, comps, cache, cfg)
    assert len({b for b in feed.buckets}) == 3 and len(feed) == len(SPECS)
    n_captions = len(SPECS) + 1  # every caption (variants=1, no shuffling) and the empty one
    assert (first.latents_built, first.latents_reused) == (len(SPECS), 0)
    assert (first.text_built, first.text_reused) == (n_captions, 0)
    assert first.built == len(SPECS) + n_captions and first.bytes > 0
    assert len(_files(cache, "latents")) == len(SPECS) and len(_files(cache, "text")) == n_captions
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")], "no temporary files are left"

    again = _feed(dataset, comps, cache, cfg).prepare()
    assert again.built == 0 and again.reused == first.built and again.bytes == first.bytes

    live = _feed(dataset, comps, cache, _cfg(use_cache=False)).prepare()
    assert live == CacheStats()
    empty = _feed(dataset, comps, cache, cfg, train=False, items=[])  # a run without a validation split
    assert len(empty) == 0 and empty.epoch_batches(0) == [] and empty.prepare() == CacheStats()


def test_batch_shapes_and_bucket_check(dataset, comps, built) -> None:
    feed = _feed(dataset, comps, built[0], _cfg())
    assert feed.prepare().built == 0
    for batch in feed.epoch_batches(0):
        out = feed.load_batch(batch, 0)
        w, h = feed.buckets[batch[0]]
        assert out["latents"].shape == (len(batch), 4, h // 8, w // 8) and out["latents"].dtype == torch.float32
        assert out["encoder_hidden_states"].shape == (len(batch), 77, 32)
        assert set(out) == {"latents", "encoder_hidden_states"}
    wide, square = SPECS.index(next(s for s in SPECS if s[0] > s[1])), 0
    with pytest.raises(ValueError, match="one bucket"):
        feed.load_batch([wide, square], 0)


@pytest.mark.parametrize("change", ["resolution", "augment", "base", "image", "caption"])
def test_changed_inputs_rebuild(change: str, dataset, comps, built, cache_copy: Path, tmp_path_factory) -> None:
    cache, first = cache_copy, built[1]
    root, items = dataset
    components, fingerprint = comps
    n, n_text = len(items), first.text_built
    cfg, new_items = _cfg(), list(items)
    if change == "resolution":
        cfg = _cfg(resolution=40)
    elif change == "augment":
        cfg = _cfg(augment={"flip_p": 0.5})
    elif change == "base":
        other = write_tiny_base(tmp_path_factory.mktemp("base2") / "tiny", seed=1)
        components, fingerprint = load_components(str(other)), base_info(str(other)).fingerprint
        assert fingerprint != comps[1]
    elif change == "image":
        new_items[2] = _item(root, "img2_edited.png", _draw(96, 48, seed=99), items[2].caption)
        assert new_items[2].sha256 != items[2].sha256
    elif change == "caption":
        new_items[1] = type(items[1])(**{**items[1].__dict__, "caption": "blue square, a new caption"})
    stats = TrainingFeed(new_items, root, cfg, components, fingerprint, cache_root=cache, progress=False).prepare()
    expected = {  # (latents built, text built)
        "resolution": (n, 0), "augment": (n, 0), "base": (n, n_text), "image": (1, 0), "caption": (0, 1),
    }[change]
    assert (stats.latents_built, stats.text_built) == expected
    assert stats.latents_reused == n - expected[0] and stats.text_reused == n_text - expected[1]


def test_validation_variant_is_merged_into_the_same_file(dataset, comps, cache_copy: Path) -> None:
    files = sorted((cache_copy / "latents").iterdir())
    before = {p: read_tensors(p, ["v0"])["v0"] for p in files}
    assert all(read_tensors(p, ["val"]) is None for p in files)  # the training feed did not pay for "val"
    stats = _feed(dataset, comps, cache_copy, _cfg(), train=False).prepare()
    assert stats.latents_built == len(SPECS) and stats.text_reused == len(SPECS) + 1 and stats.text_built == 0
    assert sorted((cache_copy / "latents").iterdir()) == files  # one file per image, now with both
    for p in files:
        got = read_tensors(p, ["v0", "val"])
        assert got is not None and torch.equal(got["v0"], before[p])
    assert _feed(dataset, comps, cache_copy, _cfg(), train=False).prepare().built == 0
    assert _feed(dataset, comps, cache_copy, _cfg()).prepare().built == 0


def test_corrupt_files_are_rebuilt(dataset, comps, cache_copy: Path) -> None:
    cache = cache_copy
    cfg = _cfg(cache_memory_mb=0)  # every load_batch reads the files (no RAM copies)
    feed = _feed(dataset, comps, cache, cfg)
    assert feed.prepare().built == 0
    latent = sorted((cache / "latents").iterdir())[0]
    text = sorted((cache / "text").iterdir())[0]
    latent.write_bytes(latent.read_bytes()[: latent.stat().st_size // 2])  # an interrupted copy
    text.write_bytes(b"not a safetensors file")
    stats = _feed(dataset, comps, cache, cfg).prepare()
    assert (stats.latents_built, stats.text_built) == (1, 1)
    assert read_tensors(latent, ["v0"]) is not None and read_tensors(text, ["hidden"]) is not None

    # damaged after prepare(): load_batch rebuilds the file instead of crashing
    expected = [feed.load_batch(b, 0) for b in feed.epoch_batches(0)]
    feed._latent_file(3).write_bytes(b"\0" * 10)
    got = [feed.load_batch(b, 0) for b in feed.epoch_batches(0)]
    for e, g in zip(expected, got):
        assert torch.allclose(e["latents"], g["latents"], atol=1e-5, rtol=1e-4)  # batch of 1 vs batched


def test_interrupted_build_leaves_no_half_files(dataset, comps, tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    cache = tmp_path / "cache"
    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def flaky_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(filename).write_bytes(b"partial")
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle of a write
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        _feed(dataset, comps, cache, _cfg()).prepare()
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")], "no temporary files are left"
    written = list((cache / "latents").iterdir())
    assert len(written) == 2 and all(read_tensors(p, ["v0"]) is not None for p in written)
    stats = _feed(dataset, comps, cache, _cfg()).prepare()
    assert stats.latents_reused == 2 and stats.latents_built == len(SPECS) - 2


AUGMENTED = {"crop_p": 0.8, "flip_p": 0.5, "rotation_p": 0.5, "rotation_degrees": 10, "color_p": 0.5, "hue": 0.1,
             "variants": 3, "shuffle_tags": True, "keep_tokens": 1, "caption_dropout_p": 0.3}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k


@pytest.mark.parametrize("train", [True, False])
def test_cached_batches_equal_live_batches(train: bool, dataset, comps, tmp_path: Path, tmp_path_factory) -> None:
    cached = _feed(dataset, comps, tmp_path_factory.getbasetemp() / "augmented-cache", _cfg(augment=AUGMENTED),
                   train=train)
    live = _feed(dataset, comps, tmp_path / "unused", _cfg(augment=AUGMENTED, use_cache=False), train=train)
    cached.prepare()
    assert live.prepare().built == 0 and not (tmp_path / "unused").exists()
    variants, dropped = set(), 0
    for epoch in (0, 1):
        batches = cached.epoch_batches(epoch)
        assert batches == live.epoch_batches(epoch)
        for b in batches:
            _assert_same(cached.load_batch(b, epoch), live.load_batch(b, epoch))
            draws = [cached.draw(i, epoch) for i in b]
            variants |= {v for v, _ in draws}
            dropped += sum(d for _, d in draws)
    if train:
        assert variants > {0} and dropped > 0  # the test exercised several variants and caption dropout
        assert cached.epoch_batches(0) != cached.epoch_batches(1)
    else:
        assert variants == {"val"} and dropped == 0
        assert cached.epoch_batches(0) == cached.epoch_batches(5)


def test_train_text_encoder_feeds_token_ids(dataset, comps, cache_copy: Path) -> None:
    cache = cache_copy
    cfg = _cfg(augment={"caption_dropout_p": 0.5}, train_text_encoder=True)
    cached = _feed(dataset, comps, cache, cfg)
    stats = cached.prepare()
    assert stats.text_built == stats.text_reused == 0 and stats.latents_reused == len(SPECS)
    live = _feed(dataset, comps, cache, _cfg(augment={"caption_dropout_p": 0.5}, train_text_encoder=True,
                                             use_cache=False))
    for b in cached.epoch_batches(0):
        out = cached.load_batch(b, 0)
        assert set(out) == {"latents", "input_ids"} and out["input_ids"].dtype == torch.long
        assert out["input_ids"].shape == (len(b), 77)
        _assert_same(out, live.load_batch(b, 0))


def test_caption_dropout_uses_empty_caption(dataset, comps, cache_copy: Path) -> None:
    feed = _feed(dataset, comps, cache_copy, _cfg(augment={"caption_dropout_p": 1.0}, batch_size=8))
    assert feed.prepare().built == 0  # caption dropout changes no cached tensor
    empty = feed.load_batch([0, 1], 0)["encoder_hidden_states"]
    assert torch.allclose(empty[0], empty[1])
    val = _feed(dataset, comps, cache_copy, _cfg(augment={"caption_dropout_p": 1.0}), train=False)
    val.prepare()
    kept = val.load_batch([0, 1], 0)["encoder_hidden_states"]
    assert not torch.allclose(kept[0], kept[1])  # validation never drops captions


def test_balanced_sampling_in_feed(dataset, comps, tmp_path: Path) -> None:
    root, items = dataset
    skewed = [type(it)(**{**it.__dict__, "caption": "dog" if i else "rare cat"}) for i, it in enumerate(items)]
    cfg = _cfg(augment={"balanced_sampling": True, "bucketing": False}, use_cache=False)
    feed = _feed(dataset, comps, tmp_path / "c", cfg, items=skewed)
    share = sum(i == 0 for e in range(20) for b in feed.epoch_batches(e) for i in b)
    assert share > 2 * 20  # item 0 would appear once per epoch without balancing
    val = _feed(dataset, comps, tmp_path / "c", cfg, items=skewed, train=False)
    assert sorted(i for b in val.epoch_batches(0) for i in b) == list(range(len(items)))


@pytest.mark.parametrize("budget_mb, reads_after_first_epoch", [(64, 0), (0, None)])
def test_cache_tensors_stay_in_ram_within_the_budget(budget_mb, reads_after_first_epoch, dataset, comps,
                                                     cache_copy: Path, monkeypatch) -> None:
    import finetune.training.feed as feed_mod

    feed = _feed(dataset, comps, cache_copy, _cfg(cache_memory_mb=budget_mb))
    feed.prepare()
    first = [feed.load_batch(b, 0) for b in feed.epoch_batches(0)]
    reads = {"n": 0}
    original = feed_mod.read_tensors

    def counting(*args, **kwargs):
        reads["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(feed_mod, "read_tensors", counting)
    again = [feed.load_batch(b, 0) for b in feed.epoch_batches(0)]
    for a, b in zip(first, again):
        _assert_same(a, b)
    if reads_after_first_epoch is None:
        assert reads["n"] > 0, "without a RAM budget every step reads the files"
    else:
        assert reads["n"] == reads_after_first_epoch

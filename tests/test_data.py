"""The dataset check: every bad file is made for real and must be reported, never crash, never be modified."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from finetune.training.config import DataConfig
from finetune.data.check import (REASONS, DataReport, DatasetError, Item, dataset_fingerprint, format_summary, hamming,
                           load_image, phash_array, scan_dataset, split_items)
from finetune.data.stats import compute_stats

CFG = DataConfig(min_side=64)


def pattern(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A distinct RGB image per seed (random 8x8 blocks upscaled), so pHashes differ widely."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BILINEAR)


def save(img: Image.Image, path: Path, caption: str | None = "a picture", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def folder_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Bytes and mtimes of every file: the check must leave the user's folder exactly as it was."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size in its header but holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def reasons(report: DataReport) -> dict[str, str]:
    return {s.path: s.reason for s in report.skipped}


# -- bad files ------------------------------------------------------------------------------------------------------

def test_bad_files_are_reported_and_files_untouched(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save(pattern(1), root / "good.png")
    save(pattern(2), root / "UPPER.PNG")
    save(pattern(3), root / "sub" / "deeper" / "nested.jpg", "a nested picture", quality=95)
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("x")
    (root / "fake.jpg").write_text("this is not a jpeg")
    (root / "fake.txt").write_text("x")
    full_png = encoded(pattern(4, (128, 128)), "PNG")
    (root / "cut.png").write_bytes(full_png[: len(full_png) // 2])
    (root / "cut.txt").write_text("x")
    full_jpg = encoded(pattern(5, (128, 128)), "JPEG", quality=95)
    (root / "cut.jpg").write_bytes(full_jpg[: len(full_jpg) // 2])
    (root / "cut.jpg.txt").write_text("unused")  # not the same stem rule, ignored
    save(pattern(6), root / "cut_jpg_caption_holder.png")  # keeps the dataset non-trivial
    (root / "liar.png").write_bytes(png_header(100_000, 100_000))
    (root / "liar.txt").write_text("x")
    save(Image.new("1", (10_000, 10_000)), root / "huge.png")  # 10^8 pixels, a few kB compressed
    save(pattern(7, (32, 32)), root / "small.png")
    save(pattern(8, (400, 64)), root / "wide.png")
    save(pattern(9), root / "nocap.png", caption=None)
    save(pattern(10), root / "blank.png", caption="  \n\t ")
    (root / "notes.md").write_text("not an image, ignored")
    (root / ".hidden.png").write_text("hidden files are ignored")
    before = folder_digest(root)

    report = scan_dataset(root, CFG, progress=False)

    assert folder_digest(root) == before
    got = reasons(report)
    assert got == {
        "empty.png": "empty_file", "fake.jpg": "not_an_image", "cut.png": "truncated", "cut.jpg": "truncated",
        "liar.png": "decompression_bomb", "huge.png": "decompression_bomb", "small.png": "too_small",
        "wide.png": "extreme_aspect", "nocap.png": "missing_caption", "blank.png": "empty_caption",
    }
    assert {it.path for it in report.items} == {"good.png", "UPPER.PNG", "sub/deeper/nested.jpg",
                                                "cut_jpg_caption_holder.png"}
    nested = next(it for it in report.items if it.path == "sub/deeper/nested.jpg")
    assert nested.caption == "a nested picture" and (nested.width, nested.height) == (96, 96)
    assert all(s.detail for s in report.skipped)
    counts = report.stats["counts"]
    assert counts["found"] == 14 and counts["usable"] == 4 and counts["skipped_by_reason"]["decompression_bomb"] == 2
    assert set(counts["skipped_by_reason"]) <= set(REASONS)
    text = format_summary(report)
    assert "decompression_bomb" in text and "usable 4" in text


def test_max_pixels_is_checked_from_the_header(tmp_path: Path) -> None:
    save(pattern(1, (100, 100)), tmp_path / "a.png")
    report = scan_dataset(tmp_path, DataConfig(max_pixels=9_999), progress=False)
    assert reasons(report) == {"a.png": "decompression_bomb"}
    assert "data.max_pixels" in report.skipped[0].detail


def test_missing_root_and_file_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist; pass the folder of images"):
        scan_dataset(tmp_path / "nope", progress=False)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "f.png", progress=False)


def test_nothing_usable_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    report = scan_dataset(tmp_path, progress=False)
    assert report.items == [] and reasons(report) == {"x.png": "empty_file"}
    assert any("No usable images" in w for w in report.stats["warnings"])
    assert "No usable images" in format_summary(report)


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save(pattern(1), tmp_path / "a.png")
    scan_dataset(tmp_path, progress=True)
    captured = capsys.readouterr()
    assert "checking images" in captured.err and captured.out == ""


# -- metadata.jsonl ------------------------------------------------------------------------------------------------

def test_metadata_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    outside = save(pattern(20), tmp_path / "outside.png", caption=None)
    save(pattern(21), root / "a.png", caption="from the txt file")
    save(pattern(22), root / "b.png", caption=None)
    save(pattern(23), root / "c.png", caption=None)
    save(pattern(24), root / "sub" / "d.png", caption=None)
    os.symlink(outside, root / "link.png")
    lines = [
        json.dumps({"file_name": "a.png", "text": "from metadata"}),
        "{not json",
        json.dumps({"file_name": "b.png", "text": "second"}),
        json.dumps({"file_name": "c.png"}),
        json.dumps({"text": "no file name"}),
        json.dumps({"file_name": "../outside.png", "text": "escape"}),
        json.dumps({"file_name": str(outside), "text": "absolute"}),
        json.dumps({"file_name": "link.png", "text": "symlink"}),
        json.dumps({"file_name": "gone.png", "text": "missing file"}),
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (root / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": "in a subfolder"}))
    before = folder_digest(root)

    report = scan_dataset(root, progress=False)

    assert folder_digest(root) == before
    captions = {it.path: it.caption for it in report.items}
    assert captions == {"a.png": "from metadata", "b.png": "second", "sub/d.png": "in a subfolder"}
    got = reasons(report)
    assert got["metadata.jsonl line 2"] == "bad_metadata" and "not valid JSON" in \
        next(s.detail for s in report.skipped if s.path == "metadata.jsonl line 2")
    assert got["metadata.jsonl line 5"] == "bad_metadata"
    assert got["c.png"] == "missing_caption"
    assert got["../outside.png"] == "outside_dataset"
    assert got[str(outside)] == "outside_dataset"
    assert got["link.png"] == "outside_dataset"
    assert got["gone.png"] == "unreadable"


def test_caption_column_setting(tmp_path: Path) -> None:
    save(pattern(1), tmp_path / "a.png", caption=None)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "custom column"}))
    assert reasons(scan_dataset(tmp_path, progress=False)) == {"a.png": "missing_caption"}
    report = scan_dataset(tmp_path, DataConfig(caption_column="prompt"), progress=False)
    assert [it.caption for it in report.items] == ["custom column"]


# -- conversions ---------------------------------------------------------------------------------------------------

def test_modes_are_converted_and_load_image_matches(tmp_path: Path) -> None:
    base = pattern(30)
    rgba = base.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: must become white
    save(rgba, tmp_path / "rgba.png")
    save(pattern(37).convert("LA"), tmp_path / "la.png")
    save(pattern(31).convert("P"), tmp_path / "p.png")
    save(pattern(32).convert("L"), tmp_path / "l.png")
    save(pattern(33).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(pattern(34).convert("L"), dtype=np.uint16) * 257)
    save(Image.fromarray(grey16), tmp_path / "i16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save(pattern(35, (120, 80)), tmp_path / "rotated.jpg", exif=exif, quality=95)
    save(pattern(36), tmp_path / "plain.png")

    report = scan_dataset(tmp_path, progress=False)

    assert not report.skipped, report.skipped
    items = {it.path: it for it in report.items}
    assert items["rgba.png"].mode == "RGBA" and items["rgba.png"].converted == "RGBA->RGB"
    assert items["la.png"].converted == "LA->RGB"
    assert items["p.png"].converted == "P->RGB"
    assert items["l.png"].converted == "L->RGB"
    assert items["cmyk.jpg"].converted == "CMYK->RGB"
    assert items["i16.png"].mode.startswith("I") and items["i16.png"].converted == f"{items['i16.png'].mode}->RGB"
    assert items["rotated.jpg"].converted == "exif-rotated"
    assert (items["rotated.jpg"].width, items["rotated.jpg"].height) == (80, 120)
    assert items["plain.png"].converted is None and items["plain.png"].mode == "RGB"
    import imagehash

    for item in report.items:
        img = load_image(tmp_path, item)
        assert img.mode == "RGB" and img.size == (item.width, item.height)
        assert str(imagehash.phash(img)) == item.phash  # exactly the image the check hashed
    assert load_image(tmp_path, "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    grey = np.asarray(load_image(tmp_path, "i16.png"))[..., 0].astype(int)
    assert np.abs(grey - np.asarray(pattern(34).convert("L"), dtype=int)).max() <= 1


def test_load_image_errors_are_dataset_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(DatasetError, match="not_an_image"):
        load_image(tmp_path, "bad.png")
    with pytest.raises(DatasetError, match="outside the dataset"):
        load_image(tmp_path / "sub", "../bad.png")
    with pytest.raises(DatasetError, match="cannot read"):
        load_image(tmp_path, "missing.png")


# -- duplicates ----------------------------------------------------------------------------------------------------

def test_exact_and_near_duplicates(tmp_path: Path) -> None:
    a = pattern(40)
    save(a, tmp_path / "a.png", compress_level=9)
    (tmp_path / "copy_of_a.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "copy_of_a.txt").write_text("a picture")
    save(a, tmp_path / "a_fast.png", compress_level=1)  # same pixels, other bytes
    b = pattern(41)
    save(b, tmp_path / "b.png")
    save(b.convert("RGB"), tmp_path / "b_again.jpg", quality=90)
    big = ImageEnhance.Brightness(pattern(42, (128, 128))).enhance(1.05)
    save(pattern(42), tmp_path / "c_small.png")
    save(big, tmp_path / "c_big.png")

    report = scan_dataset(tmp_path, progress=False)

    assert {it.path for it in report.items} == {"a.png", "b.png", "c_big.png"}
    got = reasons(report)
    assert got == {"copy_of_a.png": "exact_duplicate", "a_fast.png": "exact_duplicate",
                   "b_again.jpg": "near_duplicate", "c_small.png": "near_duplicate"}
    dups = {d["dropped"]: d for d in report.duplicates}
    assert dups["copy_of_a.png"] == {"kept": "a.png", "dropped": "copy_of_a.png", "kind": "exact", "distance": 0}
    assert dups["a_fast.png"]["kept"] == "a.png"
    assert dups["b_again.jpg"]["kept"] == "b.png" and dups["b_again.jpg"]["kind"] == "near"
    assert dups["c_small.png"]["kept"] == "c_big.png"  # more pixels wins
    assert all(d["distance"] <= 4 for d in dups.values())
    off = scan_dataset(tmp_path, DataConfig(near_duplicate_distance=0), progress=False)
    assert all(d["distance"] == 0 for d in off.duplicates)  # only exact copies and pHash-identical images go


def test_hamming_matches_python_popcount() -> None:
    rng = random.Random(0)
    values = [rng.getrandbits(64) for _ in range(200)] + [0, 2**64 - 1]
    arr = np.array(values, dtype=np.uint64)
    got = hamming(arr, arr[0])
    assert list(got) == [bin(v ^ values[0]).count("1") for v in values]


# -- split ---------------------------------------------------------------------------------------------------------

def fake_items(n: int, seed: int = 0, pairs: int = 0, pair_distance: int = 6) -> list[Item]:
    """Items with random pHashes, plus `pairs` planted look-alikes at `pair_distance` bits from an item."""
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(n)]
    for k in range(pairs):
        bits = rng.sample(range(64), pair_distance)
        hashes.append(hashes[k] ^ sum(1 << b for b in bits))
    return [Item(path=f"img{i:05d}.png", caption=f"caption {i}", width=64, height=64,
                 sha256=hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(), phash=f"{h:016x}", mode="RGB")
            for i, h in enumerate(hashes)]


def test_split_is_deterministic_and_order_independent() -> None:
    items = fake_items(50)
    cfg = DataConfig(validation_split=0.2, split_seed=3)
    train, val = split_items(items, cfg)
    assert len(val) == 10 and len(train) == 40
    assert {it.path for it in train} | {it.path for it in val} == {it.path for it in items}
    assert split_items(items, cfg) == (train, val)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert split_items(shuffled, cfg) == (train, val)
    other = split_items(items, DataConfig(validation_split=0.2, split_seed=4))[1]
    assert {it.path for it in other} != {it.path for it in val}


def test_split_keeps_lookalikes_together() -> None:
    items = fake_items(40, seed=5, pairs=15, pair_distance=7)  # closer than split_guard_distance=10
    for seed in range(5):
        train, val = split_items(items, DataConfig(validation_split=0.3, split_seed=seed))
        side = {it.path: "val" for it in val} | {it.path: "train" for it in train}
        for k in range(15):
            assert side[items[k].path] == side[items[40 + k].path]


def test_split_sizes_and_edges() -> None:
    items = fake_items(30)
    assert split_items(items, DataConfig(validation_split=0.0))[1] == []
    assert len(split_items(items, DataConfig(validation_split=0.01, min_validation_items=3))[1]) == 3
    train, val = split_items(fake_items(2), DataConfig(validation_split=0.9, min_validation_items=5))
    assert len(train) == 1 and len(val) == 1
    assert split_items(fake_items(1), DataConfig(validation_split=0.5)) == (fake_items(1), [])
    assert split_items([], DataConfig()) == ([], [])


def test_split_real_images_no_leak(tmp_path: Path) -> None:
    for i in range(10):
        img = pattern(100 + i)
        save(img, tmp_path / f"x{i}.png")
        save(img.crop((3, 3, 96, 96)).resize((96, 96)), tmp_path / f"x{i}_shifted.png")  # pHash distance 4-8
    cfg = DataConfig(near_duplicate_distance=0, validation_split=0.3)
    report = scan_dataset(tmp_path, cfg, progress=False)
    assert len(report.items) == 20  # near-duplicate dropping is off, so the look-alike pairs stay
    train, val = split_items(report.items, cfg)
    train_hashes = phash_array(train)
    for it in val:
        assert hamming(train_hashes, phash_array([it])[0]).min() > cfg.split_guard_distance


def test_split_and_dedup_scale_to_thousands() -> None:
    items = fake_items(5000, pairs=100)
    start = time.perf_counter()
    train, val = split_items(items, DataConfig(validation_split=0.1))
    assert time.perf_counter() - start < 10
    assert len(val) == round(5100 * 0.1)


# -- stats, report, fingerprint ------------------------------------------------------------------------------------

def test_skewed_captions_warn() -> None:
    captions = ["a photo of a dog on the grass"] * 8 + ["a red car", "a tall tree"]
    items = [Item(f"{i}.png", c, 64, 64, str(i), "0" * 16, "RGB") for i, c in enumerate(captions)]
    stats = compute_stats(10, items, [], REASONS)
    cap = stats["captions"]
    assert cap["top_terms"][0]["term"] in ("photo", "dog", "grass")
    assert cap["concentration"]["top_term_share"] == 0.8
    assert cap["concentration"]["top5_coverage"] == 0.9  # photo, dog, grass, then car and red (ties by name)
    assert cap["words"] == {"min": 3, "mean": 7.0, "max": 8, "histogram": cap["words"]["histogram"]}
    assert "the" not in {t["term"] for t in cap["top_terms"]}
    assert any("80% of captions" in w for w in stats["warnings"])
    assert not any(w.startswith("Only") for w in stats["warnings"])  # 10 items is not "few"


def test_few_items_warn_and_histograms(tmp_path: Path) -> None:
    save(pattern(1, (96, 64)), tmp_path / "a.png", caption="a dog")
    save(pattern(2, (300, 300)), tmp_path / "b.png", caption="a cat")
    report = scan_dataset(tmp_path, progress=False)
    assert any("Only 2 usable" in w for w in report.stats["warnings"])
    assert report.stats["shorter_side_histogram"]["64-128"] == 1
    assert report.stats["shorter_side_histogram"]["256-512"] == 1
    assert sum(report.stats["aspect_ratio_histogram"].values()) == 2
    assert report.stats["captions"]["vocabulary_size"] == 2


def test_report_roundtrip_and_fingerprint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    save(pattern(1), data / "a.png")
    save(pattern(2), data / "b.png")
    (data / "c.png").write_bytes(b"")
    report = scan_dataset(data, progress=False)
    out = tmp_path / "out" / "report.json"
    report.save(out)
    assert DataReport.load(out) == report
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]
    assert report.fingerprint == dataset_fingerprint(list(reversed(report.items)))
    changed = [Item(**{**vars(it), "caption": "other"}) for it in report.items]
    assert dataset_fingerprint(changed) != report.fingerprint
    assert report.config["min_side"] == 64 and report.root == str(data)
    with pytest.raises(DatasetError, match="cannot read the data report"):
        DataReport.load(tmp_path / "missing.json")


def test_max_pixels_above_pil_limit_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # as if PIL's own limit were below the configured one
    save(pattern(1, (100, 100)), tmp_path / "a.png")
    report = scan_dataset(tmp_path, DataConfig(max_pixels=20_000), progress=False)
    assert [it.path for it in report.items] == ["a.png"]
    assert Image.MAX_IMAGE_PIXELS == 1_000  # PIL's global is restored

"""The dataset check: find every image and caption, skip what cannot train, de-duplicate, and split.

Training on a broken file crashes hours in; training on duplicates over-weights them and leaks them into the
validation split, making the validation loss lie. So every image is decoded once here, up front, and each problem is
reported per file with a reason code instead of a traceback. The user's files are only ever opened for reading.

Two layouts are read (and may be mixed): Hugging Face imagefolder (``metadata.jsonl`` lines with ``file_name`` and a
caption column, in the root or any subfolder) and kohya style (``image.png`` + ``image.txt``). Metadata wins when an
image has both.
"""

from __future__ import annotations

from sdloop.errors import UserError

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from finetune.config import DataConfig
from sdloop.atomic import write_bytes_atomic
from finetune.data_stats import compute_stats

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"
REASONS = {
    "empty_file": "the file is empty (0 bytes)",
    "not_an_image": "the file has an image extension but is not an image",
    "unreadable": "the file cannot be read",
    "truncated": "the image data is truncated or corrupt",
    "decompression_bomb": "the image has too many pixels (decompression-bomb guard, data.max_pixels)",
    "too_small": "the shorter side is below data.min_side",
    "extreme_aspect": "the long/short side ratio is above data.max_aspect_ratio",
    "missing_caption": "no caption (no metadata.jsonl entry and no caption file)",
    "empty_caption": "the caption is empty or only whitespace",
    "outside_dataset": "the path points outside the dataset folder",
    "bad_metadata": "a metadata.jsonl line cannot be used",
    "exact_duplicate": "identical to another image (same bytes or same pixels)",
    "near_duplicate": "nearly identical to another image (perceptual hash)",
}
_ORIENTATION = 0x0112


class DatasetError(UserError):
    """The dataset cannot be read at all; the message says what to do."""


@dataclass
class Item:
    """One usable training item."""

    path: str          # posix path relative to the dataset root
    caption: str
    width: int         # after EXIF orientation
    height: int
    sha256: str        # of the file's bytes: caches key on it
    phash: str         # 16 hex chars, imagehash.phash of the oriented RGB image
    mode: str          # original PIL mode, e.g. "RGBA"
    converted: Optional[str] = None  # e.g. "RGBA->RGB", "exif-rotated", or None


@dataclass
class Skipped:
    """One file (or metadata line) that cannot train, with a reason code from REASONS."""

    path: str
    reason: str
    detail: str


@dataclass
class DataReport:
    """What the check found; saved beside each run so a run records exactly which data it saw."""

    root: str
    items: list[Item]
    skipped: list[Skipped]
    duplicates: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the report as JSON, atomically (a crash never leaves half a file)."""
        write_bytes_atomic(Path(path), json.dumps(self.to_dict(), indent=2).encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "DataReport":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read the data report {p}: {e}; re-run the dataset check.") from None
        return cls(root=d["root"], items=[Item(**i) for i in d["items"]],
                   skipped=[Skipped(**s) for s in d["skipped"]], duplicates=d.get("duplicates", []),
                   stats=d.get("stats", {}), config=d.get("config", {}), fingerprint=d.get("fingerprint", ""))


class _Bad(Exception):
    """Internal: a file cannot train; carries the reason code and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Checked:
    item: Item
    pixel_sha: str   # hash of the decoded RGB pixels: catches the same image saved twice with different bytes


# -- files and captions ----------------------------------------------------------------------------------------------

def _inside(real_root: str, path: str) -> bool:
    """True when ``path`` (symlinks resolved) lies inside the dataset root."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _walk(root: Path) -> tuple[list[str], list[str], set[str]]:
    """Image paths, metadata files and caption files (posix, relative to root); hidden entries are ignored."""
    images, metadata, captions = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            ext = os.path.splitext(name)[1].lower()
            if name == METADATA_NAME:
                metadata.append(rel)
            elif ext in IMAGE_EXTENSIONS:
                images.append(rel)
            else:
                captions.add(rel)
    return images, metadata, captions


def _read_metadata(root: Path, real_root: str, rel_meta: str, column: str,
                   captions: dict[str, tuple[Any, str]], skipped: list[Skipped]) -> None:
    """Add ``{image path: (caption, where)}`` from one metadata.jsonl; report bad lines instead of failing."""
    base = posixpath.dirname(rel_meta)
    try:
        lines = (root / rel_meta).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        skipped.append(Skipped(rel_meta, "bad_metadata", f"cannot read it ({e}); save it as UTF-8 JSON lines."))
        return
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{rel_meta} line {no}"
        try:
            entry = json.loads(line)
        except ValueError as e:
            skipped.append(Skipped(where, "bad_metadata", f"not valid JSON ({e}); fix or delete the line."))
            continue
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            skipped.append(Skipped(where, "bad_metadata", "has no \"file_name\"; each line needs "
                                   "{\"file_name\": ..., \"" + column + "\": ...}."))
            continue
        joined = posixpath.normpath(posixpath.join(base, name))
        if posixpath.isabs(name) or os.path.isabs(name) or joined.startswith("../") or joined == ".." or \
                not _inside(real_root, str(root / joined)):
            skipped.append(Skipped(name, "outside_dataset", f"{where} names a file outside the dataset folder; "
                                   "move the file into the folder and name it relative to metadata.jsonl."))
            continue
        captions.setdefault(joined, (entry.get(column), where))


def _caption_file(root: Path, rel: str, extension: str, caption_files: set[str]) -> Optional[str]:
    rel_txt = posixpath.splitext(rel)[0] + extension
    if rel_txt not in caption_files:
        return None
    try:
        return (root / rel_txt).read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return None


def _caption(rel: str, meta: Optional[tuple[Any, str]], from_file: Optional[str], cfg: DataConfig) -> str:
    """The caption of an image, or _Bad(missing_caption / empty_caption)."""
    if meta is not None:
        value, where = meta
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]  # imagefolder allows several captions per image; train on the first
        if not isinstance(value, str):
            raise _Bad("missing_caption", f"{where} has no text in column \"{cfg.caption_column}\" "
                       f"(set data.caption_column if your captions use another column).")
        text = value
    elif from_file is not None:
        text = from_file
    else:
        stem = posixpath.splitext(rel)[0]
        raise _Bad("missing_caption", f"add {stem}{cfg.caption_extension} or a metadata.jsonl entry.")
    text = " ".join(text.split())
    if not text:
        raise _Bad("empty_caption", "write a caption describing the image.")
    return text


# -- decoding --------------------------------------------------------------------------------------------------------

def _to_rgb(im: Image.Image) -> tuple[Image.Image, Optional[str]]:
    """Convert any mode to 8-bit RGB: transparency is composited on white, 16-bit and float data are scaled."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode}->RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range onto 8 bits
        grey = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), f"{mode}->RGB"
    return im.convert("RGB"), f"{mode}->RGB"


@contextlib.contextmanager
def _strict_pil(max_pixels: int) -> Iterator[None]:
    """PIL's bomb limit follows data.max_pixels and truncated data raises, whatever other code set globally."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _bomb_detail(what: str, max_pixels: int) -> str:
    return f"{what.rstrip('.')}; the limit is data.max_pixels={max_pixels}: downscale the image or raise the limit."


def _decode(data: bytes, max_pixels: int) -> tuple[Image.Image, str, Optional[str]]:
    """Decode fully (so truncation shows now, not mid-training) into oriented RGB: (image, mode, converted)."""
    if not data:
        raise _Bad("empty_file", "the file has 0 bytes; re-export or delete it.")
    with _strict_pil(max_pixels):
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise _Bad("not_an_image", "PIL does not recognise it as an image; delete it or fix the extension.")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Bad("decompression_bomb", _bomb_detail(str(e), max_pixels))
        except Exception as e:  # noqa: BLE001 - any decoder error is a per-file problem, never a crash
            raise _Bad("unreadable", f"{type(e).__name__}: {e}")
        w, h = im.size
        if w * h > max_pixels:  # from the header, before any pixel is decoded
            raise _Bad("decompression_bomb", _bomb_detail(f"{w}x{h} = {w * h} pixels", max_pixels))
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Bad("decompression_bomb", _bomb_detail(str(e), max_pixels))
        except Exception as e:  # noqa: BLE001
            text = f"{type(e).__name__}: {e}"
            reason = "truncated" if isinstance(e, (OSError, EOFError, SyntaxError, ValueError)) else "unreadable"
            raise _Bad(reason, f"{text}; re-export or re-download the file.")
    mode = im.mode
    notes = []
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only means no rotation
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        im = ImageOps.exif_transpose(im)
        notes.append("exif-rotated")
    try:
        rgb, conv = _to_rgb(im)
    except Exception as e:  # noqa: BLE001
        raise _Bad("unreadable", f"cannot convert mode {mode} to RGB ({e}); re-export as RGB PNG or JPEG.")
    if conv:
        notes.insert(0, conv)
    return rgb, mode, ", ".join(notes) or None


def _check_image(root: Path, rel: str, caption: str, cfg: DataConfig) -> _Checked:
    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        raise _Bad("unreadable", f"{e.strerror or e}; check that the file exists and is readable.")
    rgb, mode, converted = _decode(data, cfg.max_pixels)
    w, h = rgb.size
    if min(w, h) < cfg.min_side:
        raise _Bad("too_small", f"{w}x{h}: the shorter side is below data.min_side={cfg.min_side}.")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise _Bad("extreme_aspect", f"{w}x{h}: ratio {max(w, h) / min(w, h):.2f} is above "
                   f"data.max_aspect_ratio={cfg.max_aspect_ratio}; crop it.")
    pixel_sha = hashlib.sha256(f"{w}x{h}".encode() + rgb.tobytes()).hexdigest()
    item = Item(path=rel, caption=caption, width=w, height=h, sha256=hashlib.sha256(data).hexdigest(),
                phash=str(imagehash.phash(rgb)), mode=mode, converted=converted)
    return _Checked(item, pixel_sha)


def load_image(root: str | Path, item: Item | str, max_pixels: Optional[int] = None) -> Image.Image:
    """Load an item as RGB exactly as the check decoded it (orientation and mode conversion included)."""
    rel = item.path if isinstance(item, Item) else str(item)
    root = Path(root)
    if not _inside(os.path.realpath(root), str(root / rel)):
        raise DatasetError(f"{rel} is outside the dataset folder {root}; pass a path relative to it.")
    try:
        data = (root / rel).read_bytes()
        return _decode(data, max_pixels or DataConfig().max_pixels)[0]
    except OSError as e:
        raise DatasetError(f"cannot read {root / rel}: {e}; re-run the dataset check.") from None
    except _Bad as e:
        raise DatasetError(f"cannot use {root / rel} ({e.reason}): {e.detail}") from None


# -- duplicates ------------------------------------------------------------------------------------------------------

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


def _preference(c: _Checked) -> tuple:
    """Sort key of the copy to keep: more pixels, then the shorter, then the alphabetically first path."""
    return (-c.item.width * c.item.height, len(c.item.path), c.item.path)


def _dedupe(checked: list[_Checked], near: int) -> tuple[list[Item], list[Skipped], list[dict]]:
    """Drop exact duplicates (bytes or pixels), then near duplicates (pHash); keep the preferred copy of each."""
    checked = sorted(checked, key=_preference)
    skipped, dups, kept = [], [], []
    seen: dict[str, str] = {}
    for c in checked:
        first = seen.get("b" + c.item.sha256) or seen.get("p" + c.pixel_sha)
        if first is not None:
            how = "the same bytes" if seen.get("b" + c.item.sha256) else "the same pixels"
            skipped.append(Skipped(c.item.path, "exact_duplicate", f"{how} as {first}"))
            dups.append({"kept": first, "dropped": c.item.path, "kind": "exact", "distance": 0})
            continue
        seen["b" + c.item.sha256] = seen["p" + c.pixel_sha] = c.item.path
        kept.append(c.item)
    hashes = phash_array(kept)
    alive = np.ones(len(kept), dtype=bool)
    for i, item in enumerate(kept):
        if not alive[i]:
            continue
        d = hamming(hashes[i + 1:], hashes[i])
        for j in np.nonzero((d <= near) & alive[i + 1:])[0]:
            other = kept[i + 1 + int(j)]
            alive[i + 1 + int(j)] = False
            skipped.append(Skipped(other.path, "near_duplicate", f"pHash distance {int(d[j])} from {item.path}"))
            dups.append({"kept": item.path, "dropped": other.path, "kind": "near", "distance": int(d[j])})
    return [it for it, a in zip(kept, alive) if a], skipped, dups


# -- the check -------------------------------------------------------------------------------------------------------

def dataset_fingerprint(items: list[Item]) -> str:
    """A hash of what training sees (paths, bytes, captions), independent of order; runs and caches record it."""
    rows = sorted((it.path, it.sha256, it.caption) for it in items)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def scan_dataset(root: str | Path, cfg: DataConfig | None = None, progress: bool = True) -> DataReport:
    """Check a dataset folder and return the report; nothing usable is reported, not raised (the CLI decides)."""
    cfg = cfg or DataConfig()
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root} does not exist; pass the folder of images.")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; pass the folder of images (not a single file).")
    real_root = os.path.realpath(root)
    images, metadata, caption_files = _walk(root)
    skipped: list[Skipped] = []
    meta: dict[str, tuple[Any, str]] = {}
    for rel_meta in metadata:
        _read_metadata(root, real_root, rel_meta, cfg.caption_column, meta, skipped)
    candidates = sorted(set(images) | set(meta))
    checked: list[_Checked] = []
    for rel in tqdm(candidates, desc="checking images", unit="img", disable=not progress, file=sys.stderr):
        try:
            if not _inside(real_root, str(root / rel)):
                raise _Bad("outside_dataset", "a symlink resolving outside the dataset folder; copy the file in.")
            if not (root / rel).is_file():
                where = meta[rel][1] if rel in meta else rel
                raise _Bad("unreadable", f"{where} names a file that does not exist; fix the name or add it.")
            found = _check_image(root, rel, "", cfg)  # the image first: a broken file matters more than its caption
            txt = _caption_file(root, rel, cfg.caption_extension, caption_files)
            found.item.caption = _caption(rel, meta.get(rel), txt, cfg)
            checked.append(found)
        except _Bad as e:
            skipped.append(Skipped(rel, e.reason, e.detail))
    items, dup_skipped, duplicates = _dedupe(checked, cfg.near_duplicate_distance)
    skipped += dup_skipped
    items.sort(key=lambda it: it.path)
    used = {posixpath.splitext(p)[0] + cfg.caption_extension for p in candidates}
    orphans = sum(1 for c in caption_files if c.endswith(cfg.caption_extension) and c not in used)
    return DataReport(root=str(root), items=items, skipped=skipped, duplicates=duplicates,
                      stats=compute_stats(len(candidates), items, skipped, REASONS, orphans),
                      config=dataclasses.asdict(cfg), fingerprint=dataset_fingerprint(items))


# -- the split -------------------------------------------------------------------------------------------------------

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
    target = min(max(round(n * cfg.validation_split), cfg.min_validation_items), n - 1)

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


# -- the summary -----------------------------------------------------------------------------------------------------

def _table(title: str, rows: dict[str, Any]) -> list[str]:
    width = max((len(k) for k in rows), default=0)
    return [title] + [f"  {k:<{width}}  {v}" for k, v in rows.items()]


def format_summary(report: DataReport, max_listed: int = 10) -> str:
    """A readable multi-line summary for the terminal: counts, skipped files and why, shapes, captions, warnings."""
    st = report.stats
    counts = st.get("counts", {})
    lines = [f"Dataset {report.root}",
             f"  found {counts.get('found', 0)} image(s), usable {len(report.items)}, skipped {len(report.skipped)}"
             f", fingerprint {report.fingerprint[:12]}"]
    by_reason = counts.get("skipped_by_reason", {})
    if by_reason:
        lines += _table("Skipped by reason", {f"{k} ({v})": REASONS.get(k, k) for k, v in by_reason.items()})
        for s in report.skipped[:max_listed]:
            lines.append(f"    {s.path}: {s.reason}: {s.detail}")
        if len(report.skipped) > max_listed:
            lines.append(f"    ... and {len(report.skipped) - max_listed} more (see the saved report)")
    converted = sum(1 for it in report.items if it.converted)
    if converted:
        lines.append(f"  converted on load: {converted} image(s) (mode or EXIF orientation)")
    if report.items:
        lines += _table("Shorter side (px)", {k: v for k, v in st.get("shorter_side_histogram", {}).items() if v})
        lines += _table("Aspect ratio (w/h)", {k: v for k, v in st.get("aspect_ratio_histogram", {}).items() if v})
        cap = st.get("captions", {})
        words, conc = cap.get("words", {}), cap.get("concentration", {})
        lines += _table("Captions", {
            "words min/mean/max": f"{words.get('min')}/{words.get('mean')}/{words.get('max')}",
            "vocabulary": cap.get("vocabulary_size"),
            "top terms": ", ".join(f"{t['term']} ({t['share']:.0%})" for t in cap.get("top_terms", [])[:8]),
            "top term share": f"{conc.get('top_term_share', 0):.0%}",
            "top-5 coverage": f"{conc.get('top5_coverage', 0):.0%}",
            "normalised entropy": conc.get("normalised_entropy"),
        })
    for w in st.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)

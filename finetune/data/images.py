"""Decoding one image the way training will see it: fully, oriented, as 8-bit RGB, within data.max_pixels.

Training on a broken file crashes hours in, so every image is decoded completely up front and each problem becomes a
reason code (``Bad``). The pixel limit is always ``data.max_pixels``, whatever PIL's global limit says, and every
message about it quotes ``data.max_pixels`` (never PIL's own, doubled, error threshold).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from finetune.training.config import DataConfig
from finetune.data.files import Bad, DatasetError, Item, display, read_inside

_ORIENTATION = 0x0112
BYTES_PER_PIXEL = 8  # 16-bit RGBA, the widest layout an uncompressed image file holds per pixel


@dataclass
class Checked:
    """An image that decoded, with the hash of its pixels for exact-duplicate detection."""

    item: Item
    pixel_sha: str   # hash of the decoded RGB pixels: catches the same image saved twice with different bytes


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can be (uncompressed, plus room for headers and metadata)."""
    return max_pixels * BYTES_PER_PIXEL + (16 << 20)


def _read_image(root: Path, real_root: str, rel: str, max_pixels: int) -> bytes:
    """The image file's bytes, refusing a file too large to hold an image within data.max_pixels before reading it."""
    def too_big(size: int) -> Bad:
        return Bad("decompression_bomb", f"the file is {size} bytes, more than any image within "
                   f"data.max_pixels={max_pixels} can take: downscale the image or raise data.max_pixels.")
    return read_inside(root, real_root, rel, max_file_bytes(max_pixels), too_big=too_big)


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


def bomb(max_pixels: int, pixels: Optional[int] = None, size: str = "") -> Bad:
    """The decompression-bomb refusal, quoting data.max_pixels (the user's setting, not PIL's threshold)."""
    what = f"{size} = {pixels} pixels" if size else f"{pixels} pixels" if pixels else "too many pixels"
    return Bad("decompression_bomb", f"{what}, above data.max_pixels={max_pixels}: downscale the image or raise "
               "data.max_pixels.")


def _bomb_from_pil(e: Exception, max_pixels: int) -> Bad:
    """PIL's message quotes its own threshold (twice MAX_IMAGE_PIXELS for the error); keep only the image's size."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    return bomb(max_pixels, int(found.group(1)) if found else None)


def decode(data: bytes, max_pixels: int) -> tuple[Image.Image, str, Optional[str]]:
    """Decode fully (so truncation shows now, not mid-training) into oriented RGB: (image, mode, converted)."""
    if not data:
        raise Bad("empty_file", "the file has 0 bytes; re-export or delete it.")
    with _strict_pil(max_pixels):
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Bad("not_an_image", "PIL does not recognise it as an image; delete it or fix the extension.")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_from_pil(e, max_pixels)
        except Exception as e:  # noqa: BLE001 - any decoder error is a per-file problem, never a crash
            raise Bad("unreadable", f"{type(e).__name__}: {e}")
        w, h = im.size
        if w * h > max_pixels:  # from the header, before any pixel is decoded
            raise bomb(max_pixels, w * h, f"{w}x{h}")
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_from_pil(e, max_pixels)
        except Exception as e:  # noqa: BLE001
            text = f"{type(e).__name__}: {e}"
            reason = "truncated" if isinstance(e, (OSError, EOFError, SyntaxError, ValueError)) else "unreadable"
            raise Bad(reason, f"{text}; re-export or re-download the file.")
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
        raise Bad("unreadable", f"cannot convert mode {mode} to RGB ({e}); re-export as RGB PNG or JPEG.")
    if conv:
        notes.insert(0, conv)
    return rgb, mode, ", ".join(notes) or None


def check_image(root: Path, real_root: str, rel: str, cfg: DataConfig) -> Checked:
    """Read (safely) and decode one image, and apply the size and shape rules; Bad when it cannot train."""
    data = _read_image(root, real_root, rel, cfg.max_pixels)
    rgb, mode, converted = decode(data, cfg.max_pixels)
    w, h = rgb.size
    if min(w, h) < cfg.min_side:
        raise Bad("too_small", f"{w}x{h}: the shorter side is below data.min_side={cfg.min_side}.")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise Bad("extreme_aspect", f"{w}x{h}: ratio {max(w, h) / min(w, h):.2f} is above "
                  f"data.max_aspect_ratio={cfg.max_aspect_ratio}; crop it.")
    pixel_sha = hashlib.sha256(f"{w}x{h}".encode() + rgb.tobytes()).hexdigest()
    item = Item(path=rel, caption="", width=w, height=h, sha256=hashlib.sha256(data).hexdigest(),
                phash=str(imagehash.phash(rgb)), mode=mode, converted=converted)
    return Checked(item, pixel_sha)


def load_image(root: str | Path, item: Item | str, max_pixels: Optional[int] = None) -> Image.Image:
    """Load an item as RGB exactly as the check decoded it (orientation and mode conversion included).

    Without ``max_pixels`` the limit is the default data.max_pixels, or the item's own size when the check (under
    the user's data.max_pixels) accepted a larger image: an item that passed the check never fails here on size.
    """
    rel = item.path if isinstance(item, Item) else str(item)
    if max_pixels is None:
        max_pixels = DataConfig().max_pixels
        if isinstance(item, Item):
            max_pixels = max(max_pixels, item.width * item.height)
    root = Path(root)
    real_root = os.path.realpath(root)
    try:
        data = _read_image(root, real_root, rel, max_pixels)
        return decode(data, max_pixels)[0]
    except Bad as e:
        if e.reason == "outside_dataset":
            raise DatasetError(f"{display(rel)} is outside the dataset folder {display(root)}; pass a path "
                               "relative to it.") from None
        if e.reason == "unreadable":
            raise DatasetError(f"cannot read {display(root / rel)}: {e.detail} Re-run the dataset check.") from None
        raise DatasetError(f"cannot use {display(root / rel)} ({e.reason}): {e.detail}") from None

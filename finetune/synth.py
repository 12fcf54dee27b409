"""A small captioned dataset drawn locally with PIL, so tests and the demo need no download.

Each image is one shape (with a caption naming its size, colour, position and background) drawn over a gently
shaded background. Positions, sizes and angles are jittered and the shading direction varies, so perceptual hashes
differ enough that the near-duplicate check keeps almost every image: a dataset of look-alikes would teach nothing.
The same seed gives the same bytes, so caches and tests are reproducible.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdloop.atomic import atomic_dir
from finetune.data import DatasetError

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "purple": (140, 50, 180), "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128), "cyan": (120, 220, 230),
}
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
             "centre": (0.5, 0.5)}
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the image side
CAPTION_FORMATS = ("imagefolder", "txt")


def _background(size: int, colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """A linear gradient around the named colour, in a random direction, so backgrounds are not flat."""
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(25, 55)
    axis = np.linspace(-0.5, 0.5, size)
    t = axis[None, :] * math.cos(angle) + axis[:, None] * math.sin(angle)  # in [-0.71, 0.71]
    pixels = np.asarray(colour, dtype=np.float64)[None, None, :] + (t * 2 * strength)[:, :, None]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _polygon(cx: float, cy: float, r: float, points: int, angle: float, inner: float = 1.0) -> list[tuple]:
    """Vertices of a regular polygon (or a star when ``inner`` < 1), rotated by ``angle`` radians."""
    steps = points * (2 if inner < 1.0 else 1)
    out = []
    for i in range(steps):
        rad = r if (inner >= 1.0 or i % 2 == 0) else r * inner
        a = angle + 2 * math.pi * i / steps
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def _draw_shape(img: Image.Image, shape: str, centre: tuple[float, float], r: float, fill: tuple, angle: float) -> None:
    draw = ImageDraw.Draw(img)
    cx, cy = centre
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle + math.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, angle - math.pi / 2), fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, r * 1.3, 5, angle - math.pi / 2, inner=0.45), fill=fill)


def _sample(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """Draw one image and its caption."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    background = rng.choice(sorted(BACKGROUNDS))
    position = rng.choice(sorted(POSITIONS))
    scale = rng.choice(sorted(SIZES))
    img = _background(size, BACKGROUNDS[background], rng)
    fx, fy = POSITIONS[position]
    jitter = 0.06
    centre = ((fx + rng.uniform(-jitter, jitter)) * size, (fy + rng.uniform(-jitter, jitter)) * size)
    r = SIZES[scale] * size * rng.uniform(0.85, 1.15)
    _draw_shape(img, shape, centre, r, COLOURS[colour], rng.uniform(-0.4, 0.4))
    where = "in the centre" if position == "centre" else f"on the {position}" if position in ("left", "right") \
        else f"at the {position}"
    return img, f"a {scale} {colour} {shape} {where}, {background} background"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_synthetic_dataset(out_dir: str | Path, n: int, seed: int = 0, size: int = 64,
                           caption_format: str = "imagefolder") -> Path:
    """Write ``n`` captioned shape images to ``out_dir`` and return its path.

    ``caption_format`` "imagefolder" writes ``metadata.jsonl`` (file_name, text); "txt" writes same-stem ``.txt``
    captions. The folder is built beside ``out_dir`` and renamed into place, so a crash never leaves half a dataset.
    """
    out = Path(out_dir)
    if n < 1:
        raise DatasetError(f"n={n} is invalid: make at least 1 image.")
    if size < 16:
        raise DatasetError(f"size={size} is invalid: images must be at least 16 pixels wide.")
    if caption_format not in CAPTION_FORMATS:
        raise DatasetError(f"caption_format={caption_format!r} is invalid: use one of {CAPTION_FORMATS}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} already exists and is not empty; pass a new folder (nothing was overwritten).")
    with atomic_dir(out) as tmp:  # an existing `out` is empty (checked above)
        rng = random.Random(seed)
        lines = []
        width = max(4, len(str(n - 1)))
        for i in range(n):
            img, caption = _sample(rng, size)
            name = f"img_{i:0{width}d}.png"
            (tmp / name).write_bytes(_png_bytes(img))
            if caption_format == "txt":
                (tmp / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            lines.append(json.dumps({"file_name": name, "text": caption}))
        if caption_format == "imagefolder":
            (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out

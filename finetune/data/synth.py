"""A small captioned dataset drawn locally with PIL, so tests and the demo need no download.

Each image is one shape (with a caption naming its size, colour, position and background) drawn over a gently
shaded background. Positions, sizes and angles are jittered and the shading direction varies, so perceptual hashes
differ enough that the near-duplicate check keeps almost every image: a dataset of look-alikes would teach nothing.
The same seed gives the same bytes, so caches and tests are reproducible.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from sdloop.atomic import atomic_dir, check_writable_dir
from sdloop.seeding import py_rng
from finetune.data.check import DatasetError
from finetune.data.files import display

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
N_RANGE = (1, 100_000)       # images: the synthetic set is for tests and demos
SIZE_RANGE = (16, 2048)      # pixels per side
# Words the default data never uses: ``concept="brown"`` (a colour; also "pink") or "tiny" (a size) puts one into a
# share of the images, so a fine-tune has something to learn that the pretrained drawing base cannot already draw.
# The demo teaches "brown": the drawing base's VAE decodes it (81% of brown images come back brown) but not pink
# (9%), which caps what a UNet LoRA can teach.
CONCEPT_COLOURS = {"brown": (140, 80, 30), "pink": (255, 105, 180)}
CONCEPT_SIZES = {"tiny": 0.08}
CONCEPTS = ("brown", "tiny", "pink")
ALL_COLOURS = {**COLOURS, **CONCEPT_COLOURS}
ALL_SIZES = {**SIZES, **CONCEPT_SIZES}


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


def _sample(rng: random.Random, size: int, concept: Optional[str] = None) -> tuple[Image.Image, str]:
    """Draw one image and its caption; ``concept`` (one of CONCEPTS) replaces the drawn colour or size."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))  # drawn even when replaced, so every other draw stays the same
    colour = concept if concept in CONCEPT_COLOURS else colour
    background = rng.choice(sorted(BACKGROUNDS))
    position = rng.choice(sorted(POSITIONS))
    scale = rng.choice(sorted(SIZES))
    img = _background(size, BACKGROUNDS[background], rng)
    fx, fy = POSITIONS[position]
    jitter = 0.06
    centre = ((fx + rng.uniform(-jitter, jitter)) * size, (fy + rng.uniform(-jitter, jitter)) * size)
    scale = concept if concept in CONCEPT_SIZES else scale
    r = ALL_SIZES[scale] * size * rng.uniform(0.85, 1.15)
    _draw_shape(img, shape, centre, r, ALL_COLOURS[colour], rng.uniform(-0.4, 0.4))
    where = "in the centre" if position == "centre" else f"on the {position}" if position in ("left", "right") \
        else f"at the {position}"
    return img, f"a {scale} {colour} {shape} {where}, {background} background"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def draw_samples(n: int, seed: int = 0, size: int = 64, concept: Optional[str] = None,
                 concept_share: float = 0.5) -> Iterator[tuple[Image.Image, str]]:
    """Yield ``n`` (image, caption) pairs in memory: the images ``make_synthetic_dataset`` writes, same seed.

    With ``concept`` (one of CONCEPTS), each image independently (a draw of its own, seeded by the seed and its
    index) shows the concept (its colour or size) with probability ``concept_share``; all other draws are those
    of the same seed without a concept.
    """
    _check_concept(concept, concept_share)
    rng = random.Random(seed)
    for i in range(n):
        use = concept is not None and py_rng(seed, "concept", concept, i).random() < concept_share
        yield _sample(rng, size, concept if use else None)


def _check_concept(concept: Optional[str], concept_share: float) -> None:
    if concept is not None and concept not in CONCEPTS:
        raise DatasetError(f"concept={concept!r} is unknown: use one of {CONCEPTS}.")
    if not 0.0 <= concept_share <= 1.0:
        raise DatasetError(f"concept_share={concept_share} is invalid: use a share between 0 and 1.")


def _check_counts(n: int, size: int) -> None:
    """``n`` and ``size`` are integers in range: a typo like --size 640000 must not try to draw 4e11 pixels."""
    for name, value, (lo, hi), unit in (("n", n, N_RANGE, "images"), ("size", size, SIZE_RANGE, "pixels wide")):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise DatasetError(f"{name}={value!r} is invalid: use an integer from {lo} to {hi} ({unit}).")


def _check_destination(out: Path) -> Path:
    """The folder to build (a symlink's target); DatasetError unless it is new or empty and its place writable."""
    target = Path(os.path.realpath(out)) if out.is_symlink() else out
    if target.exists() and not target.is_dir():
        raise DatasetError(f"{display(out)} is a file, not a folder; pass a new folder (nothing was overwritten).")
    try:
        full = target.is_dir() and any(target.iterdir())
    except OSError as e:
        raise DatasetError(f"cannot look into {display(out)}: {e.strerror or e}; pass a new folder.") from None
    if full:
        raise DatasetError(f"{display(out)} already exists and is not empty; pass a new folder (nothing was "
                           "overwritten).")
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DatasetError(f"cannot write {display(out)}: {display(parent)} is a file, not a folder; pass a folder "
                           "path.")
    check_writable_dir(parent, f"the folder of {display(out)},")  # a real probe: root ignores permission bits
    return target


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[Path]:
    """``atomic_dir`` whose OS failures (full disk, a folder that refuses files) are one line, not a traceback."""
    try:
        with atomic_dir(target) as tmp:
            yield tmp
    except OSError as e:
        raise DatasetError(f"cannot write {display(target)}: {e.strerror or e}; choose a folder you can write to "
                           "(nothing was left behind).") from None


def make_synthetic_dataset(out_dir: str | Path, n: int, seed: int = 0, size: int = 64,
                           caption_format: str = "imagefolder", concept: Optional[str] = None,
                           concept_share: float = 0.5) -> Path:
    """Write ``n`` captioned shape images to ``out_dir`` and return its path.

    ``caption_format`` "imagefolder" writes ``metadata.jsonl`` (file_name, text); "txt" writes same-stem ``.txt``
    captions. The folder is built beside ``out_dir`` and renamed into place, so a crash never leaves half a dataset.
    ``concept`` / ``concept_share``: see ``draw_samples``.
    """
    out = Path(out_dir)
    _check_counts(n, size)
    _check_concept(concept, concept_share)
    if caption_format not in CAPTION_FORMATS:
        raise DatasetError(f"caption_format={caption_format!r} is invalid: use one of {CAPTION_FORMATS}.")
    with _writing(_check_destination(out)) as tmp:  # an existing `out` is empty (checked there)
        lines = []
        width = max(4, len(str(n - 1)))
        for i, (img, caption) in enumerate(draw_samples(n, seed, size, concept, concept_share)):
            name = f"img_{i:0{width}d}.png"
            (tmp / name).write_bytes(_png_bytes(img))
            if caption_format == "txt":
                (tmp / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            lines.append(json.dumps({"file_name": name, "text": caption}))
        if caption_format == "imagefolder":
            (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out

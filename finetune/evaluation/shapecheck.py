"""Caption following for the synthetic-shapes domain, measured from pixels with no model at all.

``finetune.data.synth`` captions every image with five attributes: "a {size} {colour} {shape} {position}, {background}
background". This checker reads the five back from an image and ``caption_scores`` reports, per attribute, the share
of images whose reading matches their caption: a prompt-adherence score for this domain that needs no CLIP weights,
so it works offline beside FID and KID.

How each attribute is read (64 px images; other sizes are resized):
- background: a plane (a linear gradient, as ``synth`` draws) fitted robustly to the border, its centre value
  matched to the nearest background colour;
- the shape's mask: pixels far from that plane (Otsu's threshold on the distance), opened and closed once;
- colour: the median colour of the mask's inside, matched to the nearest known colour (concept colours included, so
  a model that draws red when asked for pink scores as red);
- size: the radius of the fitted outline (below) against a threshold between the two sizes;
- position: the shape's centre (the deepest point of the mask, so a shape clipped by the image edge keeps its
  centre), matched to the nearest of the five positions;
- shape: the outline's distance from the centre at 90 angles, matched against the outlines of an ideal circle,
  square, triangle and star at every rotation (rays that leave the image are left out, so clipping does not count).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image

from finetune.data.synth import ALL_COLOURS, BACKGROUNDS, POSITIONS, SHAPES, SIZES, _polygon

ATTRIBUTES = ("colour", "shape", "size", "position", "background")
SIDE = 64
N_ANGLES = 90
# The drawn radius (from the outline fit) as a share of the image side, between the two sizes: on 1,500 synth images
# small ones read 0.137-0.197 and large ones 0.256-0.353 (synth draws 0.16 and 0.30, +-15%).
SIZE_THRESHOLD = 0.225
# "tiny" (synth's concept size, 0.08 +-15%): 600 images read 0.056-0.103, below the smallest small one (0.137)
TINY_THRESHOLD = 0.12
MIN_AREA = 0.006  # below this share of the image (25 px at 64 px) there is no shape to read
_WHERE = {"in the centre": "centre", "on the left": "left", "on the right": "right", "at the top": "top",
          "at the bottom": "bottom"}
_CAPTION = re.compile(r"^an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<where>in the centre|on the left|"
                      r"on the right|at the top|at the bottom), (?P<background>\w+) background\.?$")


@dataclass
class Scores:
    """Per attribute: how many images were judged, how many matched their caption, and the share."""

    judged: dict[str, int]
    matched: dict[str, int]

    @property
    def shares(self) -> dict[str, float]:
        return {a: (self.matched[a] / self.judged[a] if self.judged[a] else float("nan")) for a in ATTRIBUTES}

    def as_dict(self) -> dict[str, Any]:
        return {"shares": self.shares, "judged": self.judged, "matched": self.matched}

    def line(self) -> str:
        """One line a person reads: ``colour 0.95  shape 0.60 ...``."""
        return "  ".join(f"{a} {self.shares[a]:.2f}" for a in ATTRIBUTES if self.judged[a])


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a synthetic caption names; ``{}`` for a caption outside this domain."""
    m = _CAPTION.match(caption.strip().lower())
    if not m:
        return {}
    return {"size": m["size"], "colour": m["colour"], "shape": m["shape"], "position": _WHERE[m["where"]],
            "background": m["background"]}


def _nearest(value: np.ndarray, table: dict[str, Any]) -> str:
    names = sorted(table)
    dist = [float(np.sum((np.asarray(table[n], dtype=np.float64) - value) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


def _plane(arr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Least-squares plane per channel through the ``keep`` pixels, evaluated everywhere (H, W, 3)."""
    h, w, _ = arr.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(keep.sum()), xx[keep] / w - 0.5, yy[keep] / h - 0.5], axis=1)
    coef, *_ = np.linalg.lstsq(design, arr[keep], rcond=None)
    full = np.stack([np.ones(h * w), xx.ravel() / w - 0.5, yy.ravel() / h - 0.5], axis=1)
    return (full @ coef).reshape(h, w, 3)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _shift_max(mask: np.ndarray, pad_value: bool) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=pad_value)
    return np.max([p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3) for dx in range(3)], axis=0)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _shift_max(mask, False)


def _erode(mask: np.ndarray, edge_inside: bool = False) -> np.ndarray:
    """3x3 erosion; ``edge_inside`` treats the outside of the image as shape (a clipped shape keeps its depth)."""
    return ~_shift_max(~mask, not edge_inside)


def _foreground(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the shape, background plane) of an (H, W, 3) float image."""
    h, w, _ = arr.shape
    border = np.zeros((h, w), bool)
    border[:2, :], border[-2:, :], border[:, :2], border[:, -2:] = True, True, True, True
    keep = border.copy()
    for _ in range(3):  # refit without the border pixels the shape covers
        plane = _plane(arr, keep)
        res = np.linalg.norm(arr - plane, axis=2)
        keep = border & (res < max(30.0, 2.5 * float(np.median(res[border]))))
        if keep.sum() < 16:
            keep = border
    dist = np.linalg.norm(arr - plane, axis=2)
    mask = dist > max(40.0, _otsu(dist))
    mask = _erode(_dilate(mask))  # close small holes
    mask = _dilate(_erode(mask, edge_inside=True))  # drop speckle
    plane = _plane(arr, ~_dilate(mask)) if (~_dilate(mask)).sum() > 16 else plane
    return mask, plane


def _centre(mask: np.ndarray) -> tuple[float, float]:
    """The mean of the deepest pixels: erode (the image's outside counting as shape) until the next step empties."""
    core = mask
    while True:
        nxt = _erode(core, edge_inside=True)
        if not nxt.any():
            break
        core = nxt
    ys, xs = np.nonzero(core)
    return float(xs.mean()), float(ys.mean())


def _profile(mask: np.ndarray, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Outline radius at N_ANGLES angles from (cx, cy) and which of them are valid (the ray left the shape inside
    the image)."""
    h, w = mask.shape
    angles = np.arange(N_ANGLES) * 2 * math.pi / N_ANGLES
    radii = np.arange(0.0, 1.5 * max(h, w), 0.25)
    xs = cx + np.cos(angles)[:, None] * radii[None, :]
    ys = cy + np.sin(angles)[:, None] * radii[None, :]
    inside_img = (xs > -0.5) & (xs < w - 0.5) & (ys > -0.5) & (ys < h - 0.5)
    xi = np.clip(np.rint(xs).astype(int), 0, w - 1)
    yi = np.clip(np.rint(ys).astype(int), 0, h - 1)
    on = mask[yi, xi] & inside_img
    off = ~on
    off[:, 0] = False
    first_off = np.where(off.any(axis=1), off.argmax(axis=1), len(radii) - 1)
    r = radii[first_off]
    valid = inside_img[np.arange(N_ANGLES), first_off] & (r > 0)
    return r, valid


def _template_profiles() -> dict[str, np.ndarray]:
    """Outline radius of each ideal shape (unit size) at N_ANGLES angles, one row per rotation."""
    angles = np.arange(N_ANGLES) * 2 * math.pi / N_ANGLES
    out: dict[str, np.ndarray] = {"circle": np.ones((1, N_ANGLES))}
    specs = {"square": (4, math.pi / 4, 1.0, 1.2), "triangle": (3, -math.pi / 2, 1.0, 1.2),
             "star": (5, -math.pi / 2, 0.45, 1.3)}
    for name, (points, base_angle, inner, scale) in specs.items():
        period = 2 * math.pi / points
        rows = []
        for rot in np.arange(0, period, math.radians(2)):
            verts = np.array(_polygon(0.0, 0.0, scale, points, base_angle + rot, inner=inner))
            rows.append(_ray_polygon(verts, angles))
        out[name] = np.array(rows)
    return out


def _ray_polygon(verts: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Distance from the origin to the polygon's outline along each angle (the farthest crossing)."""
    d = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (A, 2)
    a, b = verts, np.roll(verts, -1, axis=0)  # edges a->b, (E, 2)
    e = b - a
    denom = d[:, None, 0] * e[None, :, 1] - d[:, None, 1] * e[None, :, 0]  # (A, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a[None, :, 0] * e[None, :, 1] - a[None, :, 1] * e[None, :, 0]) / denom  # ray parameter
        u = (a[None, :, 0] * d[:, None, 1] - a[None, :, 1] * d[:, None, 0]) / denom  # edge parameter
    hit = (t > 0) & (u >= -1e-9) & (u <= 1 + 1e-9) & np.isfinite(t)
    return np.where(hit, t, 0.0).max(axis=1)


_TEMPLATES: Optional[dict[str, np.ndarray]] = None


def _shape(r: np.ndarray, valid: np.ndarray) -> tuple[Optional[str], float]:
    """The ideal shape whose outline (best rotation and scale) fits the valid radii best, and that scale (the
    radius ``synth`` drew it with, in pixels)."""
    global _TEMPLATES
    if valid.sum() < N_ANGLES // 4:
        return None, 0.0
    if _TEMPLATES is None:
        _TEMPLATES = _template_profiles()
    rv = r[valid]
    best, best_err, best_scale = None, math.inf, 0.0
    for name, rows in _TEMPLATES.items():
        tv = rows[:, valid]
        s = (tv @ rv) / np.maximum((tv * tv).sum(axis=1), 1e-9)
        err = np.sqrt(((rv[None, :] - s[:, None] * tv) ** 2).mean(axis=1)) / np.maximum(s, 1e-9)
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err, best_scale = name, float(err[i]), float(s[i])
    return best, best_scale


def read_attributes(image: Image.Image) -> dict[str, Optional[str]]:
    """Read colour, shape, size, position and background from one image (None where there is nothing to read)."""
    img = image.convert("RGB")
    if img.size != (SIDE, SIDE):
        img = img.resize((SIDE, SIDE), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float64)
    mask, plane = _foreground(arr)
    out: dict[str, Optional[str]] = {"background": _nearest(plane[SIDE // 2, SIDE // 2], BACKGROUNDS),
                                     "colour": None, "shape": None, "size": None, "position": None}
    area = float(mask.mean())
    if area < MIN_AREA or area > 0.9:
        return out
    inner = _erode(mask)
    pixels = arr[inner] if inner.sum() >= 5 else arr[mask]
    out["colour"] = _nearest(np.median(pixels, axis=0), ALL_COLOURS)
    cx, cy = _centre(mask)
    out["position"] = _nearest(np.array([(cx + 0.5) / SIDE, (cy + 0.5) / SIDE]), POSITIONS)
    out["shape"], radius = _shape(*_profile(mask, cx, cy))
    if out["shape"] is None:  # too clipped for an outline: a circle's radius from the area
        radius = math.sqrt(area * SIDE * SIDE / math.pi)
    rel = radius / SIDE
    out["size"] = "large" if rel > SIZE_THRESHOLD else "small" if rel > TINY_THRESHOLD else "tiny"
    return out


def caption_scores(pairs: Iterable[tuple[Image.Image, str]], attributes: Iterable[str] = ATTRIBUTES) -> Scores:
    """Per attribute, the share of (image, caption) pairs whose image shows what the caption names.

    Captions outside the synthetic domain are not judged; an attribute the caption names with a word the checker
    does not know (a new shape) counts as a miss, never as a silent pass.
    """
    wanted = set(attributes)
    judged = {a: 0 for a in ATTRIBUTES}
    matched = {a: 0 for a in ATTRIBUTES}
    for image, caption in pairs:
        named = parse_caption(caption)
        if not named:
            continue
        read = read_attributes(image)
        for a in ATTRIBUTES:
            if a in wanted:
                judged[a] += 1
                matched[a] += int(read[a] == named[a])
    return Scores(judged, matched)


def chance_levels() -> dict[str, float]:
    """The share a model that ignores the caption would score on uniformly drawn captions (for reports)."""
    return {"colour": 1 / len(ALL_COLOURS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES),
            "position": 1 / len(POSITIONS), "background": 1 / len(BACKGROUNDS)}


def eval_captions(n: int, seed: int, concept: Optional[str] = None) -> list[str]:
    """A fixed set of ``n`` synthetic captions (with ``concept``: every one names the concept colour)."""
    from finetune.data.synth import draw_samples

    return [caption for _, caption in draw_samples(n, seed=seed, concept=concept, concept_share=1.0)]


def pipeline_images(pipe: Any, captions: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0,
                    size: int = SIDE, batch: int = 32) -> list[Image.Image]:
    """One image per (caption, seed) from a diffusers text-to-image pipeline, each from its own seeded generator
    (so an image does not depend on the batch it was made in)."""
    import torch

    images: list[Image.Image] = []
    for s in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s:s + batch]]
        images += pipe(captions[s:s + batch], num_inference_steps=steps, guidance_scale=guidance, height=size,
                       width=size, generator=gens).images
    return images

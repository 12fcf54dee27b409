"""Fuse a run's LoRA into the base weights, because no exporter knows about LoRA.

optimum exports plain diffusers modules; a peft LoRA layer would either fail to trace or be exported as two extra
matmuls per layer. So the adapter is merged (``fuse_lora``) into every component it touches (the UNet's attention,
convolutions and feed-forward layers, and the text encoders when they were trained: SDXL's ``text_encoder_2`` too),
then unloaded, and two checks make sure the result is the model that was trained: no LoRA layer or parameter is left anywhere in the pipeline, and the
fused pipeline draws the same images as the unfused one (same prompts, same seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from export.errors import FuseError

# The largest difference (0..1 pixel scale) between unfused and fused images that counts as "the same": merging
# W + BA in fp32 changes rounding only (measured about 3e-6 on the tiny base), far below one 8-bit level.
FUSE_TOLERANCE = 1.0 / 255.0
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


@dataclass
class FuseReport:
    """What the fusion did, for the export manifest."""

    adapters: dict[str, list[str]] = field(default_factory=dict)   # component -> adapter names before fusing
    fused_layers: dict[str, int] = field(default_factory=dict)     # component -> LoRA layers merged
    max_difference: float = 0.0                                    # unfused vs fused images, 0..1 scale
    images_compared: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": self.adapters, "fused_layers": self.fused_layers,
                "max_difference": self.max_difference, "images_compared": self.images_compared,
                "tolerance": FUSE_TOLERANCE}


def _modules(pipe: Any) -> dict[str, Any]:
    import torch

    return {name: getattr(pipe, name) for name in COMPONENTS + ("vae",)
            if isinstance(getattr(pipe, name, None), torch.nn.Module)}


def lora_layers(pipe: Any) -> list[str]:
    """Names of every LoRA layer or LoRA parameter left in the pipeline's modules (empty once fused)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    left = []
    for comp, module in _modules(pipe).items():
        for name, sub in module.named_modules():
            if isinstance(sub, BaseTunerLayer):
                left.append(f"{comp}.{name}")
        left += [f"{comp}.{n}" for n, _ in module.named_parameters() if "lora_" in n]
    return sorted(set(left))


def _count(pipe: Any) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts = {comp: sum(isinstance(m, BaseTunerLayer) for m in module.modules())
              for comp, module in _modules(pipe).items()}
    return {k: v for k, v in counts.items() if v}


def fuse_lora(pipe: Any) -> FuseReport:
    """Merge every loaded LoRA adapter into its component's weights and unload it; raise if any LoRA is left."""
    report = FuseReport(fused_layers=_count(pipe))
    if not report.fused_layers:
        raise FuseError("the pipeline has no LoRA layers to fuse; load the run's LoRA first "
                        "(RunFolder.load_pipeline(lora=True)).")
    try:
        report.adapters = {k: list(v) for k, v in pipe.get_list_adapters().items()}
    except Exception:  # noqa: BLE001 - adapters added with peft directly are not always listed
        report.adapters = {}
    components = [c for c in report.fused_layers if c != "vae"]
    pipe.fuse_lora(components=components, lora_scale=1.0, safe_fusing=True)  # NaN weights: refuse
    pipe.unload_lora_weights()
    left = lora_layers(pipe)
    if left:
        raise FuseError(f"fusing left {len(left)} LoRA layer(s), e.g. {left[0]}; this diffusers/peft pair cannot "
                        "merge that layer type: report it with the run's config.yaml.")
    return report


def generate(pipe: Any, cases: Sequence[tuple[str, int]], steps: int, size: int,
             guidance_scale: float) -> tuple[list[np.ndarray], list[float]]:
    """One float32 [H, W, 3] image in 0..1 per (prompt, seed), each from its own seeded generator, and its seconds.

    Works for the PyTorch pipeline and for optimum's ORT pipeline alike (both draw their initial latents from the
    torch generator), which is what makes their images comparable pixel by pixel.
    """
    import time
    import warnings

    import torch

    images, seconds = [], []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # optimum's ORT text encoder: "config attribute" deprecation
        for prompt, seed in cases:
            g = torch.Generator("cpu").manual_seed(int(seed))
            start = time.perf_counter()
            out = pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=guidance_scale,
                       generator=g, output_type="np")
            seconds.append(time.perf_counter() - start)
            images.append(np.asarray(out.images[0], dtype=np.float32))
    return images, seconds


def fuse_and_check(pipe: Any, cases: Sequence[tuple[str, int]], steps: int, size: int,
                   guidance_scale: float) -> tuple[FuseReport, list[np.ndarray], list[float]]:
    """Draw with the unfused LoRA, fuse, draw again and compare; return the report, the fused images and their times.

    The fused images are the PyTorch reference of the parity check that follows the export, so they are drawn once.
    """
    before, _ = generate(pipe, cases, steps, size, guidance_scale)
    report = fuse_lora(pipe)
    after, seconds = generate(pipe, cases, steps, size, guidance_scale)
    report.max_difference = float(max(np.abs(a - b).max() for a, b in zip(before, after)))
    report.images_compared = len(after)
    if report.max_difference > FUSE_TOLERANCE:
        raise FuseError(f"the fused pipeline draws different images from the unfused LoRA (largest pixel "
                        f"difference {report.max_difference * 255:.2f} of 255 > {FUSE_TOLERANCE * 255:.0f}); "
                        "the LoRA did not merge as trained: report it with the run's config.yaml.")
    return report, after, seconds

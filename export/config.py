"""The settings of ``sdloop export``: every flag and ``--set`` key, with its help and its range.

Like every config, it checks its declared types first (``sdloop.config_types.check_types``: ``steps=2.5`` or
``prompts=hello`` is one line naming the field, never a TypeError from a comparison), then its ranges; ``--set``
values come through the one parser (``sdloop.overrides``), so ``--set guidance_scale=5e-1`` is a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from export.errors import ExportError
from sdloop.config_types import build_dataclass, check_types, help_field

DEFAULT_PROMPTS = ("a red circle on a blue background", "a small green square, white background",
                   "a yellow star in the centre, black background")


_f = help_field  # a field with its help text


@dataclass
class ExportConfig:
    """Everything ``sdloop export`` can be told (flags map onto these fields; ``--set key=value`` reaches all)."""

    target: str = _f("cpu", "cpu, cuda or tensorrt: the onnxruntime execution provider the export is optimised for.")
    precision: Optional[str] = _f(None, "fp32 or int8 (cpu), fp16 or fp32 (cuda, tensorrt); default: the "
                                        "target's first.")
    prompts: list[str] = _f(list(DEFAULT_PROMPTS), "Prompts of the parity and fusion checks.")
    seeds: list[int] = _f([0], "Seeds of the parity check (one image per prompt and seed).")
    steps: int = _f(20, "Denoising steps of the parity and latency images.")
    size: int = _f(0, "Image side in pixels for the checks (0: the run's training resolution).")
    guidance_scale: float = _f(7.5, "Classifier-free guidance of the check images.")
    threads: int = _f(0, "onnxruntime intra-op and torch threads (0: every core this process may use).")
    external_data_mb: float = _f(1024.0, "Graphs whose weights reach this many MB keep them in model.onnx_data.")
    int8_images: int = _f(8, "Images per set for the int8 KID check (more: a tighter KID, a slower export).")
    int8_max_kid: float = _f(0.05, "Largest KID between fused PyTorch and int8 images that passes.")
    tolerances: dict = _f({}, "Override the precision's parity tolerances: max_pixel_difference (0..255), min_psnr "
                              "(dB), e.g. {min_psnr: 45}.")
    reps: int = _f(3, "Timed runs per graph when deciding whether an optimisation pays.")
    latency_images: int = _f(3, "At least this many timed images per pipeline for the latency figures (the check "
                                "images count; more of the first prompt are drawn if they are fewer).")
    keep: str = _f("measured", "measured: keep an optimisation only where it measures faster; all: keep every one.")
    opset: int = _f(0, "ONNX opset (0: optimum's default for the architecture).")

    def __post_init__(self) -> None:
        check_types(self, "")  # types first, so the range checks below only compare numbers with numbers
        from export.optimize import resolve_precision

        self.precision = resolve_precision(self.target, self.precision)

        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ExportError(f"{name}={getattr(self, name)!r} is invalid: {allowed}.")

        check(bool(self.prompts) and all(p.strip() for p in self.prompts), "prompts", "one or more non-empty prompts")
        check(bool(self.seeds) and all(0 <= s < 2**63 for s in self.seeds), "seeds",
              "one or more integer seeds in [0, 2**63)")
        check(1 <= self.steps <= 500, "steps", "an integer in [1, 500]")
        check(self.size == 0 or (64 <= self.size <= 2048 and self.size % 8 == 0), "size",
              "0 or a multiple of 8 in [64, 2048]")
        check(0 <= self.guidance_scale <= 50, "guidance_scale", "a number in [0, 50]")
        check(0 <= self.threads <= 1024, "threads", "an integer in [0, 1024]")
        check(0 < self.external_data_mb <= 1800, "external_data_mb",
              "a size in (0, 1800] MB (protobuf cannot hold a graph over 2 GB)")
        check(2 <= self.int8_images <= 1000, "int8_images", "an integer in [2, 1000]")
        check(self.int8_max_kid > 0, "int8_max_kid", "a positive number")
        check(set(self.tolerances) <= {"max_pixel_difference", "min_psnr"}
              and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                      for v in self.tolerances.values()), "tolerances",
              "a mapping of max_pixel_difference and/or min_psnr to numbers (or null: not checked)")
        check(1 <= self.reps <= 100, "reps", "an integer in [1, 100]")
        check(1 <= self.latency_images <= 100, "latency_images", "an integer in [1, 100]")
        check(self.keep in ("measured", "all"), "keep", "measured or all")
        check(self.opset == 0 or 14 <= self.opset <= 23, "opset", "0 or an opset in [14, 23]")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ExportConfig":
        """Build from a partial mapping (flags, ``--set``, a retraining's export_settings); unknown keys, wrong
        types and values out of range are each one line naming the key."""
        return build_dataclass(cls, values, prefix="")

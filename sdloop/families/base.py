"""``Family``: what one model family is, as data plus the few methods whose code differs between families.

The data (component folders, pipeline class names, kohya prefixes, native resolution) is plain and typed; the
methods that run models (``encode_ids``, ``unet_kwargs``) take the modules as arguments and keep no state, so one
frozen ``Family`` instance serves every stage and process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

Size2 = tuple[int, int]  # (height, width), the order SDXL's size conditioning uses


@dataclass
class TextConditioning:
    """What the UNet needs from the captions: cross-attention states and, for SDXL, the pooled embedding.

    ``hidden`` [B, L, D]; ``pooled`` [B, P] or None. ``tensors()`` / ``from_tensors`` are the cache file's names.
    """

    hidden: Any
    pooled: Optional[Any] = None

    def tensors(self) -> dict[str, Any]:
        out = {"hidden": self.hidden}
        if self.pooled is not None:
            out["pooled"] = self.pooled
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any]) -> "TextConditioning":
        return cls(hidden=tensors["hidden"], pooled=tensors.get("pooled"))

    @classmethod
    def stack(cls, items: Sequence["TextConditioning"]) -> "TextConditioning":
        """One batch from per-caption conditionings (each without a batch dimension)."""
        import torch

        pooled = [c.pooled for c in items]
        return cls(hidden=torch.stack([c.hidden for c in items]),
                   pooled=torch.stack(pooled) if all(p is not None for p in pooled) else None)

    def row(self, i: int) -> "TextConditioning":
        return TextConditioning(self.hidden[i], None if self.pooled is None else self.pooled[i])

    def to(self, device: Any = None, dtype: Any = None) -> "TextConditioning":
        return TextConditioning(self.hidden.to(device=device, dtype=dtype),
                                None if self.pooled is None else self.pooled.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class Family:
    """One model family. Subclasses override ``encode_ids`` and the added conditioning; the rest is data."""

    name: str                                  # sd1, sd2, sdxl: recorded in run and export manifests
    title: str                                 # for messages: "SD 1.x"
    pipeline_class_name: str                   # diffusers
    ort_pipeline_class_name: str               # optimum.onnxruntime
    text_encoders: tuple[str, ...]             # component folders, in the pipeline's order
    tokenizers: tuple[str, ...]
    text_encoder_classes: tuple[str, ...]      # transformers classes, one per text encoder
    prediction_type: str                       # the default of the family's bases
    native_resolution: int
    kohya_prefixes: Mapping[str, str] = field(default_factory=dict)  # LoRA component -> kohya key prefix
    kohya_model_version: str = "sd_v1"         # ss_base_model_version in kohya metadata
    lora_layout: str = "sd"                    # families with one layout take each other's LoRA files
    hub_example: str = ""

    # -- what a pipeline is made of --------------------------------------------------------------------------------
    def components(self) -> tuple[str, ...]:
        """The folders a pipeline (or an export of it) of this family must have."""
        return ("unet", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The modules a LoRA may adapt, which are also the diffusers LoRA file's key prefixes (``unet.``...)."""
        return ("unet", *self.text_encoders)

    def pipeline_class(self) -> Any:
        """The diffusers pipeline class (imported on first use)."""
        return getattr(importlib.import_module("diffusers"), self.pipeline_class_name)

    def ort_pipeline_class(self) -> Any:
        """optimum's onnxruntime pipeline class for this family (needs optimum[onnxruntime])."""
        return getattr(importlib.import_module("optimum.onnxruntime"), self.ort_pipeline_class_name)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What building the pipeline class from modules needs besides them (no safety checker, no watermark)."""
        return {}

    def text_encoder_class(self, index: int) -> Any:
        return getattr(importlib.import_module("transformers"), self.text_encoder_classes[index])

    # -- captions -> conditioning ----------------------------------------------------------------------------------
    def tokenize(self, tokenizers: Sequence[Any], captions: Sequence[str]) -> list[Any]:
        """Token ids [B, max_length] per tokenizer (padded, truncated), the text encoders' inputs."""
        return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers]

    def encode_ids(self, text_encoders: Sequence[Any], ids: Sequence[Any]) -> TextConditioning:
        """Conditioning from token ids, with gradients when the encoders are trained (the caller chooses no_grad)."""
        raise NotImplementedError

    def encode_prompts(self, pipe_or_components: Any, captions: Sequence[str]) -> TextConditioning:
        """Conditioning of ``captions`` (no gradients), from a pipeline or a ``load_components`` dict."""
        import torch

        encoders, tokenizers = self.text_modules(pipe_or_components)
        device = next(encoders[0].parameters()).device
        with torch.no_grad():
            ids = [i.to(device) for i in self.tokenize(tokenizers, captions)]
            return self.encode_ids(encoders, ids)

    def text_modules(self, pipe_or_components: Any) -> tuple[list[Any], list[Any]]:
        """(text encoders, tokenizers) of a pipeline or of a ``load_components`` dict."""
        if isinstance(pipe_or_components, Mapping):
            return list(pipe_or_components["text_encoders"]), list(pipe_or_components["tokenizers"])
        return ([getattr(pipe_or_components, n) for n in self.text_encoders],
                [getattr(pipe_or_components, n) for n in self.tokenizers])

    def text_shapes(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        """Shapes of one caption's cached conditioning tensors (by ``TextConditioning.tensors()`` name)."""
        raise NotImplementedError

    # -- the UNet's extra conditioning -----------------------------------------------------------------------------
    @property
    def uses_time_ids(self) -> bool:
        """Whether the UNet takes size/crop conditioning (SDXL's ``add_time_ids``)."""
        return False

    def time_ids(self, original_size: Size2, crop_top_left: Size2, target_size: Size2) -> Optional[Any]:
        """The size/crop conditioning of one sample ([6] float32) or None when the family has none."""
        return None

    def added_cond(self, cond: TextConditioning, time_ids: Optional[Any]) -> Optional[dict[str, Any]]:
        """The UNet's ``added_cond_kwargs`` (None when the family has none)."""
        return None

    def unet_kwargs(self, cond: TextConditioning, time_ids: Optional[Any] = None) -> dict[str, Any]:
        """Keyword arguments of ``unet(noisy, timesteps, **kwargs)`` for one batch."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond.hidden}
        added = self.added_cond(cond, time_ids)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    # -- LoRA files ------------------------------------------------------------------------------------------------
    def kohya_prefix(self, component: str) -> str:
        try:
            return self.kohya_prefixes[component]
        except KeyError:
            raise ValueError(f"{self.name} has no LoRA component {component!r}; it has "
                             f"{', '.join(self.lora_components)}.") from None

"""SDXL: two CLIP text encoders and size/crop conditioning.

As ``StableDiffusionXLPipeline.encode_prompt`` does it: each encoder's penultimate hidden state, concatenated along
the feature axis, is the cross-attention conditioning; the second encoder (``CLIPTextModelWithProjection``) adds
its projected pooled output (``text_embeds``). The UNet (``addition_embed_type="text_time"``) also takes
``add_time_ids`` = (original height, width, crop top, left, target height, width) per sample, which is how SDXL
learns not to draw the crops and upscales it was trained on: the trainer feeds each sample's real values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sdloop.families.base import Family, Size2, TextConditioning


@dataclass(frozen=True)
class SDXLFamily(Family):
    """SDXL: ``unet(noisy, t, encoder_hidden_states=..., added_cond_kwargs={text_embeds, time_ids})``."""

    def encode_ids(self, text_encoders: Sequence[Any], ids: Sequence[Any]) -> TextConditioning:
        import torch

        hidden, pooled = [], None
        for encoder, token_ids in zip(text_encoders, ids):
            out = encoder(token_ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first; the pipeline keeps the last one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) for the "
                             "pooled embedding; the second text encoder has none.")
        return TextConditioning(hidden=torch.cat(hidden, dim=-1), pooled=pooled)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    def text_shapes(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        width = sum(int(e.config.hidden_size) for e in text_encoders)
        return {"hidden": (int(tokenizers[0].model_max_length), width),
                "pooled": (int(text_encoders[-1].config.projection_dim),)}

    @property
    def uses_time_ids(self) -> bool:
        return True

    def time_ids(self, original_size: Size2, crop_top_left: Size2, target_size: Size2) -> Optional[Any]:
        import torch

        values = [*original_size, *crop_top_left, *target_size]
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    def added_cond(self, cond: TextConditioning, time_ids: Optional[Any]) -> Optional[dict[str, Any]]:
        if cond.pooled is None or time_ids is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding and the size/crop time ids.")
        return {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.pooled.device, cond.pooled.dtype)}


SDXL = SDXLFamily(
    name="sdxl", title="SDXL", pipeline_class_name="StableDiffusionXLPipeline",
    ort_pipeline_class_name="ORTStableDiffusionXLPipeline", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"), text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    prediction_type="epsilon", native_resolution=1024,
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    kohya_model_version="sdxl_base_v1-0", lora_layout="sdxl", hub_example="stabilityai/stable-diffusion-xl-base-1.0")

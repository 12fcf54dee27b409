"""SD 1.x and SD 2.x: one CLIP text encoder whose last hidden state is the cross-attention conditioning.

The two share their architecture and LoRA layout; SD 2.x bases (768 px) predict the velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sdloop.families.base import Family, TextConditioning


@dataclass(frozen=True)
class SDFamily(Family):
    """SD 1.x / 2.x: ``unet(noisy, t, encoder_hidden_states=last_hidden_state)``, nothing else."""

    def encode_ids(self, text_encoders: Sequence[Any], ids: Sequence[Any]) -> TextConditioning:
        return TextConditioning(hidden=text_encoders[0](ids[0])[0])

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def text_shapes(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        return {"hidden": (int(tokenizers[0].model_max_length), int(text_encoders[0].config.hidden_size))}


_COMMON = dict(pipeline_class_name="StableDiffusionPipeline", ort_pipeline_class_name="ORTStableDiffusionPipeline",
               text_encoders=("text_encoder",), tokenizers=("tokenizer",), text_encoder_classes=("CLIPTextModel",),
               kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"}, lora_layout="sd")

SD1 = SDFamily(name="sd1", title="SD 1.x", prediction_type="epsilon", native_resolution=512,
               kohya_model_version="sd_v1", hub_example="stable-diffusion-v1-5/stable-diffusion-v1-5", **_COMMON)
SD2 = SDFamily(name="sd2", title="SD 2.x", prediction_type="v_prediction", native_resolution=768,
               kohya_model_version="sd_v2", hub_example="stabilityai/stable-diffusion-2-1", **_COMMON)

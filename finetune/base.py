"""Base pipelines: the tiny offline SD-1.x base every test and the demo use, and one loader for every stage.

The tiny base has the real SD-1.x architecture (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
encoder and tokenizer, DDPM scheduler) at a size that trains on two CPU cores. Its tokenizer vocabulary is written
here, byte-level characters and their end-of-word forms, so nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sdloop.atomic import atomic_dir
from sdloop.pipelines import BaseModelError

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _byte_chars() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for raw bytes (GPT-2's byte-to-unicode table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(out_dir: Path, max_length: int = 77) -> None:
    """Write a CLIPTokenizer (vocab.json, merges.txt, configs) whose vocabulary is bytes and their ``</w>`` forms.

    With no merges, every word is split into characters; that is enough for a model that learns from scratch and
    keeps the real tokenizer class, padding and truncation behaviour.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True, "errors": "replace"}))


def build_tiny_pipeline(seed: int = 0) -> Any:
    """Build the tiny SD-1.x pipeline in memory, with random weights drawn from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=16, sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=514, max_position_embeddings=77,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_tiny_base(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny base as a diffusers folder, atomically (a temp folder renamed into place)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BaseModelError(f"{out} already exists and is not empty; choose another folder or pass --overwrite.")
    pipe = build_tiny_pipeline(seed)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sdloop_base.json").write_text(json.dumps({"kind": "tiny-sd1", "seed": seed}))
    return out

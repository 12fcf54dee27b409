"""Base pipelines: the tiny offline SD-1.x bases (random weights for fast tests; the shipped drawing base, pretrained
on synthetic shapes, for the demo and wherever images must mean something) and the tiny random SDXL base.

The tiny base has the real SD-1.x architecture (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
encoder and tokenizer, DDPM scheduler) at a size that trains on two CPU cores. Its tokenizer vocabulary is written
here, byte-level characters and their end-of-word forms, so nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdloop.atomic import atomic_dir, check_writable_dir
from sdloop.errors import UserError
from sdloop.pipelines import BaseModelError

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FAMILIES = ("sd1", "sdxl")  # the tiny bases: SD 1.x (random or drawing) and SDXL (random)
MARKER = "sdloop_base.json"  # in every base sdloop writes: the only folders --overwrite may replace
DRAWING_NAME = "tiny-drawing"
WEIGHTS = ("drawing", "random")


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


def build_tiny_pipeline(seed: int = 0, vae_downsamplings: int = 3) -> Any:
    """Build the tiny SD-1.x pipeline in memory, with random weights drawn from ``seed``.

    ``vae_downsamplings`` 3 (the default, as in SD) gives 8x8 latents at 64 px; 2 gives 16x16 latents, which keep
    the corners and points of small shapes (the drawing base uses it, see finetune/pretraining/pretrain.py).
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if vae_downsamplings not in (2, 3):
        raise ValueError(f"vae_downsamplings={vae_downsamplings}: the tiny base has 2 or 3.")
    vae_channels = (16, 16, 32, 32) if vae_downsamplings == 3 else (16, 32, 32)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64 // 2 ** vae_downsamplings, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), block_out_channels=vae_channels, latent_channels=4,
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


def build_tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """Build a tiny SDXL pipeline in memory, random weights drawn from ``seed``; stock
    ``StableDiffusionXLPipeline.from_pretrained`` loads what ``save_pretrained`` writes of it.

    The UNet has the SD-1.x tiny base's block layout (so the benchmark compares the families' costs, not their
    sizes), with SDXL's conditioning: cross-attention over both encoders' states concatenated (32 + 32), and
    ``addition_embed_type="text_time"`` taking the pooled embedding of the second encoder (projection_dim 32) plus
    six size/crop numbers of ``addition_time_embed_dim`` 8 each (``projection_class_embeddings_input_dim`` 6*8+32).
    The scheduler is SDXL's (Euler, scaled-linear betas); the VAE and tokenizers are the SD-1.x tiny base's.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    width, projection, time_dim = 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * width, attention_head_dim=4, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    torch.manual_seed(seed + 1)
    vae_channels = (16, 16, 32, 32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), block_out_channels=vae_channels, latent_channels=4,
        layers_per_block=1, norm_num_groups=16, sample_size=64,
    )
    encoders = []
    for i, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        torch.manual_seed(seed + 2 + i)
        encoders.append(cls(CLIPTextConfig(
            bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=width, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=514,
            max_position_embeddings=77, projection_dim=projection, hidden_act="gelu")))
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def is_sdloop_base(path: Path) -> bool:
    """True when ``path`` is a base folder sdloop wrote (its ``sdloop_base.json`` marker names a tiny base)."""
    try:
        return str(json.loads((Path(path) / MARKER).read_text()).get("kind", "")).startswith("tiny-sd")
    except (OSError, ValueError, AttributeError):
        return False


def check_base_target(out_dir: str | Path, overwrite: bool) -> Path:
    """Where a base may be written: a new or empty folder, or (with ``overwrite``) a base sdloop wrote itself.

    A file, a folder of the user's (no marker), the current folder or one above it, or an unwritable parent is a
    BaseModelError that says what to do; nothing is touched before this check passes.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise BaseModelError(f"{out} is a file; pass the path of a new folder for the base.")
    if out.is_dir() and any(out.iterdir()):
        ours = is_sdloop_base(out)
        if not overwrite or not ours:
            remedy = "pass --overwrite to replace it" if ours else \
                "choose another folder (--overwrite replaces only a base sdloop wrote, with sdloop_base.json)"
            raise BaseModelError(f"{out} already exists and is not empty; {remedy}. Nothing was changed.")
        cwd = Path.cwd().resolve()
        if out.resolve() == cwd or out.resolve() in cwd.parents:
            raise BaseModelError(f"{out} is the current folder or holds it; run the command from elsewhere or "
                                 "choose another folder. Nothing was changed.")
    try:
        check_writable_dir(out.parent, "the parent folder")
    except UserError as e:
        raise BaseModelError(str(e)) from None
    return out


def write_tiny_base(out_dir: str | Path, seed: int = 0, overwrite: bool = False, family: str = "sd1") -> Path:
    """Write the tiny base of ``family`` (sd1 or sdxl) with random weights as a diffusers folder, atomically (a
    temp folder renamed into place). The fastest bases: tests that only need the machinery use them."""
    if family not in FAMILIES:
        raise BaseModelError(f"family={family!r}: the tiny base comes in {', '.join(FAMILIES)}.")
    out = check_base_target(out_dir, overwrite)
    pipe = build_tiny_sdxl_pipeline(seed) if family == "sdxl" else build_tiny_pipeline(seed)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({"kind": f"tiny-{family}", "seed": seed}))
    return out


def drawing_asset() -> Path:
    """The drawing base shipped inside the package (safetensors + JSON configs + tokenizer files)."""
    return Path(__file__).resolve().parent / "assets" / DRAWING_NAME


def write_drawing_base(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Copy the shipped drawing base (pretrained on synthetic shapes by finetune/pretraining/pretrain.py) into ``out_dir``.

    Files are copied without their package permissions, so they honour the umask like every file sdloop writes.
    """
    src = drawing_asset()
    if not (src / "model_index.json").is_file() or not (src / MARKER).is_file():
        raise BaseModelError(f"the drawing base is missing from this installation ({src}); reinstall sdloop, "
                             "or write the random one with --weights random.")
    out = check_base_target(out_dir, overwrite)
    with atomic_dir(out) as tmp:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if f.is_dir() or any(part.startswith((".", "__")) for part in rel.parts):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp / rel)
    return out


def write_base(out_dir: str | Path, weights: str = "drawing", seed: int = 0, overwrite: bool = False,
               family: str = "sd1") -> Path:
    """``weights`` "drawing": the shipped pretrained base (SD 1.x only); "random": random weights from ``seed``
    in ``family`` (sd1 or sdxl)."""
    if family not in FAMILIES:
        raise BaseModelError(f"--family {family}: the tiny base comes in {', '.join(FAMILIES)}.")
    if weights == "drawing":
        if family != "sd1":
            raise BaseModelError(f"the drawing base is SD 1.x only; for --family {family} pass --weights random.")
        return write_drawing_base(out_dir, overwrite)
    if weights == "random":
        return write_tiny_base(out_dir, seed, overwrite, family)
    raise BaseModelError(f"weights={weights!r} is unknown: use one of {WEIGHTS}.")

"""Base pipelines: the tiny offline SD-1.x base every test and the demo use, and one loader for every stage.

The tiny base has the real SD-1.x architecture (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
encoder and tokenizer, DDPM scheduler) at a size that trains on two CPU cores. Its tokenizer vocabulary is written
here, byte-level characters and their end-of-word forms, so nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_dir

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class BaseModelError(RuntimeError):
    """The base pipeline cannot be found or is not a diffusers pipeline; the message says what to do."""


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


@dataclass
class BaseInfo:
    """What a stage needs to know about a base pipeline without loading its weights."""

    source: str
    local_dir: Optional[Path]
    fingerprint: str
    pipeline_class: str
    prediction_type: str


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def resolve_base(source: str) -> Path:
    """Return a local diffusers folder for ``source`` (a path, or a hub id downloaded to the HF cache).

    Raises BaseModelError with a remedy when the folder is not a diffusers pipeline or the id cannot be reached.
    """
    if not source:
        raise BaseModelError("no base model given; pass --base DIR (make one offline with `sdloop base tiny DIR`).")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BaseModelError(f"{path} is a file; --base takes a diffusers folder (with model_index.json). "
                                 "Single-file checkpoints: convert them with diffusers' from_single_file first.")
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is not a diffusers pipeline folder: model_index.json is missing. "
                                 "Make one with `sdloop base tiny DIR` or download one with "
                                 "`huggingface-cli download ID --local-dir DIR`.")
        return path
    if not _looks_like_hub_id(source):
        raise BaseModelError(f"{source} does not exist. Pass a diffusers folder (make an offline one with "
                             "`sdloop base tiny DIR`) or a hub id such as "
                             "'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                  ignore_patterns=["*.fp16.safetensors", "*ema*", "*.non_ema.*"])
    except Exception as e:  # network down, offline mode, unknown repo, gated repo
        raise BaseModelError(
            f"cannot fetch the base model {source!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Check the id and your network (HF_HUB_OFFLINE must be unset), or pass a local diffusers folder."
        ) from None
    return Path(local)


def base_info(source: str) -> BaseInfo:
    """Read model_index.json and the scheduler config; fingerprint the weights by name, size and mtime-free hash."""
    local = resolve_base(source)
    index = json.loads((local / "model_index.json").read_text())
    sched_cfg = local / "scheduler" / "scheduler_config.json"
    prediction_type = "epsilon"
    if sched_cfg.is_file():
        prediction_type = json.loads(sched_cfg.read_text()).get("prediction_type", "epsilon")
    return BaseInfo(source=source, local_dir=local, fingerprint=fingerprint_dir(local),
                    pipeline_class=index.get("_class_name", "?"), prediction_type=prediction_type)


def fingerprint_dir(path: Path) -> str:
    """A stable fingerprint of a model folder: the hash of its config files' bytes and its weights' names+sizes.

    Hashing multi-GB weights would cost minutes; config bytes plus weight sizes plus each safetensors header (which
    holds the tensor layout) identify a model well enough to key caches.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith("."):
            continue
        h.update(rel.encode())
        if f.suffix in (".json", ".txt", ".model"):
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(fh.read(min(n, 10_000_000)))
                # the header alone does not change when weights are re-drawn: sample the tensor bytes too
                for frac in (0.1, 0.5, 0.9):
                    fh.seek(int(8 + n + (size - 8 - n) * frac))
                    h.update(fh.read(4096))
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def load_pipeline(source: str, torch_dtype: Any = None, device: Optional[str] = None) -> Any:
    """Load a diffusers pipeline from a folder or hub id with the pipeline class its model_index.json names."""
    from diffusers import DiffusionPipeline

    local = resolve_base(source)
    index = json.loads((local / "model_index.json").read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(local, torch_dtype=torch_dtype, local_files_only=True, **extra)
    except Exception as e:
        raise BaseModelError(f"{local} could not be loaded as a diffusers pipeline "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    if device:
        pipe = pipe.to(device)
    return pipe


def load_components(source: str, torch_dtype: Any = None) -> dict[str, Any]:
    """Load the parts a trainer needs (UNet, VAE, text encoders, tokenizers, noise scheduler) without the pipeline.

    Text encoders and tokenizers come back as lists, so SDXL's two encoders fit the same code later.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    local = resolve_base(source)
    index = json.loads((local / "model_index.json").read_text())
    try:
        unet = UNet2DConditionModel.from_pretrained(local, subfolder="unet", torch_dtype=torch_dtype,
                                                    local_files_only=True)
        vae = AutoencoderKL.from_pretrained(local, subfolder="vae", torch_dtype=torch_dtype, local_files_only=True)
        encoders, tokenizers = [], []
        for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if enc_name not in index or index[enc_name][0] is None:
                continue
            encoders.append(CLIPTextModel.from_pretrained(local, subfolder=enc_name, local_files_only=True,
                                                          **({"dtype": torch_dtype} if torch_dtype else {})))
            tokenizers.append(AutoTokenizer.from_pretrained(local, subfolder=tok_name, local_files_only=True,
                                                            use_fast=False))
        noise_scheduler = DDPMScheduler.from_pretrained(local, subfolder="scheduler", local_files_only=True)
    except Exception as e:
        raise BaseModelError(f"{local} could not be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); is it a complete SD pipeline?") from None
    if not encoders:
        raise BaseModelError(f"{local} has no text_encoder; sdloop trains text-conditioned SD pipelines.")
    if len(encoders) > 1:
        raise BaseModelError(f"{local} has two text encoders (SDXL); SDXL training is not supported yet.")
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers,
            "noise_scheduler": noise_scheduler, "local_dir": local}

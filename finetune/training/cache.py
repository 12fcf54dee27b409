"""Latent and text-embedding caches: the VAE and the text encoder run once per sample instead of once per step.

Layout under the cache root (default ``$SDLOOP_HOME/cache``)::

    latents/<key>.safetensors   one per image: "v0".."v{K-1}" (augmented variants, built by a training feed)
                                and/or "val" (centre crop, built by a validation feed), each [C, h/f, w/f]
                                float32 = VAE posterior mean * scaling_factor
                                SDXL bases (``Family.uses_time_ids``) add "<name>.time_ids" [6] beside each
                                variant: its original size, crop corner and target size (SDXL's add_time_ids)
    text/<key>.safetensors      one per caption string: "hidden" [max_length, D] float32, and for SDXL
                                "pooled" [P] (the second encoder's projected embedding); D spans both encoders

A key hashes everything its tensors depend on (image bytes, base model, bucket, resolution, image augmentation
settings, encoder dtype, format version), so a changed input gets a new file and an unchanged one is reused; stale
files are never overwritten in place. Files are written to a temporary name in the same folder and renamed with
``os.replace``, so an interrupted build leaves either the old state or the complete file, never half of one; an
unreadable file found later (truncated, foreign) is rebuilt rather than trusted.

The functions that turn an item into pixels, latents and text embeddings live here and are shared with the live
(uncached) path of ``finetune.training.feed``, so cached and live batches are the same samples.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from sdloop import workspace
from sdloop.atomic import DamagedFileError, load_safetensors, safetensors_shapes, save_safetensors
from sdloop.errors import UserError
from sdloop.families import SD1, Family, TextConditioning

from finetune.data.augment import (CropGeometry, Size, augment_image_geometry, caption_variant, image_to_tensor,
                                   seeded_rng)
from finetune.training.config import AugmentConfig

CACHE_FORMAT_VERSION = 2  # 2: augmentation draws from sdloop.seeding
ENCODE_BATCH = 8  # images per VAE call; text encoder calls take 4x as many captions
Variant = Union[int, str]  # 0..K-1 for augmented variants, "val" for the validation centre crop


class CacheError(UserError):
    """A cache cannot be built (unreadable image, unwritable folder); the message names the file."""


@dataclass
class CacheStats:
    """What a cache build did: files built and reused (latents + text), and the bytes the caches occupy."""

    built: int = 0
    reused: int = 0
    bytes: int = 0
    latents_built: int = 0
    latents_reused: int = 0
    text_built: int = 0
    text_reused: int = 0
    seconds: float = 0.0

    def add(self, other: "CacheStats") -> "CacheStats":
        """Sum of two stats (e.g. the latent and the text cache)."""
        return CacheStats(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})


def default_cache_root() -> Path:
    return workspace.cache_dir()


# -- keys ----------------------------------------------------------------------------------------------------------

def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def latent_key(item_sha256: str, base_fingerprint: str, bucket: Size, resolution: int, aug: AugmentConfig,
               dtype: str = "torch.float32") -> str:
    """Key of one image's latent file; any change of an input gives a new key (and so a rebuild)."""
    return _digest({"kind": "latents", "image": item_sha256, "base": base_fingerprint,
                    "bucket": [int(bucket[0]), int(bucket[1])], "resolution": int(resolution),
                    "augment": aug.image_settings(), "dtype": dtype, "version": CACHE_FORMAT_VERSION})


def text_key(caption: str, base_fingerprint: str, dtype: str = "torch.float32") -> str:
    """Key of one caption's embedding file (shared by every item with that exact caption text)."""
    return _digest({"kind": "text", "caption": caption, "base": base_fingerprint, "dtype": dtype,
                    "version": CACHE_FORMAT_VERSION})


def latent_path(root: Path, key: str) -> Path:
    return Path(root) / "latents" / f"{key}.safetensors"


def text_path(root: Path, key: str) -> Path:
    return Path(root) / "text" / f"{key}.safetensors"


def variant_names(variants: int) -> list[str]:
    """Tensor names in a latent file: "v0".."v{K-1}" then "val"."""
    return [f"v{v}" for v in range(variants)] + ["val"]


# -- samples: shared by the cache build and the live path ----------------------------------------------------------

def load_item_image(data_root: Path, item: Any) -> Any:
    """The item's RGB, EXIF-oriented image via ``finetune.data.check.load_image``, with the file named on failure."""
    from finetune.data.check import load_image

    try:
        return load_image(data_root, item)
    except Exception as e:
        raise CacheError(f"cannot read image {item.path!r} under {data_root}: {type(e).__name__}: {e}") from e


def variant_image(img: Any, bucket: Size, aug: AugmentConfig, item_sha256: str, variant: Variant) -> Any:
    """Variant ``v`` of an image: augmented with rng(aug.seed, sha, v); "val" is the plain centre crop."""
    return variant_image_geometry(img, bucket, aug, item_sha256, variant)[0]


def variant_image_geometry(img: Any, bucket: Size, aug: AugmentConfig, item_sha256: str, variant: Variant
                           ) -> tuple[Any, CropGeometry]:
    """``variant_image`` with where its crop came from (original size, crop corner): SDXL's size conditioning."""
    rng = seeded_rng(aug.seed, item_sha256, variant, "image")
    return augment_image_geometry(img, bucket, aug, rng, augment=variant != "val")


def sample_time_ids(family: Family, geometry: CropGeometry, bucket: Size) -> Any:
    """The family's size/crop conditioning of one sample (None for families without one); target = the bucket."""
    return family.time_ids(geometry.original_size, geometry.crop_top_left, (int(bucket[1]), int(bucket[0])))


def variant_caption(caption: str, aug: AugmentConfig, item_sha256: str, variant: Variant) -> str:
    """Caption of variant ``v`` (tags shuffled with rng(aug.seed, sha, v)); "val" keeps the caption as written."""
    if variant == "val":
        return caption
    return caption_variant(caption, aug, seeded_rng(aug.seed, item_sha256, variant, "caption"))


def module_device_dtype(module: Any) -> tuple[Any, Any]:
    p = next(module.parameters())
    return p.device, p.dtype


def encode_latents(vae: Any, pixels: Any) -> Any:
    """VAE posterior mean times the scaling factor (minus the shift factor where a VAE has one), float32.

    The mean rather than a sample keeps cached and live latents identical and deterministic; the sampling
    noise it leaves out is negligible against the diffusion noise added at train time.
    """
    import torch

    device, dtype = module_device_dtype(vae)
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    outs = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], ENCODE_BATCH):
            x = pixels[start:start + ENCODE_BATCH].to(device=device, dtype=dtype)
            mean = vae.encode(x).latent_dist.mean
            if shift is not None:
                mean = mean - float(shift)
            outs.append((mean * scale).float())
    return torch.cat(outs)


def tokenize(tokenizer: Any, captions: Sequence[str]) -> Any:
    """Token ids [B, model_max_length] (padded, truncated), the text encoder's input."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(text_encoder: Any, tokenizer: Any, captions: Sequence[str]) -> Any:
    """Last hidden states [B, max_length, D] float32, the UNet's cross-attention conditioning."""
    import torch

    device, _ = module_device_dtype(text_encoder)
    ids = tokenize(tokenizer, captions)
    outs = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], ENCODE_BATCH * 4):
            outs.append(text_encoder(ids[start:start + ENCODE_BATCH * 4].to(device))[0].float())
    return torch.cat(outs)


def encode_conditioning(family: Family, text_encoders: Sequence[Any], tokenizers: Sequence[Any],
                        captions: Sequence[str]) -> TextConditioning:
    """The family's text conditioning of ``captions`` (float32, no gradients), in chunks of 4 * ENCODE_BATCH.

    SD 1.x/2.x: the encoder's last hidden state (as ``encode_text``); SDXL: both encoders' penultimate states
    concatenated and the pooled embedding, as ``StableDiffusionXLPipeline.encode_prompt`` computes them.
    """
    import torch

    device, _ = module_device_dtype(text_encoders[0])
    ids = family.tokenize(tokenizers, captions)
    parts = []
    with torch.no_grad():
        for start in range(0, ids[0].shape[0], ENCODE_BATCH * 4):
            chunk = [i[start:start + ENCODE_BATCH * 4].to(device) for i in ids]
            cond = family.encode_ids(text_encoders, chunk)
            parts.append(TextConditioning(cond.hidden.float(), None if cond.pooled is None else cond.pooled.float()))
    return TextConditioning(torch.cat([p.hidden for p in parts]),
                            torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None)


def latent_shape(vae: Any, bucket: Size) -> tuple[int, int, int]:
    """[C, h/f, w/f] of one latent for a bucket (f = 2 ** (number of VAE blocks - 1), 8 for SD)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.latent_channels), bucket[1] // factor, bucket[0] // factor)


# -- files ---------------------------------------------------------------------------------------------------------

def read_tensors(path: Path, names: Iterable[str], shapes: Optional[dict[str, tuple[int, ...]]] = None
                 ) -> Optional[dict[str, Any]]:
    """The named tensors of a safetensors file, or None when it is missing, unreadable or lacks/misshapes one."""
    names = list(names)
    try:
        tensors = load_safetensors(path, names)[0]
    except DamagedFileError:  # missing, truncated, not safetensors: the caller rebuilds
        return None
    if shapes is not None and any(tuple(tensors[n].shape) != tuple(shapes[n]) for n in names):
        return None
    return tensors


def is_valid(path: Path, names: Iterable[str], shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the file holds every named tensor with its shape, checked from the header (no tensor read)."""
    found = safetensors_shapes(path)
    return found is not None and all(found.get(n) == tuple(shapes[n]) for n in names)


def write_tensors_atomic(path: Path, tensors: dict[str, Any], metadata: Optional[dict[str, str]] = None) -> int:
    """Write a safetensors file atomically (a torn file after a power cut is detected and rebuilt: no fsync)."""
    try:
        return save_safetensors(path, tensors, metadata, fsync=False)
    except OSError as e:
        raise CacheError(f"cannot write cache file {path}: {e}") from e


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm  # writes to stderr, with rate and ETA

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled or total == 0, leave=False,
                dynamic_ncols=True)


# -- builds --------------------------------------------------------------------------------------------------------

def time_ids_name(name: str) -> str:
    """The tensor beside variant ``name`` that holds its size/crop conditioning (families that use one)."""
    return f"{name}.time_ids"


def build_latent_cache(items: Sequence[Any], buckets: Sequence[Size], data_root: Path, resolution: int,
                       aug: AugmentConfig, vae: Any, base_fingerprint: str, cache_root: Path,
                       progress: bool = True, names: Optional[Sequence[str]] = None,
                       family: Family = SD1) -> CacheStats:
    """Encode the named variants of every item once ("v0".."v{K-1}" and "val" unless ``names`` narrows them).

    A file whose key matches and which holds every needed tensor is reused. One that holds only some of them (a
    train feed's file, later read as validation after a new split) keeps those and gets the missing ones encoded
    and merged in, so the training feed never pays for the validation crop and vice versa. For a family with
    size/crop conditioning (SDXL) each variant's time ids are stored beside it ("v0.time_ids", ...).
    """
    import torch

    t0 = time.perf_counter()
    every = variant_names(aug.variants)
    names = list(names) if names is not None else every
    unknown = set(names) - set(every)
    if unknown:
        raise ValueError(f"unknown latent variant(s) {sorted(unknown)}; expected some of {every}.")
    dtype = str(module_device_dtype(vae)[1])
    with_ids = family.uses_time_ids
    stats = CacheStats()
    todo: dict[Size, list[tuple[Any, Path, dict[str, Any], list[str]]]] = {}
    seen: set[Path] = set()
    for item, bucket in zip(items, buckets):
        path = latent_path(cache_root, latent_key(item.sha256, base_fingerprint, bucket, resolution, aug, dtype))
        if path in seen:  # byte-identical duplicates share one file
            continue
        seen.add(path)
        shapes = _variant_shapes(every, latent_shape(vae, bucket), with_ids)
        needed = [t for n in names for t in ((n, time_ids_name(n)) if with_ids else (n,))]
        if is_valid(path, needed, shapes):
            stats.latents_reused += 1
            stats.bytes += path.stat().st_size
            continue
        kept = _readable_variants(path, every, shapes, with_ids)
        todo.setdefault(tuple(bucket), []).append((item, path, kept, [n for n in names if n not in kept]))

    bar = _progress(sum(len(v) for v in todo.values()), "caching latents", progress)
    try:
        for bucket, jobs in todo.items():
            # about ENCODE_BATCH images per VAE call: whole items, as many as fit
            chunks: list[list[tuple[Any, Path, dict[str, Any], list[str]]]] = [[]]
            for job in jobs:
                if chunks[-1] and sum(len(j[3]) for j in chunks[-1]) + len(job[3]) > ENCODE_BATCH:
                    chunks.append([])
                chunks[-1].append(job)
            for chunk in chunks:
                pixels, time_ids = [], {}
                for item, path, _, missing in chunk:
                    img = load_item_image(data_root, item)
                    for n in missing:
                        image, geometry = variant_image_geometry(img, bucket, aug, item.sha256, _variant(n))
                        pixels.append(image_to_tensor(image))
                        if with_ids:
                            time_ids[(path, time_ids_name(n))] = sample_time_ids(family, geometry, bucket)
                latents = iter(encode_latents(vae, torch.stack(pixels)))
                for item, path, kept, missing in chunk:
                    tensors = {**kept, **{n: next(latents) for n in missing}}
                    tensors.update({t: v for (p, t), v in time_ids.items() if p == path})
                    stats.bytes += write_tensors_atomic(
                        path, {n: tensors[n] for n in _variant_shapes(every, (), with_ids) if n in tensors},
                        {"format": "sdloop-latents", "version": str(CACHE_FORMAT_VERSION), "item": item.path,
                         "bucket": f"{bucket[0]}x{bucket[1]}", "base": base_fingerprint})
                    stats.latents_built += 1
                    bar.update(1)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return _totals(stats)


def _variant(name: str) -> Variant:
    return "val" if name == "val" else int(name[1:])


def _variant_shapes(names: Sequence[str], shape: tuple[int, ...], with_ids: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a latent file with its shape: each variant, and its time ids when the family has them."""
    out: dict[str, tuple[int, ...]] = {}
    for n in names:
        out[n] = tuple(shape)
        if with_ids:
            out[time_ids_name(n)] = (6,)
    return out


def _readable_variants(path: Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]],
                       with_ids: bool) -> dict[str, Any]:
    """The variants of ``names`` (with their time ids when ``with_ids``) that an existing file holds intact with
    the right shapes ({} when unreadable)."""
    found = safetensors_shapes(path)
    if not found:
        return {}
    keep = [n for n in names if found.get(n) == shapes[n]
            and (not with_ids or found.get(time_ids_name(n)) == shapes[time_ids_name(n)])]
    keep += [time_ids_name(n) for n in keep] if with_ids else []
    return read_tensors(path, keep) or {} if keep else {}


def build_text_cache(captions: Iterable[str], text_encoder: Any, tokenizer: Any, base_fingerprint: str,
                     cache_root: Path, progress: bool = True, family: Family = SD1) -> CacheStats:
    """Encode each unique caption string once; reuse files whose key and shapes check out.

    ``text_encoder`` and ``tokenizer`` are one module each or the family's lists (SDXL: both encoders); the file
    holds ``family``'s conditioning tensors (``TextConditioning.tensors()``: "hidden", and "pooled" for SDXL).
    """
    t0 = time.perf_counter()
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    dtype = str(module_device_dtype(encoders[0])[1])
    shapes = family.text_shapes(encoders, tokenizers)
    stats = CacheStats()
    todo: list[tuple[str, Path]] = []
    for caption in dict.fromkeys(captions):  # unique, in first-seen order
        path = text_path(cache_root, text_key(caption, base_fingerprint, dtype))
        if is_valid(path, list(shapes), shapes):
            stats.text_reused += 1
            stats.bytes += path.stat().st_size
        else:
            todo.append((caption, path))
    step = ENCODE_BATCH * 4
    bar = _progress(len(todo), "caching text", progress)
    try:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            cond = encode_conditioning(family, encoders, tokenizers, [c for c, _ in chunk])
            for j, (caption, path) in enumerate(chunk):
                stats.bytes += write_tensors_atomic(
                    path, cond.row(j).tensors(),
                    {"format": "sdloop-text", "version": str(CACHE_FORMAT_VERSION), "caption": caption[:1000],
                     "base": base_fingerprint})
                stats.text_built += 1
                bar.update(1)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return _totals(stats)


def _totals(stats: CacheStats) -> CacheStats:
    stats.built = stats.latents_built + stats.text_built
    stats.reused = stats.latents_reused + stats.text_reused
    return stats

"""What the trainer consumes: batches of (latents, text conditioning), from the caches or computed live each step.

Both modes produce the same samples: the variant of an item in an epoch, its caption and caption dropout are drawn
from ``rng(cfg.seed, epoch, item.sha256)``, and the pixels of a variant from ``rng(augment.seed, sha, variant)``,
by the same functions (``finetune.training.cache``) whether the VAE ran at cache-build time or runs now. The live mode is a
plain loop (load, augment, encode, every step, nothing kept) so that comparing it with the caches is fair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from sdloop.families import SD1, Family, TextConditioning

from finetune.data.augment import Size, balanced_weights, epoch_batches, image_to_tensor, item_buckets, seeded_rng
from finetune.training.cache import (CacheStats, Variant, build_latent_cache, build_text_cache, default_cache_root,
                            encode_conditioning, encode_latents, latent_key, latent_path, load_item_image,
                            module_device_dtype, read_tensors, sample_time_ids, text_key, text_path, time_ids_name,
                            variant_caption, variant_image_geometry, variant_names)
from finetune.training.config import TrainConfig


def input_ids_key(index: int) -> str:
    """The batch key of text encoder ``index``'s token ids: "input_ids", then "input_ids_2" (SDXL), ..."""
    return "input_ids" if index == 0 else f"input_ids_{index + 1}"


def batch_conditioning(family: Family, batch: dict[str, Any], text_encoders: Optional[Sequence[Any]],
                       device: Any) -> TextConditioning:
    """The text conditioning of a batch: the cached/encoded states, or the (trained) encoders run on its ids."""
    if "encoder_hidden_states" in batch:
        pooled = batch.get("pooled_text_embeds")
        return TextConditioning(batch["encoder_hidden_states"].to(device),
                                None if pooled is None else pooled.to(device))
    if not text_encoders:
        raise ValueError("a batch of token ids needs the text encoders.")
    ids = [batch[input_ids_key(i)].to(device) for i in range(len(family.text_encoders))]
    return family.encode_ids(list(text_encoders), ids)


def unet_inputs(family: Family, batch: dict[str, Any], text_encoders: Optional[Sequence[Any]],
                device: Any) -> dict[str, Any]:
    """Keyword arguments of ``unet(noisy, timesteps, **kwargs)`` for a batch: what every loss calls the UNet with,
    so the trainer's step, the validation loss and any objective condition the UNet the family's way."""
    cond = batch_conditioning(family, batch, text_encoders, device)
    time_ids = batch.get("time_ids")
    return family.unet_kwargs(cond, None if time_ids is None else time_ids.to(device))


class TrainingFeed:
    """Batches of (latents, text conditioning) for the trainer, from the caches or computed live each step.

    ``train=False`` makes a validation feed: no augmentation (the "val" centre crop), captions as written, no
    caption dropout, no shuffling, no balanced sampling, the same batches every epoch. An empty item list is
    allowed (a run without a validation split): no batches, nothing to prepare.
    """

    def __init__(self, items: Sequence[Any], data_root: Path, cfg: TrainConfig, components: dict,
                 base_fingerprint: str, cache_root: Optional[Path] = None, device: Any = "cpu",
                 train: bool = True, progress: bool = True) -> None:
        import torch

        self.items = list(items)
        self.data_root = Path(data_root)
        self.cfg = cfg
        self.aug = cfg.augment
        self.vae = components["vae"]
        self.family: Family = components.get("family", SD1)
        self.text_encoders = list(components["text_encoders"])
        self.tokenizers = list(components["tokenizers"])
        self.text_encoder = self.text_encoders[0]
        self.tokenizer = self.tokenizers[0]
        self.base_fingerprint = base_fingerprint
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.device = torch.device(device)
        self.train = train
        self.progress = progress
        self.buckets: list[Size] = item_buckets([(it.width, it.height) for it in self.items], cfg.resolution,
                                                self.aug)
        self.weights: Optional[list[float]] = (balanced_weights([it.caption for it in self.items])
                                               if train and self.aug.balanced_sampling else None)
        self._prepared = False
        self._ram: dict[Any, Any] = {}  # cache tensors already read, up to cfg.cache_memory_mb
        self._ram_free = cfg.cache_memory_mb * 2**20

    def __len__(self) -> int:
        return len(self.items)

    # -- epochs and draws ------------------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Index batches of one epoch, one bucket per batch, deterministic for (cfg.seed, epoch)."""
        if not self.train:
            return epoch_batches(self.buckets, self.cfg.batch_size, self.cfg.seed, 0, shuffle=False)
        return epoch_batches(self.buckets, self.cfg.batch_size, self.cfg.seed, epoch, shuffle=True,
                             weights=self.weights)

    def draw(self, index: int, epoch: int) -> tuple[Variant, bool]:
        """(variant, caption dropped) of item ``index`` in ``epoch``; validation always gives ("val", False)."""
        if not self.train:
            return "val", False
        rng = seeded_rng(self.cfg.seed, epoch, self.items[index].sha256)
        variant = rng.randrange(self.aug.variants)
        dropped = rng.random() < self.aug.caption_dropout_p
        return variant, dropped

    def caption(self, index: int, variant: Variant, dropped: bool) -> str:
        item = self.items[index]
        return "" if dropped else variant_caption(item.caption, self.aug, item.sha256, variant)

    def _captions_needed(self) -> list[str]:
        """Every caption text this feed can ask for: each variant's (or the written one) and the empty one."""
        variants: list[Variant] = list(range(self.aug.variants)) if self.train else ["val"]
        return [self.caption(i, v, False) for i in range(len(self.items)) for v in variants] + [""]

    # -- caches ----------------------------------------------------------------------------------------------------

    def prepare(self) -> CacheStats:
        """Build or reuse the caches this feed reads (when cfg.use_cache); zero stats in live mode."""
        self._prepared = True
        if not self.cfg.use_cache or not self.items:
            return CacheStats()
        stats = build_latent_cache(self.items, self.buckets, self.data_root, self.cfg.resolution, self.aug,
                                   self.vae, self.base_fingerprint, self.cache_root, self.progress,
                                   names=self.latent_names(), family=self.family)
        if not self.cfg.train_text_encoder:
            stats = stats.add(build_text_cache(self._captions_needed(), self.text_encoders, self.tokenizers,
                                               self.base_fingerprint, self.cache_root, self.progress, self.family))
        return stats

    def latent_names(self) -> list[str]:
        """Latent variants this feed reads: "v0".."v{K-1}" when training, "val" when validating."""
        return variant_names(self.aug.variants)[:-1] if self.train else ["val"]

    def _latent_file(self, index: int) -> Path:
        item = self.items[index]
        dtype = str(module_device_dtype(self.vae)[1])
        key = latent_key(item.sha256, self.base_fingerprint, self.buckets[index], self.cfg.resolution, self.aug,
                         dtype)
        return latent_path(self.cache_root, key)

    def _text_file(self, caption: str) -> Path:
        dtype = str(module_device_dtype(self.text_encoder)[1])
        return text_path(self.cache_root, text_key(caption, self.base_fingerprint, dtype))

    def _remember(self, key: Any, tensor: Any) -> Any:
        """Keep a tensor (or a tuple/dict of them) read from the cache in RAM while the budget lasts: later epochs
        skip the file read."""
        parts = tensor.values() if isinstance(tensor, dict) else tensor if isinstance(tensor, tuple) else [tensor]
        size = sum(t.numel() * t.element_size() for t in parts)
        if size <= self._ram_free:
            self._ram[key] = tensor
            self._ram_free -= size
        return tensor

    def _cached_latent(self, index: int, variant: Variant) -> Any:
        """The cached latent of a variant, or (latent, time ids) for a family with size/crop conditioning."""
        name = "val" if variant == "val" else f"v{variant}"
        names = [name, time_ids_name(name)] if self.family.uses_time_ids else [name]
        if (index, name) in self._ram:
            return self._ram[(index, name)]
        path = self._latent_file(index)
        got = read_tensors(path, names)
        if got is None:  # deleted or damaged since prepare(): rebuild this one file
            build_latent_cache([self.items[index]], [self.buckets[index]], self.data_root, self.cfg.resolution,
                               self.aug, self.vae, self.base_fingerprint, self.cache_root, progress=False,
                               names=self.latent_names(), family=self.family)
            got = read_tensors(path, names)
            if got is None:
                raise RuntimeError(f"latent cache file {path} is unreadable right after rebuilding it.")
        value = (got[name], got[names[1]]) if self.family.uses_time_ids else got[name]
        return self._remember((index, name), value)

    def _cached_text(self, caption: str) -> dict[str, Any]:
        """The cached conditioning tensors of one caption ("hidden", and "pooled" for SDXL)."""
        if caption in self._ram:
            return self._ram[caption]
        path = self._text_file(caption)
        names = list(self.family.text_shapes(self.text_encoders, self.tokenizers))
        got = read_tensors(path, names)
        if got is None:
            build_text_cache([caption], self.text_encoders, self.tokenizers, self.base_fingerprint, self.cache_root,
                             progress=False, family=self.family)
            got = read_tensors(path, names)
            if got is None:
                raise RuntimeError(f"text cache file {path} is unreadable right after rebuilding it.")
        return self._remember(caption, got)

    def _cached_hidden(self, caption: str) -> Any:
        return self._cached_text(caption)["hidden"]

    # -- batches ---------------------------------------------------------------------------------------------------

    def load_batch(self, indices: list[int], epoch: int) -> dict[str, Any]:
        """One batch: {"latents": [B,C,h/8,w/8] float32, "encoder_hidden_states": [B,77,D] float32} on the device,
        or {"latents", "input_ids": [B,77] long} when the text encoder is trained (it must see token ids).

        SDXL adds "pooled_text_embeds" [B,P] (or "input_ids_2" for its second encoder) and "time_ids" [B,6], each
        sample's real original size, crop corner and bucket. ``unet_inputs`` turns a batch into the UNet's inputs.
        """
        import torch

        if not indices:
            raise ValueError("load_batch needs at least one index.")
        buckets = {self.buckets[i] for i in indices}
        if len(buckets) != 1:
            raise ValueError(f"a batch must share one bucket; indices {indices} span {sorted(buckets)}.")
        if self.cfg.use_cache and not self._prepared:
            self.prepare()
        draws = [self.draw(i, epoch) for i in indices]
        captions = [self.caption(i, v, d) for i, (v, d) in zip(indices, draws)]

        time_ids = None
        if self.cfg.use_cache:
            cached = [self._cached_latent(i, v) for i, (v, _) in zip(indices, draws)]
            if self.family.uses_time_ids:
                cached, time_ids = [c[0] for c in cached], [c[1] for c in cached]
            latents = torch.stack(cached)
        else:
            bucket = self.buckets[indices[0]]
            pixels, time_ids = [], []
            for i, (v, _) in zip(indices, draws):
                item = self.items[i]
                img = load_item_image(self.data_root, item)
                image, geometry = variant_image_geometry(img, bucket, self.aug, item.sha256, v)
                pixels.append(image_to_tensor(image))
                time_ids.append(sample_time_ids(self.family, geometry, bucket))
            latents = encode_latents(self.vae, torch.stack(pixels))
        batch = {"latents": latents.float().to(self.device)}
        if self.family.uses_time_ids:
            batch["time_ids"] = torch.stack(time_ids).float().to(self.device)

        if self.cfg.train_text_encoder:
            for j, ids in enumerate(self.family.tokenize(self.tokenizers, captions)):
                batch[input_ids_key(j)] = ids.long().to(self.device)
            return batch
        if self.cfg.use_cache:
            cond = TextConditioning.stack([TextConditioning.from_tensors(self._cached_text(c)) for c in captions])
        else:
            cond = encode_conditioning(self.family, self.text_encoders, self.tokenizers, captions)
        batch["encoder_hidden_states"] = cond.hidden.float().to(self.device)
        if cond.pooled is not None:
            batch["pooled_text_embeds"] = cond.pooled.float().to(self.device)
        return batch

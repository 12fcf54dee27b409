"""Configuration of the dataset stage and the trainer.

Every field carries a help text (shown by ``sdloop train --help-config`` and written beside each run), and every
``__post_init__`` names the bad field and the range it accepts, so a typo in a YAML file fails before any model loads.
The defaults are a sound SD-1.5 LoRA recipe; the tiny offline base and the demo override only sizes and step counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdloop.configfile import ConfigError, load_config_file

from sdloop.config_types import MAX_SEED, build_dataclass, check_types, help_field

__all__ = ["AugmentConfig", "ConfigError", "DataConfig", "SearchSpace", "TrainConfig", "build_dataclass",
           "load_config_file", "tiny_overrides"]

MAX_STEPS = 100_000_000  # counts of steps beyond this cannot finish; they only overflow later arithmetic


_f = help_field  # a field with its help text


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}.")


def _check_seed(name: str, value: int) -> None:
    _check(0 <= value <= MAX_SEED, name, value, f"a seed in [0, 2**63-1 = {MAX_SEED}]")


@dataclass
class DataConfig:
    """How a dataset folder is read, checked, de-duplicated and split."""

    caption_column: str = _f("text", "Caption column in metadata.jsonl (HF imagefolder format).")
    caption_extension: str = _f(".txt", "Extension of same-stem caption files (kohya format).")
    min_side: int = _f(64, "Images whose shorter side is below this many pixels are skipped.")
    max_aspect_ratio: float = _f(4.0, "Images whose long/short side ratio exceeds this are skipped.")
    max_pixels: int = _f(
        89_478_485, "Images with more pixels than this are treated as decompression bombs and skipped."
    )
    near_duplicate_distance: int = _f(
        4, "Perceptual-hash Hamming distance (of 64 bits) at or below which two images are near-duplicates."
    )
    split_guard_distance: int = _f(
        10, "Images this close (pHash distance) are kept on the same side of the train/validation split."
    )
    validation_split: float = _f(0.1, "Fraction of items held out for validation (0 disables validation).")
    min_validation_items: int = _f(1, "At least this many validation items when validation_split > 0.")
    split_seed: int = _f(0, "Seed of the deterministic train/validation split.")

    def __post_init__(self) -> None:
        check_types(self, "data.")
        _check(bool(self.caption_column), "data.caption_column", self.caption_column, "a non-empty column name")
        ext = self.caption_extension
        _check(ext.startswith(".") and 1 < len(ext) <= 32 and not any(c in ext for c in "/\\"),
               "data.caption_extension", ext, "an extension starting with '.', e.g. '.txt' (no folders)")
        _check(1 <= self.min_side <= 8192, "data.min_side", self.min_side, "an integer in [1, 8192]")
        _check(1.0 <= self.max_aspect_ratio <= 100.0, "data.max_aspect_ratio", self.max_aspect_ratio, "a number in [1, 100]")
        _check(1 <= self.max_pixels <= 2**40, "data.max_pixels", self.max_pixels, "an integer in [1, 2**40]")
        _check(0 <= self.near_duplicate_distance <= 32, "data.near_duplicate_distance",
               self.near_duplicate_distance, "an integer in [0, 32]")
        _check(0 <= self.split_guard_distance <= 32, "data.split_guard_distance", self.split_guard_distance,
               "an integer in [0, 32]")
        _check(0.0 <= self.validation_split < 1.0, "data.validation_split", self.validation_split,
               "a fraction in [0, 1)")
        _check(0 <= self.min_validation_items <= 1_000_000, "data.min_validation_items", self.min_validation_items,
               "an integer in [0, 1000000]")
        _check_seed("data.split_seed", self.split_seed)


@dataclass
class AugmentConfig:
    """Image and caption augmentations; each has its own probability and strength."""

    crop_p: float = _f(0.0, "Probability of a random resized crop (otherwise a centre crop).")
    crop_scale_min: float = _f(0.8, "Smallest area fraction kept by the random resized crop.")
    flip_p: float = _f(0.0, "Probability of a horizontal flip (off by default: it mirrors text and asymmetric "
                            "subjects).")
    rotation_p: float = _f(0.0, "Probability of a small rotation.")
    rotation_degrees: float = _f(5.0, "Largest rotation angle in degrees (either direction).")
    color_p: float = _f(0.0, "Probability of colour jitter.")
    brightness: float = _f(0.1, "Colour jitter: largest relative brightness change.")
    contrast: float = _f(0.1, "Colour jitter: largest relative contrast change.")
    saturation: float = _f(0.1, "Colour jitter: largest relative saturation change.")
    hue: float = _f(0.02, "Colour jitter: largest hue shift, as a fraction of the colour wheel (<= 0.5).")
    caption_dropout_p: float = _f(0.0, "Probability of training on the empty caption (helps classifier-free "
                                       "guidance).")
    shuffle_tags: bool = _f(False, "Shuffle comma-separated tags of the caption (kohya's shuffle_caption).")
    keep_tokens: int = _f(1, "When shuffling, keep the first N tags in place (kohya's keep_tokens).")
    tag_separator: str = _f(",", "Separator of tags in a caption.")
    variants: int = _f(1, "Augmented variants cached per image (K): each epoch draws one of them.")
    bucketing: bool = _f(True, "Aspect-ratio bucketing: batches of equal-size buckets, no distortion.")
    bucket_step: int = _f(64, "Bucket sides are multiples of this many pixels (8 is the VAE's minimum).")
    bucket_max_aspect: float = _f(2.0, "Largest aspect ratio of a bucket.")
    balanced_sampling: bool = _f(False, "Weight items against over-represented caption terms.")
    seed: int = _f(0, "Seed of augmentation draws: the same seed gives the same sample at the same step.")

    def __post_init__(self) -> None:
        check_types(self, "augment.")
        for name in ("crop_p", "flip_p", "rotation_p", "color_p", "caption_dropout_p"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"augment.{name}", v, "a probability in [0, 1]")
        _check(0.05 <= self.crop_scale_min <= 1.0, "augment.crop_scale_min", self.crop_scale_min,
               "a fraction in [0.05, 1]")
        _check(0.0 <= self.rotation_degrees <= 45.0, "augment.rotation_degrees", self.rotation_degrees,
               "degrees in [0, 45]")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"augment.{name}", v, "a strength in [0, 1]")
        _check(0.0 <= self.hue <= 0.5, "augment.hue", self.hue, "a hue shift in [0, 0.5]")
        _check(0 <= self.keep_tokens <= 1000, "augment.keep_tokens", self.keep_tokens, "an integer in [0, 1000]")
        _check(bool(self.tag_separator), "augment.tag_separator", self.tag_separator, "a non-empty string")
        _check(1 <= self.variants <= 64, "augment.variants", self.variants, "an integer in [1, 64]")
        _check(8 <= self.bucket_step <= 512 and self.bucket_step % 8 == 0, "augment.bucket_step",
               self.bucket_step, "a multiple of 8 in [8, 512]")
        _check(1.0 <= self.bucket_max_aspect <= 4.0, "augment.bucket_max_aspect", self.bucket_max_aspect,
               "a ratio in [1, 4]")
        _check_seed("augment.seed", self.seed)

    def image_settings(self) -> dict[str, Any]:
        """The settings that change cached latents (caption-only settings excluded), for cache keys."""
        keys = ("crop_p", "crop_scale_min", "flip_p", "rotation_p", "rotation_degrees", "color_p", "brightness",
                "contrast", "saturation", "hue", "variants", "bucketing", "bucket_step", "bucket_max_aspect", "seed")
        return {k: getattr(self, k) for k in keys}

    def caption_settings(self) -> dict[str, Any]:
        """The settings that change cached text embeddings, for cache keys."""
        keys = ("shuffle_tags", "keep_tokens", "tag_separator", "variants", "seed")
        return {k: getattr(self, k) for k in keys}


MIXED_PRECISION = ("no", "fp16", "bf16")
# 64 px is the smallest side a UNet with 3 downsamplings (SD's 4 blocks) takes at the VAE's factor 8; past
# 4096 px one image's activations do not fit any GPU, so the request is refused before anything is allocated
# the base decides the true minimum (its VAE and UNet downsampling): the trainer checks it against the loaded model
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
OBJECTIVES = ("sft", "kto", "dpo")
# Diffusion-DPO trains SD 1.5 with beta = 5000 (Wallace et al. 2023, Section 5.1; the diffusers example uses 2500
# to 5000); Diffusion-KTO's SD 1.5 script uses the same scale of beta on the same per-pixel MSE (Li et al. 2024)
DEFAULT_BETA = {"dpo": 5000.0, "kto": 5000.0}


@dataclass
class TrainConfig:
    """A LoRA fine-tuning run. Defaults: a sound SD-1.5 recipe at 512 px on one GPU."""

    base: str = _f("", "Base pipeline: a local diffusers folder or a hub id (e.g. runwayml/stable-diffusion-v1-5).")
    data: str = _f("", "Dataset folder (imagefolder + metadata.jsonl, or images + .txt captions).")
    output: str = _f("", "Run folder to write (config, metrics, LoRA files, checkpoints, samples).")
    resolution: int = _f(512, "Training resolution in pixels (the bucket area is resolution^2).")
    batch_size: int = _f(4, "Images per optimizer micro-step (per process).")
    gradient_accumulation: int = _f(1, "Micro-steps per optimizer step.")
    max_steps: int = _f(0, "Optimizer steps to train; 0 means derive from epochs.")
    epochs: int = _f(10, "Passes over the training split (used when max_steps is 0).")
    learning_rate: float = _f(1e-4, "Peak AdamW learning rate of the LoRA parameters.")
    text_encoder_lr: float = _f(5e-5, "Learning rate of text-encoder LoRA parameters (when trained).")
    lr_scheduler: str = _f("cosine", f"Learning-rate schedule, one of {LR_SCHEDULERS}.")
    warmup_steps: int = _f(0, "Linear warm-up steps; 0 derives 5% of the run.")
    weight_decay: float = _f(1e-2, "AdamW decoupled weight decay on LoRA weights (regularisation).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _f(False, "Use bitsandbytes' 8-bit AdamW (GPU; needs bitsandbytes installed).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    rank: int = _f(16, "LoRA rank r.")
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch (regularisation).")
    target_modules: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA adapters.")
    train_text_encoder: bool = _f(False, "Also train LoRA adapters on the text encoder(s).")
    text_encoder_target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "out_proj"],
                                                "Text-encoder modules that get LoRA adapters.")
    mixed_precision: str = _f("no", f"Autocast precision, one of {MIXED_PRECISION} (bf16/fp16 need a GPU).")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the UNet.")
    prediction_type: str = _f("auto", f"Loss target, one of {PREDICTION_TYPES}; auto follows the scheduler.")
    snr_gamma: float = _f(5.0, "Min-SNR-gamma loss weighting (Hang et al. 2023); 0 disables it.")
    noise_offset: float = _f(0.0, "Noise offset (helps very dark/bright images); 0 disables it.")
    ema: bool = _f(False, "Keep an exponential moving average of the LoRA weights; it is evaluated and saved.")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step.")
    validation_every: int = _f(100, "Evaluate the validation loss every N optimizer steps (and at the end).")
    validation_timesteps: int = _f(8, "Fixed timesteps per validation item (spread over the schedule).")
    early_stopping_patience: int = _f(5, "Stop after this many validations without improvement; 0 disables.")
    early_stopping_min_delta: float = _f(0.0, "Improvement smaller than this does not reset the patience.")
    sample_every: int = _f(0, "Write a sample grid every N steps; 0 means at each validation.")
    sample_prompts: list[str] = _f([], "Prompts of the sample grid; empty takes the first validation captions.")
    sample_seeds: list[int] = _f([0, 1], "Seeds of the sample grid (one column each).")
    sample_steps: int = _f(25, "Inference steps of the sample grid.")
    checkpoint_every: int = _f(0, "Write a resumable checkpoint every N steps; 0 means at each validation.")
    keep_checkpoints: int = _f(2, "Keep the last K checkpoints (the best is always kept).")
    use_cache: bool = _f(True, "Train from latent and text-embedding caches (VAE and text encoder run once).")
    cache_memory_mb: int = _f(2048, "Keep up to this many MB of cache tensors in RAM after their first read "
                                    "(0: read the cache files every step).")
    num_workers: int = _f(0, "DataLoader workers when training without caches.")
    seed: int = _f(0, "Seed of noise, timesteps, data order and augmentation.")
    init_lora: str = _f("", "Start the LoRA from these weights instead of a fresh draw: a finished run folder (its "
                            "LoRA) or its lora/pytorch_lora_weights.safetensors. Rank and target modules must match. "
                            "Retraining continues the champion this way.")
    objective: str = _f("sft", f"Training objective, one of {OBJECTIVES}: sft fine-tunes on the images (of a "
                               "preference dataset: the chosen/desirable ones); dpo is Diffusion-DPO on pairs (Wallace "
                               "et al. 2023), kto is Diffusion-KTO on thumbs (Li et al. 2024), both against the frozen "
                               "starting model (init_lora, else the base) as reference. dpo/kto need a preference "
                               "dataset (preferences.jsonl).")
    beta: float = _f(0.0, "Preference strength beta of dpo/kto (how far from the reference the model may move); "
                          f"0 takes the objective's default ({DEFAULT_BETA}).")
    desirable_weight: float = _f(1.0, "kto: weight lambda_D of desirable images (Li et al. 2024, Eq. 8).")
    undesirable_weight: float = _f(1.0, "kto: weight lambda_U of undesirable images; KTO (Ethayarajh et al. 2024) "
                                        "advises lambda_D*n_D / (lambda_U*n_U) in [1, 4/3].")
    data_config: DataConfig = field(default_factory=DataConfig,
                                    metadata={"help": "Dataset stage settings.", "prefix": "data."})
    augment: AugmentConfig = field(default_factory=AugmentConfig,
                                   metadata={"help": "Augmentation settings.", "prefix": "augment."})

    def __post_init__(self) -> None:
        check_types(self, "")  # types first (sections given as mappings are built here), then ranges
        _check(MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0, "resolution",
               self.resolution, f"a multiple of 8 in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]")
        _check(1 <= self.batch_size <= 1024, "batch_size", self.batch_size, "an integer in [1, 1024]")
        _check(1 <= self.gradient_accumulation <= 1024, "gradient_accumulation", self.gradient_accumulation,
               "an integer in [1, 1024]")
        _check(0 <= self.max_steps <= MAX_STEPS, "max_steps", self.max_steps, f"an integer in [0, {MAX_STEPS}]")
        _check((self.epochs >= 1 or self.max_steps > 0) and self.epochs <= 1_000_000, "epochs", self.epochs,
               "an integer in [1, 1000000] (or set max_steps)")
        _check(0.0 < self.learning_rate <= 1.0, "learning_rate", self.learning_rate, "a number in (0, 1]")
        _check(0.0 < self.text_encoder_lr <= 1.0, "text_encoder_lr", self.text_encoder_lr, "a number in (0, 1]")
        _check(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", self.lr_scheduler, f"one of {LR_SCHEDULERS}")
        _check(0 <= self.warmup_steps <= MAX_STEPS, "warmup_steps", self.warmup_steps,
               f"an integer in [0, {MAX_STEPS}]")
        _check(0.0 <= self.weight_decay <= 1.0, "weight_decay", self.weight_decay, "a number in [0, 1]")
        _check(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", self.adam_beta1, "a number in [0, 1)")
        _check(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", self.adam_beta2, "a number in [0, 1)")
        _check(self.adam_epsilon > 0, "adam_epsilon", self.adam_epsilon, "a positive number")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "a number >= 0")
        _check(1 <= self.rank <= 1024, "rank", self.rank, "an integer in [1, 1024]")
        _check(0 < self.alpha <= 1e6, "alpha", self.alpha, "a number in (0, 1e6]")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        for name in ("target_modules", "text_encoder_target_modules"):
            mods = getattr(self, name)
            _check(bool(mods) and all(mods), name, mods, "a non-empty list of module names")
        _check(self.mixed_precision in MIXED_PRECISION, "mixed_precision", self.mixed_precision,
               f"one of {MIXED_PRECISION}")
        _check(self.prediction_type in PREDICTION_TYPES, "prediction_type", self.prediction_type,
               f"one of {PREDICTION_TYPES}")
        _check(0 <= self.snr_gamma <= 1e6, "snr_gamma", self.snr_gamma, "a number in [0, 1e6] (0 disables)")
        _check(0.0 <= self.noise_offset <= 1.0, "noise_offset", self.noise_offset, "a number in [0, 1]")
        _check(0.0 < self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a number in (0, 1)")
        _check(1 <= self.validation_every <= MAX_STEPS, "validation_every", self.validation_every,
               f"an integer in [1, {MAX_STEPS}]")
        _check(1 <= self.validation_timesteps <= 1000, "validation_timesteps", self.validation_timesteps,
               "an integer in [1, 1000]")
        _check(0 <= self.early_stopping_patience <= 1_000_000, "early_stopping_patience",
               self.early_stopping_patience, "an integer in [0, 1000000] (0 disables)")
        _check(self.early_stopping_min_delta >= 0, "early_stopping_min_delta", self.early_stopping_min_delta,
               "a number >= 0")
        _check(0 <= self.sample_every <= MAX_STEPS, "sample_every", self.sample_every,
               f"an integer in [0, {MAX_STEPS}]")
        _check(len(self.sample_prompts) <= 64, "sample_prompts", self.sample_prompts, "at most 64 prompts")
        _check(1 <= len(self.sample_seeds) <= 64 and all(0 <= s <= MAX_SEED for s in self.sample_seeds),
               "sample_seeds", self.sample_seeds, "1 to 64 seeds, each in [0, 2**63-1]")
        _check(1 <= self.sample_steps <= 1000, "sample_steps", self.sample_steps, "an integer in [1, 1000]")
        _check(0 <= self.checkpoint_every <= MAX_STEPS, "checkpoint_every", self.checkpoint_every,
               f"an integer in [0, {MAX_STEPS}]")
        _check(1 <= self.keep_checkpoints <= 1000, "keep_checkpoints", self.keep_checkpoints, "an integer in [1, 1000]")
        _check(0 <= self.num_workers <= 256, "num_workers", self.num_workers, "an integer in [0, 256]")
        _check(0 <= self.cache_memory_mb <= 1 << 24, "cache_memory_mb", self.cache_memory_mb,
               "an integer in [0, 16777216] (MB)")
        _check_seed("seed", self.seed)
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        _check(0.0 <= self.beta <= 1e7, "beta", self.beta, "a number in (0, 1e7], or 0 for the objective's default")
        for name in ("desirable_weight", "undesirable_weight"):
            _check(0.0 < getattr(self, name) <= 1000.0, name, getattr(self, name), "a number in (0, 1000]")

    def preference_beta(self) -> float:
        """beta as set, or the objective's default when it is 0 (see DEFAULT_BETA)."""
        return self.beta or DEFAULT_BETA.get(self.objective, 0.0)

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a (possibly partial, possibly nested) mapping; unknown keys and wrong types are named."""
        return build_dataclass(cls, values, prefix="")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Build from a YAML file (read by ``load_config_file``: every problem with the file is one line)."""
        return cls.from_dict(load_config_file(path))


def tiny_overrides() -> dict[str, Any]:
    """Settings that fit the tiny offline base and 2 CPU cores (demo and tests).

    The tiny base has random weights, so LoRA on the attention projections alone has little to work with: the
    recipe adds the convolutions and feed-forward layers and a higher learning rate (measured on 24 synthetic
    images: validation loss 1.17 -> 0.39 in 60 steps at lr 1e-2, against 1.17 -> 1.17 with attention-only at 1e-3).
    A constant schedule after warm-up, because a cosine decay to zero flattens short runs early
    (benchmarks/train.py: cosine plateaued at 0.211, constant reached 0.186 in the same 400 steps); sample grids
    every 40 steps, because one per validation took longer than the training itself.
    """
    return {
        "resolution": 64, "batch_size": 4, "rank": 8, "alpha": 8.0, "learning_rate": 5e-3, "max_steps": 80,
        "validation_every": 10, "sample_every": 40, "sample_steps": 8, "lr_scheduler": "constant_with_warmup",
        "warmup_steps": 5,
        "early_stopping_patience": 3, "target_modules": list(TINY_TARGET_MODULES),
        "augment": {"bucket_step": 8, "variants": 2, "flip_p": 0.5},
    }


TINY_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "time_emb_proj")


@dataclass
class SearchSpace:
    """Ranges of the hyperparameter search (log-uniform for rates); every bound must be a value TrainConfig takes."""

    learning_rate: list[float] = _f([1e-5, 1e-3], "Learning-rate range [low, high] (log-uniform).")
    rank: list[int] = _f([4, 8, 16, 32], "Ranks to try.")
    lora_dropout: list[float] = _f([0.0, 0.3], "LoRA dropout range [low, high].")
    weight_decay: list[float] = _f([1e-4, 1e-1], "Weight-decay range [low, high] (log-uniform).")
    batch_size: list[int] = _f([1, 2, 4], "Batch sizes to try.")

    def __post_init__(self) -> None:
        check_types(self, "search.")
        for name in ("learning_rate", "lora_dropout", "weight_decay"):
            v = getattr(self, name)
            _check(len(v) == 2 and v[0] <= v[1], f"search.{name}", v, "a [low, high] pair with low <= high")
        _check(self.weight_decay[0] > 0, "search.weight_decay", self.weight_decay,
               "positive bounds (the range is searched on a log scale)")
        for name in ("rank", "batch_size"):
            _check(1 <= len(getattr(self, name)) <= 64, f"search.{name}", getattr(self, name),
                   "a list of 1 to 64 values to try")
        for name in ("learning_rate", "lora_dropout", "weight_decay", "rank", "batch_size"):
            for v in getattr(self, name):  # each bound and choice must be a value the trainer accepts
                try:
                    TrainConfig(**{name: v})
                except ConfigError as e:
                    raise ConfigError(f"search.{name}={getattr(self, name)!r} is outside what training takes: "
                                      f"{e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

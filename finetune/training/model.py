"""The trainer's model phase: load the frozen base, attach LoRA adapters, build the optimizer and the schedule.

``Model`` holds everything a training step, a validation and a checkpoint touch, so the phases that follow take one
argument instead of sharing a dozen local variables.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sdloop.families import SD1, Family, check_same_layout
from sdloop.pipelines import base_info, load_components

from finetune.training.config import TrainConfig
from finetune.training.lora import add_lora, lora_parameters, lora_state_dict, load_lora_state_dict, split_components
from finetune.training.setup import Context, Data, Event, SetupError, build_feeds, timed
from finetune.training.step import EMA, maybe_ema


@dataclass
class Model:
    """The trainable pipeline parts, the optimizer and schedule, and where they run."""

    cfg: TrainConfig
    accelerator: Any
    device: torch.device
    rank: int
    world: int
    components: dict
    unet: Any                 # as prepared by accelerate (DDP-wrapped when data-parallel)
    text_encoder: Any
    raw_unet: Any             # the unwrapped modules, whose LoRA weights are saved
    raw_te: Any
    noise_scheduler: Any
    prediction_type: str
    base_fingerprint: str
    pipeline_class: str
    optimizer: Any
    lr_scheduler: Any
    trainable: list
    total_steps: int
    train_feed: Any
    val_feed: Any
    ema: Optional[EMA] = None
    autocast: Any = contextlib.nullcontext()
    family: Family = SD1
    text_encoders: list = field(default_factory=list)  # every text encoder, as prepared (SDXL: two)
    raw_tes: list = field(default_factory=list)        # the same, unwrapped

    def trained_text_encoders(self) -> dict[str, Any]:
        """The unwrapped text encoders that carry LoRA, by component name ({} when they are frozen)."""
        if not self.cfg.train_text_encoder:
            return {}
        return dict(zip(self.family.text_encoders, self.raw_tes or [self.raw_te]))

    def weights_now(self) -> dict[str, torch.Tensor]:
        """The live LoRA weights, prefixed by component (``unet.``, ``text_encoder.``, SDXL's ``text_encoder_2.``)."""
        out = {f"unet.{k}": v for k, v in lora_state_dict(self.raw_unet).items()}
        for name, te in self.trained_text_encoders().items():
            out.update({f"{name}.{k}": v for k, v in lora_state_dict(te).items()})
        return out

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        parts = split_components(tensors)
        stray = sorted(set(parts) - {"unet", *self.trained_text_encoders()})
        if stray:  # e.g. text_encoder_2 weights of an SDXL run met an SD 1.x model
            raise ValueError(f"weights for {', '.join(stray)}, which this run does not train")
        load_lora_state_dict(self.raw_unet, parts.get("unet", {}))
        for name, te in self.trained_text_encoders().items():
            load_lora_state_dict(te, parts.get(name, {}))

    def result_weights(self) -> dict[str, torch.Tensor]:
        """The weights a result is made of: the EMA copy when EMA is on, else the live ones."""
        with maybe_ema(self.ema):
            return self.weights_now()


def _make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SetupError("use_8bit_adam needs bitsandbytes: pip install 'sdloop[gpu]' "
                             "(or set use_8bit_adam=false).") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def check_resolution(cfg: TrainConfig, vae: Any, unet: Any) -> None:
    """Refuse a resolution whose latents are too small for the UNet to halve down to its deepest block."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    smallest = vae_factor * unet_factor * 2
    if cfg.resolution % vae_factor or cfg.resolution < smallest:
        raise SetupError(f"resolution={cfg.resolution} does not fit this base: it needs a multiple of {vae_factor} "
                         f"(the VAE's downsampling) of at least {smallest} (the UNet halves the latents "
                         f"{len(unet.config.block_out_channels) - 1} time(s)).")


def _attach_lora(model: Any, cfg: TrainConfig, targets: list[str], what: str) -> None:
    try:
        add_lora(model, cfg.rank, cfg.alpha, cfg.lora_dropout, targets)
    except ValueError as e:
        raise SetupError(f"cannot put LoRA on the {what}: {str(e).splitlines()[0]}") from None


def lora_file_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Optional[Family]:
    """The family a diffusers LoRA file was trained in: its ``sdloop.family`` metadata, else SDXL when it holds
    ``text_encoder_2.`` keys, else None (an older sdloop file of a UNet: its shapes will tell)."""
    from sdloop.families import SDXL, family_by_name

    if metadata.get("sdloop.family"):
        return family_by_name(metadata["sdloop.family"])
    return SDXL if any(k.startswith("text_encoder_2.") for k in tensors) else None


def init_from(cfg: TrainConfig, unet: Any, text_encoder: Any, family: Family = SD1,
              text_encoders: Optional[list] = None) -> None:
    """Copy the weights of an earlier LoRA (``cfg.init_lora``: a run folder or its diffusers LoRA file) into the
    fresh adapters, so a retraining continues the champion instead of starting over. A LoRA of another family
    (an SD 1.x run's on an SDXL base) is one line naming both."""
    from pathlib import Path

    from sdloop.atomic import DamagedFileError, load_safetensors
    from sdloop.runfolder import RunFolder

    src = Path(cfg.init_lora).expanduser()
    path = RunFolder(src).diffusers_lora if src.is_dir() else src
    if not path.is_file():
        raise SetupError(f"init_lora={cfg.init_lora!r}: no LoRA weights at {path}; name a finished run folder or "
                         "its lora/pytorch_lora_weights.safetensors.")
    try:
        tensors, metadata = load_safetensors(path)
    except (DamagedFileError, OSError, ValueError) as e:
        raise SetupError(f"init_lora={cfg.init_lora!r}: {path} cannot be read ({str(e).splitlines()[0]}); "
                         "train that run again or start from scratch (init_lora='').") from None
    source = lora_file_family(tensors, metadata)
    if source is not None:
        check_same_layout(source, family, f"init_lora={cfg.init_lora!r} cannot start this run (the LoRA's family vs "
                          "the base's)", "start from a LoRA trained on this base's family, or init_lora=''.")
    parts = split_components({k: v.float() for k, v in tensors.items()})
    unet_sd = parts.get("unet", {})
    try:
        load_lora_state_dict(unet, unet_sd)
        for name, te in zip(family.text_encoders, text_encoders or [text_encoder]):
            if cfg.train_text_encoder and parts.get(name):
                load_lora_state_dict(te, parts[name])
    except (ValueError, RuntimeError) as e:
        raise SetupError(f"init_lora={cfg.init_lora!r} does not fit this run's adapters ({str(e).splitlines()[0]}); "
                         "use the same rank and target modules as the run it came from.") from None
    got = {k for k in lora_state_dict(unet)}
    if not got or not set(unet_sd) <= got:
        raise SetupError(f"init_lora={cfg.init_lora!r} holds {len(unet_sd)} UNet LoRA tensors that do not match "
                         "this run's adapters; use the same rank and target modules as the run it came from.")


def setup_model(cfg: TrainConfig, ctx: Context, data: Data, progress: bool, event: Optional[Event]) -> Model:
    """Load the base, build the feeds over the caches, add LoRA, and make the optimizer and schedule."""
    from diffusers.optimization import get_scheduler

    info = base_info(cfg.base)
    prediction_type = info.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    with timed(event, "load_components"):
        components = load_components(cfg.base, torch_dtype=weight_dtype)
    family: Family = components["family"]
    unet, vae = components["unet"], components["vae"]
    text_encoders = list(components["text_encoders"])
    text_encoder = text_encoders[0]
    check_resolution(cfg, vae, unet)
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
        m.to(ctx.device)
    if vae.dtype != torch.float32:
        vae.to(torch.float32)  # latents are encoded in fp32: fp16 VAEs of SD 1.x overflow
    build_feeds(cfg, data, components, info.fingerprint, ctx, progress, event)

    torch.manual_seed(cfg.seed)  # the LoRA A matrices' initial draw
    _attach_lora(unet, cfg, cfg.target_modules, "UNet (target_modules)")
    groups = [{"params": lora_parameters(unet), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:  # every text encoder of the family (SDXL: both), one group each
        for name, te in zip(family.text_encoders, text_encoders):
            _attach_lora(te, cfg, cfg.text_encoder_target_modules, f"{name} (text_encoder_target_modules)")
            groups.append({"params": lora_parameters(te), "lr": cfg.text_encoder_lr})
    for g in groups:  # trainable weights in fp32 even when the frozen base is fp16/bf16
        for p in g["params"]:
            p.data = p.data.float()
    if cfg.init_lora:
        init_from(cfg, unet, text_encoder, family, text_encoders)
    if cfg.objective != "sft":  # dpo/kto: the starting adapter (the champion's LoRA) frozen as the reference
        from finetune.training.preference_run import add_reference

        add_reference(unet, cfg)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    trainable = [p for g in groups for p in g["params"]]
    optimizer = _make_optimizer(cfg, groups)
    batches_per_epoch = max(1, len(data.train_feed.epoch_batches(0)) // ctx.world)
    steps_per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps or max(1, int(0.05 * total_steps))
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup,
                                 num_training_steps=total_steps)
    acc = ctx.accelerator
    if cfg.train_text_encoder:
        unet, *text_encoders, optimizer = acc.prepare(unet, *text_encoders, optimizer)
        text_encoder = text_encoders[0]
    else:
        unet, optimizer = acc.prepare(unet, optimizer)
    return Model(
        cfg=cfg, accelerator=acc, device=ctx.device, rank=ctx.rank, world=ctx.world, components=components,
        unet=unet, text_encoder=text_encoder, raw_unet=acc.unwrap_model(unet), raw_te=acc.unwrap_model(text_encoder),
        noise_scheduler=components["noise_scheduler"], prediction_type=prediction_type,
        base_fingerprint=info.fingerprint, pipeline_class=info.pipeline_class, optimizer=optimizer,
        lr_scheduler=lr_scheduler, trainable=trainable, total_steps=total_steps, train_feed=data.train_feed,
        val_feed=data.val_feed, ema=EMA(trainable, cfg.ema_decay) if cfg.ema else None,
        autocast=acc.autocast() if cfg.mixed_precision != "no" else contextlib.nullcontext(), family=family,
        text_encoders=text_encoders, raw_tes=[acc.unwrap_model(te) for te in text_encoders])

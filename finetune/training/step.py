"""One optimizer step of LoRA training, and what it needs: the loss, the EMA of the weights, the batch stream.

Every random draw of a step (noise, timesteps, noise offset, LoRA dropout) is named by (seed, step, process) through
``sdloop.seeding``, so a run resumed at step N replays exactly what an uninterrupted run does at step N.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from sdloop.seeding import seed_torch, torch_generator

from finetune.training.feed import unet_inputs
from finetune.training.validate import training_target


def _snr(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                   prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """MSE, optionally weighted by min(SNR, gamma)/SNR (epsilon) or min(SNR, gamma)/(SNR + 1) (v-prediction).

    Min-SNR-gamma weighting (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") keeps
    the easy low-noise timesteps from dominating the gradient; the paper reports about 3.4x faster convergence.
    """
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        snr = _snr(noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=snr_gamma)
        weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)
        per_sample = per_sample * weights
    return per_sample.mean()


class EMA:
    """Exponential moving average of the trainable LoRA tensors, with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights; the live ones come back after it."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s.cpu() for i, s in enumerate(self.shadow)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"ema.{i}"])


def maybe_ema(ema: "EMA | None") -> Any:
    """The EMA weights swapped in when EMA is on, else nothing: what validation, samples and results use."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()


def micro_batches(feed: Any, start_epoch: int, start_pos: int, rank: int, world: int
                  ) -> Iterator[tuple[int, int, list[int]]]:
    """Yield (epoch, position, indices) forever; each process takes every world-th batch of an epoch."""
    epoch, pos = start_epoch, start_pos
    while True:
        batches = feed.epoch_batches(epoch)
        usable = len(batches) - len(batches) % world  # equal batch counts per process keep DDP in step
        mine = batches[:usable][rank::world]
        while pos < len(mine):
            yield epoch, pos, mine[pos]
            pos += 1
        epoch, pos = epoch + 1, 0


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite at a step (the trainer turns it into a TrainingError with advice)."""

    def __init__(self, value: float) -> None:
        super().__init__(str(value))
        self.value = value


def train_step(m: Any, stream: Iterator[tuple[int, int, list[int]]], step: int, cfg: Any,
               state: Any) -> float:
    """Run the gradient-accumulation micro-steps of optimizer step ``step`` + 1; return its mean loss.

    ``m`` is the trainer's Model (unet, text encoder, feed, optimizer, scheduler, accelerator); ``state`` gets the
    data position (epoch, pos) after the step, which a checkpoint stores.
    """
    if cfg.objective != "sft":  # dpo/kto: pairs or thumbs against the frozen reference
        from finetune.training.preference_run import preference_step

        return preference_step(m, stream, step, cfg, state)
    acc, device = m.accelerator, m.device
    step_loss = 0.0
    seed_torch("lora-dropout", cfg.seed, step, m.rank)
    gen = torch_generator("train-step", cfg.seed, step, m.rank)
    for _ in range(cfg.gradient_accumulation):
        epoch, pos, indices = next(stream)
        with acc.accumulate(m.unet):
            batch = m.train_feed.load_batch(indices, epoch)
            latents = batch["latents"].to(device, torch.float32)
            bsz = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen).to(device)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=gen).to(device)
            timesteps = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen).to(device)
            noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
            with m.autocast:  # the family conditions the UNet (SDXL: pooled embedding and size/crop time ids)
                pred = m.unet(noisy, timesteps, **unet_inputs(m.family, batch, m.text_encoders, device)).sample
            target = training_target(m.noise_scheduler, m.prediction_type, latents, noise, timesteps)
            loss = diffusion_loss(pred, target, timesteps, m.noise_scheduler, m.prediction_type, cfg.snr_gamma)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(float(loss.detach()))
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(m.trainable, cfg.max_grad_norm)
            m.optimizer.step()
            if acc.sync_gradients:
                m.lr_scheduler.step()
            m.optimizer.zero_grad(set_to_none=True)
        step_loss += float(loss.detach()) / cfg.gradient_accumulation
        state.epoch, state.pos = epoch, pos + 1
    if m.ema is not None:
        m.ema.update(step + 1)
    return float(acc.reduce(torch.tensor(step_loss, device=device), "mean"))

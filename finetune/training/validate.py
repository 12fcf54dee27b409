"""The fixed-noise validation loss and the sample grid.

The validation loss uses, for every held-out item, the same timesteps (spread evenly over the schedule) and the same
noise (seeded by the item's content hash and the timestep's index), with the plain unweighted MSE against the
scheduler's target. Evaluated twice on the same weights it gives the same number, whatever the batch size, the
process count or the training loss weighting, so curves compare across evaluations, runs and trials.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from sdloop.seeding import torch_generator


def fixed_timesteps(num_train_timesteps: int, k: int) -> list[int]:
    """k timesteps at the centres of k equal slices of [0, T)."""
    return [int((i + 0.5) * num_train_timesteps / k) for i in range(k)]


def item_noise(content_hash: str, index: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise that depends only on the item's content, the timestep's index and the seed (CPU generator)."""
    return torch.randn(shape, generator=torch_generator("validation-noise", seed, content_hash, index))


def training_target(noise_scheduler: Any, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}: use epsilon or v_prediction.")


@torch.no_grad()
def validation_loss_sum(unet: torch.nn.Module, noise_scheduler: Any, feed: Any, items: list[Any],
                        prediction_type: str, k: int, seed: int, device: torch.device,
                        text_encoder: Any = None, autocast: Any = None,
                        batches: Optional[list[list[int]]] = None) -> tuple[float, int]:
    """Sum of per-sample MSE over (item, fixed timestep) pairs and their count, for reduction across processes.

    ``text_encoder``: the trained text encoder(s) (one module or the family's list) when the feed gives token ids.
    """
    from finetune.training.feed import unet_inputs

    encoders = [] if text_encoder is None else list(text_encoder) if isinstance(text_encoder, (list, tuple)) \
        else [text_encoder]
    was_training = unet.training
    unet.eval()
    for enc in encoders:
        enc.eval()
    total, count = 0.0, 0
    ts = fixed_timesteps(noise_scheduler.config.num_train_timesteps, k)
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    for indices in (batches if batches is not None else feed.epoch_batches(0)):
        batch = feed.load_batch(indices, 0)
        latents = batch["latents"].to(device, torch.float32)
        inputs = unet_inputs(feed.family, batch, encoders, device)
        for j, t in enumerate(ts):
            noise = torch.stack([item_noise(items[i].sha256, j, tuple(latents.shape[1:]), seed)
                                 for i in indices]).to(device)
            timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with ctx:
                pred = unet(noisy, timesteps, **inputs).sample
            target = training_target(noise_scheduler, prediction_type, latents, noise, timesteps)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            total += float(per_sample.sum())
            count += int(per_sample.numel())
    unet.train(was_training)
    for enc in encoders:
        if was_training:
            enc.train()
    return total, count


@torch.no_grad()
def sample_images(components: dict[str, Any], unet: torch.nn.Module, text_encoder: torch.nn.Module,
                  prompts: list[str], seeds: list[int], steps: int, size: tuple[int, int],
                  device: torch.device) -> list[list[Any]]:
    """Generate one image per (prompt, seed) with the training weights, using a fast DPM-Solver++ schedule.

    The pipeline is the family's (``components["family"]``), built from the training modules: ``text_encoder``
    is the first (trained) encoder; SDXL's second comes from ``components``, where its LoRA was attached in place.
    """
    from diffusers import DPMSolverMultistepScheduler

    from sdloop.families import SD1

    family = components.get("family", SD1)
    encoders = [text_encoder, *components["text_encoders"][1:]]
    parts = {**dict(zip(family.text_encoders, encoders)), **dict(zip(family.tokenizers, components["tokenizers"]))}
    pipe = family.pipeline_class()(
        vae=components["vae"], unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(components["noise_scheduler"].config), **parts,
        **family.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    rows = []
    for prompt in prompts:  # one batched call per prompt, one generator per seed: same images as one by one
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        rows.append(pipe(prompt, num_inference_steps=steps, width=size[0], height=size[1], generator=generators,
                         num_images_per_prompt=len(seeds), guidance_scale=5.0).images)
    unet.train(was_training)
    return rows


def write_sample_grid(path: Path, components: dict[str, Any], unet: torch.nn.Module, text_encoder: torch.nn.Module,
                      prompts: list[str], seeds: list[int], steps: int, size: tuple[int, int], device: torch.device,
                      title: str) -> Path:
    from finetune.training.visuals import image_grid

    rows = sample_images(components, unet, text_encoder, prompts, seeds, steps, size, device)
    return image_grid(rows, prompts, [f"seed {s}" for s in seeds], path, title=title)

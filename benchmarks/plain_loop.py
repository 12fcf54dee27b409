"""The plain LoRA loop that ``benchmarks/train.py`` compares sdloop's trainer against.

It follows the diffusers example ``examples/text_to_image/train_text_to_image_lora.py``: frozen fp32 base, peft
LoRA adapters on the UNet, AdamW, a constant learning rate, gradient clipping at 1.0, a torch DataLoader over the
training images (resize the shorter side to the resolution, centre crop, random horizontal flip, [-1, 1]), and every
step: VAE-encode the images, run the text encoder on the captions (both under no_grad), add noise at a uniform random
timestep, and take the plain MSE between the UNet's prediction and the noise (epsilon). No caches, no min-SNR
weighting, no warm-up or decay, no early stopping.

Only the validation uses sdloop code (``finetune.training.validate.validation_loss_sum``, the fixed-noise evaluator), so both
sides are scored by the same number; it is imported at the first evaluation, whose time the benchmark excludes.

Differences from the diffusers script, all neutral or in the plain loop's favour: no Accelerator wrapper (a no-op
on one device), no ``datasets`` library (the split is passed in, not scanned), no logging to trackers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional


class ImageCaptionDataset:
    """Training images and captions, transformed on the fly like the diffusers example's ``preprocess_train``."""

    def __init__(self, root: Path, items: list[dict], resolution: int, flip_p: float, tokenizer: Any) -> None:
        self.root, self.items, self.resolution, self.flip_p, self.tokenizer = Path(root), items, resolution, flip_p, \
            tokenizer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        item = self.items[i]
        res = self.resolution
        with Image.open(self.root / item["path"]) as im:
            img = im.convert("RGB")
        # transforms.Resize(res) (shorter side, bicubic as sdloop uses) + transforms.CenterCrop(res)
        w, h = img.size
        scale = res / min(w, h)
        img = img.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        img = img.crop((left, top, left + res, top + res))
        if float(torch.rand(())) < self.flip_p:  # transforms.RandomHorizontalFlip (the example's --random_flip)
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        ids = self.tokenizer(item["caption"], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def load_models(base: str, device: Any) -> dict[str, Any]:
    """Tokenizer, text encoder, VAE, UNet and DDPM scheduler, fp32, frozen, as the example loads them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    m = {
        "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        "vae": AutoencoderKL.from_pretrained(base, subfolder="vae"),
        "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        "noise_scheduler": DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
    }
    for k in ("text_encoder", "vae", "unet"):
        m[k].requires_grad_(False)
        m[k].to(device)
    return m


def run_plain(base: str, data: str, train_items: list[dict], val_items: list[dict], *, resolution: int,
              batch_size: int, learning_rate: float, rank: int, alpha: float, target_modules: list[str],
              steps: int, seed: int = 0, flip_p: float = 0.5, latents_from: str = "mean", device: str = "cpu",
              eval_every: int = 0, validation_timesteps: int = 8, val_augment: Optional[dict] = None,
              window: Optional[tuple[int, int]] = None,
              log: Callable[[str], None] = lambda s: None, events: Optional[list] = None) -> dict[str, Any]:
    """Train ``steps`` steps; evaluate at step 0, every ``eval_every`` steps and at the end (0: never).

    ``window=(warmup, timed)``: time steps warmup+1 .. warmup+timed, split into data loading, VAE, text encoder and
    the rest (UNet forward/backward, optimizer). ``events`` receives (kind, start, end[, step, value]) with
    absolute time.time() stamps.
    """
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    events = events if events is not None else []
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.time()
    m = load_models(base, dev)
    tokenizer, text_encoder, vae, unet, noise_scheduler = (m[k] for k in ("tokenizer", "text_encoder", "vae", "unet",
                                                                           "noise_scheduler"))
    events.append(("load_models", t0, time.time()))

    torch.manual_seed(seed)  # the example's set_seed; the LoRA init draws below match sdloop's (same seed, order)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    dataset = ImageCaptionDataset(Path(data), train_items, resolution, flip_p, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    scale = float(vae.config.scaling_factor)
    num_t = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.prediction_type

    val_state: dict[str, Any] = {}

    def evaluate(step: int) -> float:
        start = time.time()
        if "feed" not in val_state:  # sdloop's evaluator over the same validation items, computed live
            from finetune.training.config import TrainConfig  # (imports timed apart: the benchmark excludes them)
            from finetune.data.check import Item
            from finetune.training.feed import TrainingFeed
            from finetune.training.validate import validation_loss_sum

            cfg = TrainConfig(resolution=resolution, batch_size=batch_size, use_cache=False, seed=seed,
                              augment=dict(val_augment or {}))
            items = [Item(**it["item"]) for it in val_items]
            comps = {"vae": vae, "text_encoders": [text_encoder], "tokenizers": [tokenizer]}
            val_state.update(items=items, fn=validation_loss_sum,
                             feed=TrainingFeed(items, Path(data), cfg, comps, "plain", device=dev, train=False,
                                               progress=False))
            events.append(("eval_import", start, time.time()))
        total, count = val_state["fn"](unet, noise_scheduler, val_state["feed"], val_state["items"], prediction_type,
                                       validation_timesteps, seed, dev)
        sync()
        val = total / count
        events.append(("eval", start, time.time(), step, val))
        log(f"plain  step {step:4d}  val_loss {val:.5f}")
        return val

    def batches():
        while True:
            yield from loader

    stream = batches()
    unet.train()
    if eval_every:
        evaluate(0)
    timers = {"data": 0.0, "vae": 0.0, "text_encoder": 0.0, "unet_opt": 0.0}
    win_start = win_end = None
    step_times: list[float] = []
    losses = []
    for step in range(1, steps + 1):
        if window and step == window[0] + 1:
            sync()
            win_start = time.perf_counter()
        timed = bool(window) and window[0] < step <= window[0] + window[1]
        a = time.perf_counter()
        batch = next(stream)
        pixels = batch["pixel_values"].to(dev)
        ids = batch["input_ids"].to(dev)
        if timed:
            sync()
        b = time.perf_counter()
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            latents = (dist.mean if latents_from == "mean" else dist.sample()) * scale
            if timed:
                sync()
            c = time.perf_counter()
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            if timed:
                sync()
            d = time.perf_counter()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, num_t, (latents.shape[0],), device=dev).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # the example logs the loss each step (a sync on GPU, as sdloop's)
        e = time.perf_counter()
        if timed:
            step_times.append(e - a)
            timers["data"] += b - a
            timers["vae"] += c - b
            timers["text_encoder"] += d - c
            timers["unet_opt"] += e - d
        if window and step == window[0] + window[1]:
            sync()
            win_end = time.perf_counter()
        if eval_every and (step % eval_every == 0 or step == steps):
            evaluate(step)
    out: dict[str, Any] = {"train_losses": losses, "steps": steps, "prediction_type": prediction_type}
    if window and win_start is not None and win_end is not None:
        elapsed = win_end - win_start
        out["window"] = {"warmup": window[0], "timed": window[1], "seconds": elapsed,
                         "steps_per_s": window[1] / elapsed, "step_times": step_times,
                         "share": {k: v / elapsed for k, v in timers.items()}, "seconds_by_part": timers}
    return out

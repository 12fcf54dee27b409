"""The phases of ``finetune.pretraining.pretrain``: data, VAE, latents, UNet, export (with its loss curves, samples and scores).

Each phase is a function of the config and the work folder; ``finetune.pretraining.pretrain.pretrain`` calls them in order and
records what each returned, so a resumed run skips the finished ones.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from sdloop.atomic import load_safetensors, save_safetensors, write_json_atomic
from sdloop.seeding import torch_generator

from finetune.pretraining.checkpoints import EMA, latest_checkpoint
from finetune.pretraining.pretrain import PretrainConfig, PretrainError, WorkDir, run_phase

SAMPLE_PROMPTS = (
    "a large red circle in the centre, white background", "a large blue square in the centre, grey background",
    "a large yellow triangle in the centre, black background", "a large green star in the centre, cyan background",
    "a small purple circle on the left, white background", "a small orange square on the right, black background",
    "a large blue triangle at the top, cyan background", "a small red star at the bottom, grey background",
)
SAMPLE_SEEDS = (0, 1, 2, 3)
EVAL_CAPTIONS_SEED = 20261  # the fixed caption set of the caption-following scores (not the training seed)


def load_data(cfg: PretrainConfig, progress: bool) -> dict[str, Any]:
    """Draw the synthetic images in memory (uint8, N x 3 x 64 x 64) with their captions and caption indices."""
    import numpy as np
    from tqdm.auto import tqdm

    from finetune.data.synth import draw_samples

    images = torch.empty((cfg.images, 3, 64, 64), dtype=torch.uint8)
    captions: list[str] = []
    for i, (img, cap) in enumerate(tqdm(draw_samples(cfg.images, seed=cfg.seed), total=cfg.images,
                                        desc="draw shapes", unit="img", disable=not progress)):
        images[i] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        captions.append(cap)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    return {"images": images, "captions": captions, "unique": unique,
            "caption_index": torch.tensor([index[c] for c in captions], dtype=torch.long)}


def _parts(cfg: PretrainConfig) -> Any:
    from finetune.pretraining.base import build_tiny_pipeline

    return build_tiny_pipeline(cfg.seed, vae_downsamplings=cfg.vae_downsamplings)


def _final(work: WorkDir, phase: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    found = latest_checkpoint(work.ckpt_root(phase))
    if found is None:
        raise PretrainError(f"the {phase} checkpoint in {work.root} is missing; start the pretraining again.")
    return found["weights"], found["ema"]


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def train_vae(cfg: PretrainConfig, work: WorkDir, data: dict[str, Any], progress: bool, budget_s: float,
              stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train the VAE to reconstruct the shapes: MSE on [-1, 1] plus ``vae_kl`` times the KL term (Adam)."""
    vae = _parts(cfg).vae
    vae.train()
    images = data["images"]
    named = dict(vae.named_parameters())
    ema = EMA(named, cfg.ema_decay)

    def step(i: int) -> float:
        g = torch_generator(cfg.seed, "vae", i)
        x = _to_unit(images[torch.randint(len(images), (cfg.vae_batch,), generator=g)])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        mse = F.mse_loss(rec, x)
        (mse + cfg.vae_kl * posterior.kl().mean()).backward()
        return float(mse.detach())

    def load(w: dict[str, Any], e: Optional[dict[str, Any]]) -> None:
        vae.load_state_dict(w)
        if e is not None:
            ema.load(e)

    return run_phase("vae", cfg, work, list(named.values()), cfg.vae_lr, step, vae.state_dict, load, progress,
                     budget_s, ema=ema, stop_after=stop_after)


def _shipped(work: WorkDir, phase: str) -> dict[str, Any]:
    """The weights a phase hands on: its EMA (when kept) over its last live weights."""
    weights, ema = _final(work, phase)
    return {**weights, **(ema or {})}


def _trained_vae(cfg: PretrainConfig, work: WorkDir) -> Any:
    vae = _parts(cfg).vae
    vae.load_state_dict(_shipped(work, "vae"))
    return vae.eval()


@torch.no_grad()
def encode_latents(cfg: PretrainConfig, work: WorkDir, data: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Encode every image once (posterior means); their spread sets ``scaling_factor``; measure reconstructions."""
    from tqdm.auto import tqdm

    from finetune.evaluation.shapecheck import caption_scores

    t0 = time.time()
    vae = _trained_vae(cfg, work)
    images = data["images"]
    chunks = []
    for s in tqdm(range(0, len(images), 256), desc="encode latents", unit="batch", disable=not progress):
        chunks.append(vae.encode(_to_unit(images[s:s + 256])).latent_dist.mean)
    latents = torch.cat(chunks)
    save_safetensors(work.latents_path, {"latents": latents})
    std, mean = float(latents.std()), float(latents.mean())
    k = min(512, len(images))  # reconstructions of the first images: error and what the checker reads back
    rec = vae.decode(latents[:k]).sample.clamp(-1, 1)
    mse = float(F.mse_loss(rec, _to_unit(images[:k])))
    scores = caption_scores(zip(_pil(rec), data["captions"][:k]))
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_mean": mean, "recon_mse": mse,
            "recon_scores": scores.shares, "seconds": round(time.time() - t0, 1)}


def _pil(x: torch.Tensor) -> list[Any]:
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def _text_inputs(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(cfg: PretrainConfig, work: WorkDir, data: dict[str, Any], progress: bool, budget_s: float,
               stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train the UNet (AdamW) to predict the noise on the cached latents; the shipped weights are its EMA."""
    pipe = _parts(cfg)
    unet, text_encoder, sched = pipe.unet, pipe.text_encoder, pipe.scheduler
    scale = work.read_progress()["latents"]["scaling_factor"]
    latents = load_safetensors(work.latents_path)[0]["latents"] * scale
    ids = _text_inputs(pipe.tokenizer, data["unique"] + [""])  # the last row: the empty caption
    empty = len(data["unique"])
    unet.train()
    text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.train_text_encoder:
        text_encoder.train()
    else:
        with torch.no_grad():
            embeddings = text_encoder(ids)[0]
    named = {f"unet.{k}": p for k, p in unet.named_parameters()}
    if cfg.train_text_encoder:
        named.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()})
    ema = EMA(named, cfg.ema_decay)
    caption_index = data["caption_index"]

    def step(i: int) -> float:
        g = torch_generator(cfg.seed, "unet", i)
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=g)
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cond_dropout
        rows = torch.where(drop, torch.full_like(idx, empty), caption_index[idx])
        noise = torch.randn(latents[idx].shape, generator=g)
        # offset noise: with 8x8 latents the mean of the noise leaks the background at high timesteps, and the
        # model learned to take it from the seed instead of the caption (measured: background 0.30, chance 0.25)
        noise = noise + cfg.noise_offset * torch.randn((cfg.unet_batch, noise.shape[1], 1, 1), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        cond = text_encoder(ids[rows])[0] if cfg.train_text_encoder else embeddings[rows]
        pred = unet(sched.add_noise(latents[idx], noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        return float(loss.detach())

    def weights() -> dict[str, Any]:
        return {k: p.detach() for k, p in named.items()}

    def load(w: dict[str, Any], e: Optional[dict[str, Any]]) -> None:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(w[k])
        if e is not None:
            ema.load(e)

    return run_phase("unet", cfg, work, list(named.values()), cfg.unet_lr, step, weights, load, progress,
                     budget_s, ema=ema, stop_after=stop_after)


def assemble(cfg: PretrainConfig, work: WorkDir, scaling_factor: float) -> Any:
    """The finished pipeline: trained VAE (with its scaling factor), EMA UNet, DPM-Solver++ for sampling."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = _parts(cfg)
    pipe.vae.load_state_dict(_shipped(work, "vae"))
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    chosen = _shipped(work, "unet")
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        part = {k[len(prefix):]: v for k, v in chosen.items() if k.startswith(prefix)}
        if part:
            module.load_state_dict(part, strict=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(cfg: PretrainConfig, work: WorkDir, data: dict[str, Any], progress_state: dict[str, Any],
           seconds_this_process: float, progress: bool) -> dict[str, Any]:
    """Write the diffusers folder into ``work.out`` part by part (model_index.json last), then the PNGs and the
    record ``sdloop_base.json`` with the caption-following scores of the result."""
    import shutil
    import tempfile

    from finetune.evaluation.shapecheck import chance_levels, eval_captions, pipeline_images, caption_scores
    from finetune.training.visuals import image_grid

    t0 = time.time()
    pipe = assemble(cfg, work, progress_state["latents"]["scaling_factor"])
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=work.out))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for part in sorted(p.name for p in tmp.iterdir() if p.is_dir()):
            if (work.out / part).exists():
                shutil.rmtree(work.out / part)
            os.replace(tmp / part, work.out / part)
        os.replace(tmp / "model_index.json", work.out / "model_index.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [pipeline_images(pipe, [p] * len(SAMPLE_SEEDS), list(SAMPLE_SEEDS), guidance=GUIDANCE)
            for p in SAMPLE_PROMPTS]
    image_grid(rows, list(SAMPLE_PROMPTS), [f"seed {s}" for s in SAMPLE_SEEDS], work.root / "samples.png",
               title="sdloop tiny drawing base: samples")
    captions = eval_captions(cfg.eval_prompts, EVAL_CAPTIONS_SEED)
    scores = caption_scores(zip(pipeline_images(pipe, captions, list(range(len(captions))), guidance=GUIDANCE),
                                captions))
    loss_curves_png(work.metrics(), work.root / "loss_curves.png")
    phases = {p: progress_state[p] for p in ("vae", "latents", "unet")}
    wall = sum(float(v.get("seconds", 0)) for v in phases.values()) + time.time() - t0
    recorded = json.loads(work.config_path.read_text())
    record = {
        "kind": "tiny-sd1-drawing", "command": recorded["command"], "config": recorded["config"],
        "notes": recorded.get("notes", []),
        "seed": cfg.seed, "data": {"generator": "finetune.data.synth.draw_samples", "images": cfg.images,
                                   "seed": cfg.seed, "size": 64, "unique_captions": len(data["unique"])},
        "repeat_command": " ".join(["sdloop", "base", "pretrain", "OUT", "--seed", str(cfg.seed), "--images",
                                    str(cfg.images), "--vae-steps", str(cfg.vae_steps), "--unet-steps",
                                    str(cfg.unet_steps), "--vae-downsamplings", str(cfg.vae_downsamplings),
                                    "--noise-offset", str(cfg.noise_offset),
                                    "--threads", str(cfg.threads)]
                                   + (["--train-text-encoder"] if cfg.train_text_encoder else [])),
        "phases": phases, "wall_seconds": round(wall, 1), "threads": cfg.threads,
        "scores": {"captions": len(captions), "captions_seed": EVAL_CAPTIONS_SEED, "steps": 20,
                   "guidance_scale": GUIDANCE, **scores.as_dict(), "chance": chance_levels()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(work.out / "sdloop_base.json", record)
    return record


GUIDANCE = 5.0


def loss_curves_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two panels: the VAE's reconstruction MSE and the UNet's noise-prediction loss against their steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdloop.atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, phase, label in zip(axes, ("vae", "unet"), ("VAE reconstruction MSE", "UNet noise-prediction MSE")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("phase") == phase]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", color="#3182bd", lw=1.2, ms=2)
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("sdloop base pretrain: loss curves (mean of 20 steps)")
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

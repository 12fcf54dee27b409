"""The trainer's file phases: the files a run starts with, and the result files it ends with.

Start files (config, data report, split) are written only once set-up has succeeded, and never again on --resume, so
a failed start leaves nothing that looks like a run, and a resumed run keeps the record of what it started with.
The manifest is written last and atomically: its presence means the run finished and its LoRA files are complete.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sdloop.atomic import load_safetensors, write_json_atomic, write_text_atomic
from sdloop.provenance import git_commit, package_versions
from sdloop.runfolder import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, Manifest, RunFolder, portable_location

from finetune import __version__
from finetune.training.config import TrainConfig
from finetune.training.lora import save_diffusers_lora, save_kohya_lora, split_components
from finetune.training.visuals import loss_curve_png


def write_start_files(run: RunFolder, cfg: TrainConfig, data: Any) -> None:
    """config.yaml (fully resolved), data_report.json and split.json of a run that starts from step 0."""
    write_text_atomic(run.config, cfg.to_yaml())
    data.report.save(run.data_report)
    write_json_atomic(run.split, {"train": [i.path for i in data.train_items],
                                  "validation": [i.path for i in data.val_items]}, indent=1)


def append_metrics(run: RunFolder, row: dict[str, Any]) -> None:
    """One JSON line in metrics.jsonl, flushed (a killed run loses at most the line being written)."""
    with open(run.metrics, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def truncate_metrics(run: RunFolder, step: int) -> None:
    """Drop metric rows written after ``step`` (a resumed run replays them)."""
    rows = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    write_text_atomic(run.metrics, "".join(json.dumps(r) + "\n" for r in rows))


def write_results(run: RunFolder, cfg: TrainConfig, data: Any, m: Any, state: Any, step: int, wall: float,
                  startup: float) -> Manifest:
    """The LoRA files of the best step, the loss curve and the manifest."""
    has_val = bool(data.val_items)
    best_file = run.best_lora_checkpoint
    best = load_safetensors(best_file)[0] if best_file.is_file() and has_val else m.result_weights()
    best_step = state.best_step if has_val else step
    parts = split_components(best)
    unet_sd, te_sd, te2_sd = (parts.get(c, {}) for c in ("unet", "text_encoder", "text_encoder_2"))
    family = m.family
    meta = {"base_model": cfg.base, "base_fingerprint": m.base_fingerprint, "rank": cfg.rank, "alpha": cfg.alpha,
            "steps": best_step, "sdloop_version": __version__, "prediction_type": m.prediction_type,
            "resolution": cfg.resolution, "family": family.name}
    save_diffusers_lora(run.diffusers_lora, unet_sd, te_sd, cfg.rank, cfg.alpha, cfg.target_modules,
                        cfg.text_encoder_target_modules, meta, text_encoder_2_sd=te2_sd)
    save_kohya_lora(run.kohya_lora, unet_sd, te_sd, cfg.rank, cfg.alpha, meta, family, text_encoder_2_sd=te2_sd)
    rows = run.read_metrics()
    loss_curve_png(rows, run.loss_curve, best_step, title=f"{run.path.name}: {state.stopped}",
                   train_label="train loss (min-SNR weighted)" if cfg.snr_gamma else "train loss")
    base, base_rel = portable_location(cfg.base, run.path)
    dataset, dataset_rel = portable_location(cfg.data, run.path)
    manifest = Manifest(
        base_model=base, base_model_relative=base_rel, base_fingerprint=m.base_fingerprint,
        dataset=dataset, dataset_relative=dataset_rel, dataset_fingerprint=data.fingerprint,
        pipeline_class=m.pipeline_class, prediction_type=m.prediction_type, resolution=cfg.resolution,
        family=family.name,
        items={"usable": len(data.report.items), "train": len(data.train_items), "validation": len(data.val_items),
               "skipped": len(data.report.skipped)},
        best_step=best_step, best_val_loss=state.best_val, final_step=step, stopped=state.stopped,
        stop_reason=state.stop_reason,
        metrics={"first_val_loss": next((r["val_loss"] for r in rows if "val_loss" in r), None),
                 "last_train_loss": next((r["train_loss"] for r in reversed(rows) if "lr" in r), None)},
        lora={"diffusers": f"lora/{DIFFUSERS_WEIGHT_NAME}", "kohya": f"lora/{KOHYA_WEIGHT_NAME}", "rank": cfg.rank,
              "alpha": cfg.alpha, "target_modules": list(cfg.target_modules),
              "text_encoder": bool(cfg.train_text_encoder)},
        wall_seconds=round(wall, 2), startup_seconds=round(startup, 2), world_size=m.world,
        packages=package_versions(), git_commit=git_commit(), sdloop_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    run.save_manifest(manifest)
    return manifest

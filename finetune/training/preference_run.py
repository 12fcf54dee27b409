"""Preference training inside the trainer: the data phase, the feeds of records, the frozen reference, the step and
the validation of ``objective=dpo|kto`` (the losses themselves are ``finetune.training.preference``).

The trainer's phases stay the same (``finetune.training.train``); where a preference run differs, the phase hands
over to a function here:

- data: ``preference_data`` reads the preference dataset (``finetune.data.preference``), splits it by prompt, and
  gives the trainer the images the records use (each with its record's prompt as caption); ``sft`` on a preference
  dataset trains on the liked images only (chosen, desirable).
- feeds: ``wrap_feeds`` puts a ``RecordFeed`` over the image feeds: its batches are batches of records (a DPO record
  is two images, so a batch of B pairs runs 2B images through the UNet), its images are never augmented (both sides
  of a pair must see the same crop).
- reference: ``add_reference`` copies the challenger's starting adapter (``init_lora``: the champion's LoRA; else a
  fresh adapter, B = 0, i.e. the base) into a second, frozen peft adapter named ``reference``; its prediction is
  taken with that adapter active and no gradient. At step 0 the two are the same weights: the DPO loss is log 2 and
  every KTO reward 0 (tested).
- conditioning: the family's (``finetune.training.feed.unet_inputs``), so SD 1.x/2.x and SDXL train alike.
- step and validation: the same noise and timestep for both images of a pair and for model and reference; uniform
  timesteps in training, the fixed timesteps and item-keyed noise of the plain validation in validation, where the
  loss of the whole validation split is one number (KTO's reference point over the whole split), with the implicit
  reward accuracy logged beside it (``val_reward_accuracy``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from finetune.data.augment import epoch_batches, item_buckets
from finetune.data.preference import PreferenceRecord, explain_empty_preference_validation, record_items, sft_items
from finetune.training.config import TrainConfig
from finetune.training.preference import PreferenceLoss, denoising_error, dpo_loss, kl_reference_point, kto_loss
from finetune.training.setup import Data, Event, SetupError, timed

REFERENCE = "reference"
PREFERENCE_FORMAT_HINT = ("a folder with preferences.jsonl: pairs {\"prompt\", \"chosen\", \"rejected\"} for dpo, "
                          "singles {\"prompt\", \"image\", \"label\": \"desirable\"|\"undesirable\"} for kto "
                          "(or Pick-a-Pic's layout)")


@dataclass
class PreferenceSplit:
    """The records a dpo/kto run trains and validates on, each with the indices of its images in the item lists."""

    objective: str
    train: list[PreferenceRecord]
    train_refs: list[list[int]]
    val: list[PreferenceRecord]
    val_refs: list[list[int]]
    last: dict[str, float] = field(default_factory=dict)   # what the last validation measured besides the loss


def units(records: list[PreferenceRecord], objective: str) -> list[PreferenceRecord]:
    """What an objective learns from: dpo the pairs; kto the singles, and each pair as a desirable chosen image and
    an undesirable rejected one (Li et al. 2024 train KTO on Pick-a-Pic's pairs this way)."""
    if objective == "dpo":
        return [r for r in records if r.kind == "pair"]
    out = []
    for r in records:
        if r.kind == "single":
            out.append(r)
        else:
            out.append(dataclasses.replace(r, kind="single", image=r.chosen, desirable=True, chosen="", rejected=""))
            out.append(dataclasses.replace(r, kind="single", image=r.rejected, desirable=False, chosen="",
                                           rejected=""))
    return out


def preference_data(cfg: TrainConfig, run: Any, resume: bool, progress: bool, event: Optional[Event],
                    warn: bool = True) -> Data:
    """The trainer's data phase for a preference dataset (any objective) or a dpo/kto run (which needs one)."""
    from finetune.data.check import DataReport, DatasetError, _dataset_root, preference_report
    from finetune.data.preference import find_preference_file, scan_preferences
    from finetune.training.setup import warn_upscale

    try:
        root = _dataset_root(cfg.data)
    except DatasetError as e:
        raise SetupError(str(e)) from None
    name = find_preference_file(root)
    if name is None:
        raise SetupError(f"objective={cfg.objective} learns from preferences, and {cfg.data} is a plain captioned "
                         f"dataset; pass {PREFERENCE_FORMAT_HINT}, or use objective=sft.")
    if cfg.objective != "sft" and cfg.train_text_encoder:
        raise SetupError(f"objective={cfg.objective} trains the UNet's LoRA against a frozen reference UNet; set "
                         "train_text_encoder=false.")
    with timed(event, "scan_dataset"):
        scan = scan_preferences(root, name, cfg.data_config, progress=progress)
    report = preference_report(scan, root, cfg.data_config)
    if resume and run.data_report.is_file():
        try:
            before = DataReport.load(run.data_report).fingerprint
        except DatasetError:
            before = ""
        if before and before != report.fingerprint:
            raise SetupError(f"the preference dataset {cfg.data} changed since {run.path} started; restore it, or "
                             "train a new run with another --output.")
    records = scan.records if cfg.objective == "sft" else units(scan.records, cfg.objective)
    if not records:
        have = f"{scan.stats['pairs']} pairs and {scan.stats['singles']} singles usable"
        need = "pairs (chosen/rejected)" if cfg.objective == "dpo" else "usable preference lines"
        raise SetupError(f"objective={cfg.objective} needs {need}; {cfg.data} has {have}: run `sdloop data check "
                         f"{cfg.data}` to see why lines were skipped" +
                         ("; with singles only use objective=kto." if cfg.objective == "dpo" and scan.stats["singles"]
                          else "."))
    from finetune.data.preference import split_preferences

    train, val = split_preferences(records, cfg.data_config)
    if not val and cfg.data_config.validation_split > 0:
        raise SetupError(explain_empty_preference_validation(records, cfg.data_config))
    if cfg.objective == "sft":
        train_items, val_items = sft_items(train, scan.images), sft_items(val, scan.images)
        if not train_items or (not val_items and cfg.data_config.validation_split > 0):
            raise SetupError(f"objective=sft trains on the liked images (chosen, desirable) and the "
                             f"{'training' if not train_items else 'validation'} split of {cfg.data} has none; use "
                             "objective=kto to learn from undesirable images too.")
        if warn:
            warn_upscale(train_items + val_items, cfg.resolution)
        return Data(report, train_items, val_items, report.fingerprint)
    train_items, train_refs = record_items(train, scan.images)
    val_items, val_refs = record_items(val, scan.images)
    if cfg.objective == "dpo":
        _check_pair_buckets(cfg, train + val, train_items + val_items, train_refs + [
            [i + len(train_items) for i in r] for r in val_refs])
    if warn:
        warn_upscale(train_items + val_items, cfg.resolution)
    data = Data(report, train_items, val_items, report.fingerprint)
    data.preference = PreferenceSplit(cfg.objective, train, train_refs, val, val_refs)
    return data


def _check_pair_buckets(cfg: TrainConfig, records: list[PreferenceRecord], items: list[Any],
                        refs: list[list[int]]) -> None:
    """Both images of a pair must land in one bucket: they share the noise, so their latents must have one shape."""
    buckets = item_buckets([(it.width, it.height) for it in items], cfg.resolution, cfg.augment)
    for rec, (a, b) in zip(records, refs):
        if buckets[a] != buckets[b]:
            raise SetupError(f"{rec.where}: the chosen image ({items[a].width}x{items[a].height}) and the rejected "
                             f"one ({items[b].width}x{items[b].height}) fall in different aspect buckets, and a pair "
                             "shares its noise; give both one aspect ratio, or set augment.bucketing=false to train "
                             "on centre squares.")


# -- feeds -------------------------------------------------------------------------------------------------------

class RecordFeed:
    """Batches of preference records over an image feed (``TrainingFeed(train=False)``: no augmentation).

    ``epoch_batches`` gives batches of record indices (one bucket each, shuffled per (seed, epoch) when training);
    ``load_batch`` gives {"latents", "encoder_hidden_states", "weight"} with, for dpo, the chosen images first and
    the rejected ones after them (2B rows), and for kto a ``desirable`` flag per row.
    """

    def __init__(self, images: Any, records: list[PreferenceRecord], refs: list[list[int]], objective: str,
                 cfg: TrainConfig, train: bool) -> None:
        self.images, self.records, self.refs = images, records, refs
        self.objective, self.cfg, self.train = objective, cfg, train
        self.items = images.items
        self.buckets = [images.buckets[r[0]] for r in refs]

    def __len__(self) -> int:
        return len(self.records)

    def prepare(self) -> Any:
        return self.images.prepare()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.buckets, self.cfg.batch_size, self.cfg.seed, epoch if self.train else 0,
                             shuffle=self.train)

    def load_batch(self, indices: list[int], epoch: int) -> dict[str, Any]:
        refs = [self.refs[i] for i in indices]
        batch = self.images.load_batch([r[0] for r in refs], 0)
        if self.objective == "dpo":
            other = self.images.load_batch([r[1] for r in refs], 0)
            batch = {k: torch.cat([batch[k], other[k]]) for k in batch}  # every tensor: latents, states, time ids
        device = batch["latents"].device
        batch["weight"] = torch.tensor([self.records[i].weight for i in indices], device=device)
        batch["desirable"] = torch.tensor([self.records[i].desirable for i in indices], device=device)
        return batch


def wrap_feeds(cfg: TrainConfig, data: Data) -> None:
    """Replace the image feeds of a dpo/kto run by record feeds over them (called by ``build_feeds``)."""
    p = data.preference
    data.train_feed = RecordFeed(data.train_feed, p.train, p.train_refs, p.objective, cfg, train=True)
    data.val_feed = RecordFeed(data.val_feed, p.val, p.val_refs, p.objective, cfg, train=False)


# -- the reference ----------------------------------------------------------------------------------------------

def add_reference(unet: Any, cfg: TrainConfig) -> None:
    """Freeze a copy of the challenger's starting adapter as the ``reference`` adapter (before any step).

    Called after ``init_lora`` was loaded, so the reference holds the champion's LoRA exactly; without init_lora the
    fresh adapter has B = 0 and the reference is the base. peft's ``set_adapter`` switches which adapter runs (and
    sets requires_grad on the active one only), so the challenger's adapter is made active again here.
    """
    from peft.utils import set_peft_model_state_dict

    from finetune.training.lora import lora_config, lora_state_dict

    start = lora_state_dict(unet)
    with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(lora_config(cfg.rank, cfg.alpha, 0.0, list(cfg.target_modules)), adapter_name=REFERENCE)
    result = set_peft_model_state_dict(unet, start, adapter_name=REFERENCE)
    if [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]:
        raise SetupError("the reference adapter does not match the challenger's; report this as a bug.")
    unet.set_adapter("default")
    for name, p in unet.named_parameters():
        if f".{REFERENCE}." in name:
            p.requires_grad_(False)


@contextlib.contextmanager
def reference_mode(unet: Any) -> Iterator[None]:
    """Within the block the UNet runs the frozen reference adapter, in eval mode, without gradients."""
    was = unet.training
    unet.eval()
    unet.set_adapter(REFERENCE)
    try:
        with torch.no_grad():
            yield
    finally:
        unet.set_adapter("default")
        unet.train(was)


# -- the loss of a batch -----------------------------------------------------------------------------------------

def errors(m: Any, batch: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor,
           model: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row denoising errors of the model and of the reference on the same noisy latents (reference first).

    The UNet is conditioned the family's way (``unet_inputs``: SDXL's pooled embedding and size/crop time ids too)."""
    from finetune.training.feed import unet_inputs
    from finetune.training.validate import training_target

    latents = batch["latents"].to(m.device, torch.float32)
    kwargs = unet_inputs(m.family, batch, None, m.device)
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(m.noise_scheduler, m.prediction_type, latents, noise, timesteps)
    with reference_mode(m.raw_unet), m.autocast:
        ref = denoising_error(m.raw_unet(noisy, timesteps, **kwargs).sample, target)
    with m.autocast:
        pred = (model or m.unet)(noisy, timesteps, **kwargs).sample
    return denoising_error(pred, target), ref


def objective_loss(objective: str, cfg: TrainConfig, model_err: torch.Tensor, ref_err: torch.Tensor,
                   batch: dict[str, Any], z0: Optional[torch.Tensor] = None) -> PreferenceLoss:
    """The configured objective on per-row errors (dpo rows: chosen first, then rejected)."""
    beta, weight = cfg.preference_beta(), batch["weight"]
    if objective == "dpo":
        n = model_err.shape[0] // 2
        return dpo_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], beta, weight)
    return kto_loss(model_err, ref_err, batch["desirable"], beta, cfg.desirable_weight, cfg.undesirable_weight,
                    weight, z0=z0)


def preference_step(m: Any, stream: Iterator[tuple[int, int, list[int]]], step: int, cfg: TrainConfig,
                    state: Any) -> float:
    """One optimizer step of dpo/kto (``finetune.training.step.train_step``'s twin): returns the mean loss."""
    from sdloop.seeding import seed_torch, torch_generator

    from finetune.training.step import NonFiniteLoss

    acc, device = m.accelerator, m.device
    objective = cfg.objective
    step_loss = 0.0
    seed_torch("lora-dropout", cfg.seed, step, m.rank)
    gen = torch_generator("train-step", cfg.seed, step, m.rank)
    for _ in range(cfg.gradient_accumulation):
        epoch, pos, indices = next(stream)
        with acc.accumulate(m.unet):
            batch = m.train_feed.load_batch(indices, epoch)
            shape = batch["latents"].shape
            n = len(indices)  # records: a pair's two images share noise and timestep (Wallace et al., Eq. 14)
            noise = torch.randn((n, *shape[1:]), generator=gen)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((n, shape[1], 1, 1), generator=gen)
            timesteps = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
            reps = shape[0] // n
            noise, timesteps = noise.repeat(reps, 1, 1, 1).to(device), timesteps.repeat(reps).to(device)
            model_err, ref_err = errors(m, batch, noise, timesteps)
            z0 = None
            if objective == "kto":  # the reference point over every process's batch, as the authors' code does
                z0 = acc.reduce(kl_reference_point(model_err.detach(), ref_err), "mean").clamp(min=0)
            out = objective_loss(objective, cfg, model_err, ref_err, batch, z0)
            if not torch.isfinite(out.loss):
                raise NonFiniteLoss(float(out.loss.detach()))
            acc.backward(out.loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(m.trainable, cfg.max_grad_norm)
            m.optimizer.step()
            if acc.sync_gradients:
                m.lr_scheduler.step()
            m.optimizer.zero_grad(set_to_none=True)
        step_loss += float(out.loss.detach()) / cfg.gradient_accumulation
        state.epoch, state.pos = epoch, pos + 1
    if m.ema is not None:
        m.ema.update(step + 1)
    return float(acc.reduce(torch.tensor(step_loss, device=device), "mean"))


@torch.no_grad()
def validate_preference(m: Any, data: Data, cfg: TrainConfig) -> float:
    """The objective's loss over the whole validation split at fixed timesteps and item-keyed noise.

    Every (record, timestep) gets the noise ``item_noise(chosen or image sha, timestep index)``, the same whatever
    the batching; KTO's reference point is taken over the whole split. Every process computes the whole split (it
    is small), so the number is the same everywhere. ``data.preference.last`` gets the implicit reward accuracy.
    """
    from finetune.training.step import maybe_ema
    from finetune.training.validate import fixed_timesteps, item_noise

    feed, pref = data.val_feed, data.preference
    ts = fixed_timesteps(m.noise_scheduler.config.num_train_timesteps, cfg.validation_timesteps)
    model_errs: list[torch.Tensor] = []
    ref_errs: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    desirable: list[torch.Tensor] = []
    was = m.raw_unet.training
    with maybe_ema(m.ema):
        m.raw_unet.eval()
        for indices in feed.epoch_batches(0):
            batch = feed.load_batch(indices, 0)
            shape = batch["latents"].shape
            reps = shape[0] // len(indices)
            for j, t in enumerate(ts):
                noise = torch.stack([item_noise(feed.items[feed.refs[i][0]].sha256, j, tuple(shape[1:]), cfg.seed)
                                     for i in indices]).repeat(reps, 1, 1, 1).to(m.device)
                timesteps = torch.full((shape[0],), t, device=m.device, dtype=torch.long)
                me, re = errors(m, batch, noise, timesteps, model=m.raw_unet)
                n = len(indices)
                model_errs.append(me.view(reps, n).T)
                ref_errs.append(re.view(reps, n).T)
                weights.append(batch["weight"])
                desirable.append(batch["desirable"])
        m.raw_unet.train(was)
    me, re = torch.cat(model_errs), torch.cat(ref_errs)   # [N, reps]: column 0 chosen/image, column 1 rejected
    whole = {"weight": torch.cat(weights), "desirable": torch.cat(desirable)}
    if pref.objective == "dpo":
        out = objective_loss("dpo", cfg, torch.cat([me[:, 0], me[:, 1]]), torch.cat([re[:, 0], re[:, 1]]), whole)
    else:
        out = objective_loss("kto", cfg, me[:, 0], re[:, 0], whole)
    pref.last = {"val_reward_accuracy": round(out.accuracy, 4), "val_reward": out.reward}
    return float(out.loss)


def validation_extras(data: Data) -> dict[str, float]:
    """What the last validation measured besides the loss (empty for plain runs), for metrics.jsonl."""
    pref = getattr(data, "preference", None)
    return dict(pref.last) if pref is not None else {}

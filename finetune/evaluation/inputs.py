"""What an evaluation looks at: the prompt set, the seeds, the reference images, and the generated images, which are
kept in the run folder (``eval/images/<model>/``) under a key of everything that changes them and reused when the
same images are asked for again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image

from sdloop.atomic import atomic_path, load_safetensors, save_safetensors
from sdloop.errors import UserError
from sdloop.provenance import file_digest
from sdloop.runfolder import RunFolder
from sdloop.seeding import derive_seed

IMAGE_KEY_VERSION = 1
REFERENCE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class EvalError(UserError):
    """An evaluation cannot start: no prompts, no reference images, a missing file; the message says what to pass."""


@dataclass
class Model:
    """One model under evaluation: a finished run with its LoRA (``lora=True``) or its base alone."""

    label: str            # "base", "finetuned", "a", "b": the key in eval.json
    title: str            # what the report calls it
    run: RunFolder
    lora: bool
    _identity: Optional[dict[str, Any]] = field(default=None, init=False, repr=False, compare=False)

    @property
    def images_dir(self) -> Path:
        return self.run.eval_dir / "images" / ("finetuned" if self.lora else "base")

    def identity(self) -> dict[str, Any]:
        """What makes this model's images what they are: the base's fingerprint and the LoRA's bytes."""
        from sdloop.pipelines import fingerprint_dir

        if self._identity is None:
            base = self.run.base_model()
            fingerprint = (fingerprint_dir(Path(base)) if Path(base).is_dir()
                           else self.run.manifest().base_fingerprint)
            self._identity = {"base_model": base, "base_fingerprint": fingerprint,
                              "lora": str(self.run.diffusers_lora) if self.lora else None,
                              "lora_sha256": file_digest(self.run.diffusers_lora) if self.lora else None}
        return self._identity


@dataclass
class Generation:
    """How images are made: the same for every model of one evaluation."""

    prompts: list[str]
    seeds: list[int]          # one per image; image i shows prompts[i % len(prompts)]
    steps: int
    guidance: float
    resolution: int
    prompt_source: str

    @property
    def n(self) -> int:
        return len(self.seeds)

    def prompt_index(self, i: int) -> int:
        return i % len(self.prompts)


@dataclass
class GenImage:
    prompt_index: int
    seed: int
    path: Path
    reused: bool


@dataclass
class Reference:
    images: list[Any]
    captions: list[Optional[str]]
    files: list[str]           # relative to root
    root: Path
    source: str
    skipped: list[str] = field(default_factory=list)


def _data_report_captions(run: RunFolder) -> dict[str, str]:
    try:
        report = json.loads(run.data_report.read_text(encoding="utf-8"))
        return {it["path"]: it["caption"] for it in report.get("items", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise EvalError(f"{run.data_report} is missing or damaged; pass --prompts FILE (one prompt a line).") \
            from None


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"prompt file {p} does not exist; pass a text file with one prompt a line.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read the prompt file {p} ({type(e).__name__}); pass a UTF-8 text file.") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise EvalError(f"prompt file {p} holds no prompts; write one prompt a line.")
    return prompts


def default_prompts(run: RunFolder) -> list[str]:
    """The captions of the run's validation split, each once, in split order."""
    captions = _data_report_captions(run)
    prompts = list(dict.fromkeys(captions[p] for p in run.read_split()["validation"] if p in captions))
    if not prompts:
        recorded = run.read_eval_defaults()  # a run without a validation split may say what to prompt with
        if recorded and recorded["prompts"]:
            return list(dict.fromkeys(recorded["prompts"]))
        raise EvalError(f"{run.path} has no validation captions to prompt with; pass --prompts FILE.")
    return prompts


def default_n(prompts: Sequence[str], minimum: int = 16) -> int:
    """At least ``minimum`` images, a whole number per prompt, every prompt at least once."""
    p = len(prompts)
    return p * max(1, -(-minimum // p))


def make_seeds(n: int, seed: int) -> list[int]:
    """The seed of each of n images (32-bit, so people can type them), from sdloop's one seeding scheme."""
    return [derive_seed(seed, "eval-image", i) % 2**32 for i in range(n)]


def reference_set(run: RunFolder, reference: Optional[str | Path]) -> Reference:
    """Reference images: ``reference`` (a folder, searched recursively) or the run's validation split."""
    from finetune.data.check import load_image

    recorded = run.read_eval_defaults() if reference is None and not run.read_split()["validation"] else None
    if recorded is not None:  # no validation split, but the run's maker said which images to compare with
        reference = recorded["reference"]
    if reference is None:
        root, files = run.dataset(), list(run.read_split()["validation"])
        captions_of = _data_report_captions(run)
        source = f"validation split of {run.path} ({root})"
        if not files:
            raise EvalError(f"{run.path} has no validation split to compare with; pass --reference DIR.")
    else:
        root = Path(reference).expanduser()
        if not root.is_dir():
            raise EvalError(f"reference folder {root} does not exist; pass a folder of images.")
        files = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                       for d, _, names in os.walk(root) for f in names
                       if f.lower().endswith(REFERENCE_EXTENSIONS) and not f.startswith("."))
        captions_of, source = {}, str(root.resolve())
    images, kept, skipped = [], [], []
    for rel in files:
        try:
            images.append(load_image(root, rel))
            kept.append(rel)
        except UserError as e:
            skipped.append(f"{rel}: {str(e).splitlines()[0]}")
    if len(images) < 2:
        raise EvalError(f"FID and KID need at least 2 reference images, {source} has {len(images)} usable; "
                        "pass --reference DIR with more.")
    return Reference(images, [captions_of.get(r) for r in kept], kept, Path(root).resolve(), source, skipped)


def image_key(model: dict[str, Any], gen: Generation, i: int) -> str:
    """Everything that changes image i: the model, the prompt, the seed, the sampler settings, the libraries."""
    return hashlib.sha256(json.dumps({
        "v": IMAGE_KEY_VERSION, "base": model["base_fingerprint"], "lora": model["lora_sha256"],
        "prompt": gen.prompts[gen.prompt_index(i)], "seed": gen.seeds[i], "steps": gen.steps,
        "guidance": gen.guidance, "size": gen.resolution, "diffusers": _version("diffusers"),
        "torch": _version("torch").split("+")[0]}, sort_keys=True).encode()).hexdigest()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, ValueError):
        return False


def image_paths(model: Model, gen: Generation) -> list[Path]:
    """Where each of the model's images for ``gen`` is (or will be) kept."""
    ident = model.identity()
    return [model.images_dir / f"{image_key(ident, gen, i)[:24]}.png" for i in range(gen.n)]


def generate(models: Sequence[Model], gen: Generation, progress: bool = True, batch: int = 8
             ) -> dict[str, list[GenImage]]:
    """Images of every model for every (prompt, seed), from the cache where they exist.

    A run's base and fine-tuned model share one loaded pipeline (the LoRA adapter switched off for the base), so
    both use the same scheduler, steps and guidance, and the base images are exactly those of the base alone.
    """
    import torch
    from tqdm import tqdm

    out: dict[str, list[GenImage]] = {}
    todo: dict[str, list[int]] = {}
    for m in models:
        paths = image_paths(m, gen)
        out[m.label] = [GenImage(gen.prompt_index(i), gen.seeds[i], p, p.is_file() and _readable(p))
                        for i, p in enumerate(paths)]
        todo[m.label] = [i for i, g in enumerate(out[m.label]) if not g.reused]
    pipes: dict[str, Any] = {}
    for m in models:
        missing = todo[m.label]
        if not missing:
            continue
        pipe = pipes.get(str(m.run.path.resolve()))
        if pipe is None:
            pipe = pipes[str(m.run.path.resolve())] = _load(m.run)
        if m.lora:
            pipe.enable_lora()
        else:
            pipe.disable_lora()
        m.images_dir.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(missing), desc=f"generating {m.title}", unit="img", disable=not progress) as bar:
            for p in sorted({gen.prompt_index(i) for i in missing}):
                mine = [i for i in missing if gen.prompt_index(i) == p]
                for start in range(0, len(mine), batch):
                    chunk = mine[start:start + batch]
                    generators = [torch.Generator(device="cpu").manual_seed(gen.seeds[i]) for i in chunk]
                    images = pipe(gen.prompts[p], num_inference_steps=gen.steps, guidance_scale=gen.guidance,
                                  height=gen.resolution, width=gen.resolution, generator=generators,
                                  num_images_per_prompt=len(chunk)).images
                    for i, im in zip(chunk, images):
                        with atomic_path(out[m.label][i].path, fsync=False) as tmp:
                            im.save(tmp, format="PNG")
                    bar.update(len(chunk))
    return out


def _load(run: RunFolder) -> Any:
    """The run's pipeline with its LoRA, quietly (the evaluation draws its own progress bars)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        return run.load_pipeline(lora=True)
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()


def scheduler_name(run: RunFolder) -> str:
    base = Path(run.base_model())
    try:
        return json.loads((base / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        return "the base pipeline's scheduler"


def open_images(paths: Sequence[Path]) -> list[Any]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def pixel_key(image: Any) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:32]


class FeatureCache:
    """Features of images by pixel hash, one safetensors file per feature network (keyed by its SHA-1)."""

    def __init__(self, folder: Path, network_sha1: str) -> None:
        self.path = Path(folder) / f"features-{network_sha1[:16]}.safetensors"
        self.store: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.store = load_safetensors(self.path)[0]
            except UserError:
                self.store = {}

    def features(self, net: Any, images: Sequence[Any], desc: str, progress: bool) -> Any:
        import torch

        from finetune.evaluation.metrics import run_network

        keys = [pixel_key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            new = run_network(net, [images[i] for i in missing], desc=desc, progress=progress)
            for i, row in zip(missing, new):
                self.store[keys[i]] = row.clone()
            try:
                save_safetensors(self.path, self.store, fsync=False)
            except UserError:
                pass  # a cache that cannot be written only costs time
        return torch.stack([self.store[k].double() for k in keys])

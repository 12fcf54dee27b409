"""Loading base pipelines, for every stage: a local diffusers folder or a hub id, one error type with a remedy.

A stage never reaches for ``from_pretrained`` itself: it calls ``resolve_base`` / ``load_pipeline`` /
``load_components`` here, so every stage gives the same one-line message for a folder that is not a pipeline, a
path that does not exist or a hub id that cannot be reached, and every stage fingerprints a base the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from sdloop.errors import UserError


class BaseModelError(UserError):
    """The base pipeline cannot be found or is not a diffusers pipeline; the message says what to do."""


@dataclass
class BaseInfo:
    """What a stage needs to know about a base pipeline without loading its weights."""

    source: str
    local_dir: Optional[Path]
    fingerprint: str
    pipeline_class: str
    prediction_type: str
    family: str = "sd1"       # sdloop.families name: sd1, sd2, sdxl


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def resolve_base(source: str) -> Path:
    """Return a local diffusers folder for ``source`` (a path, or a hub id downloaded to the HF cache).

    Raises BaseModelError with a remedy when the folder is not a diffusers pipeline or the id cannot be reached.
    """
    if not source:
        raise BaseModelError("no base model given; pass --base DIR (make one offline with `sdloop base tiny DIR`).")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BaseModelError(f"{path} is a file; --base takes a diffusers folder (with model_index.json). "
                                 "Single-file checkpoints: convert them with diffusers' from_single_file first.")
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is not a diffusers pipeline folder: model_index.json is missing. "
                                 "Make one with `sdloop base tiny DIR` or download one with "
                                 "`huggingface-cli download ID --local-dir DIR`.")
        return path
    if not _looks_like_hub_id(source):
        raise BaseModelError(f"{source} does not exist. Pass a diffusers folder (make an offline one with "
                             "`sdloop base tiny DIR`) or a hub id such as "
                             "'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                  ignore_patterns=["*.fp16.safetensors", "*ema*", "*.non_ema.*"])
    except Exception as e:  # network down, offline mode, unknown repo, gated repo
        raise BaseModelError(
            f"cannot fetch the base model {source!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Check the id and your network (HF_HUB_OFFLINE must be unset), or pass a local diffusers folder."
        ) from None
    return Path(local)


def base_info(source: str) -> BaseInfo:
    """Read model_index.json and the scheduler config; fingerprint the weights by name, size and mtime-free hash."""
    local = resolve_base(source)
    index = json.loads((local / "model_index.json").read_text())
    sched_cfg = local / "scheduler" / "scheduler_config.json"
    prediction_type = "epsilon"
    if sched_cfg.is_file():
        prediction_type = json.loads(sched_cfg.read_text()).get("prediction_type", "epsilon")
    from sdloop.families import family_of

    return BaseInfo(source=source, local_dir=local, fingerprint=fingerprint_dir(local),
                    pipeline_class=index.get("_class_name", "?"), prediction_type=prediction_type,
                    family=family_of(local).name)


def fingerprint_dir(path: Path) -> str:
    """A stable fingerprint of a model folder: the hash of its config files' bytes and its weights' names+sizes.

    Hashing multi-GB weights would cost minutes; config bytes plus weight sizes plus each safetensors header (which
    holds the tensor layout) identify a model well enough to key caches.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith("."):
            continue
        h.update(rel.encode())
        if f.suffix in (".json", ".txt", ".model"):
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(fh.read(min(n, 10_000_000)))
                # the header alone does not change when weights are re-drawn: sample the tensor bytes too
                for frac in (0.1, 0.5, 0.9):
                    fh.seek(int(8 + n + (size - 8 - n) * frac))
                    h.update(fh.read(4096))
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """No "Loading pipeline components" bar and no advisory warnings (e.g. a UNet-only LoRA has no text-encoder
    keys) while sdloop loads a model it checks itself; errors still raise."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()


def load_pipeline(source: str, torch_dtype: Any = None, device: Optional[str] = None) -> Any:
    """Load a diffusers pipeline from a folder or hub id with its family's pipeline class (sdloop.families)."""
    from sdloop.families import family_of

    local = resolve_base(source)
    index = json.loads((local / "model_index.json").read_text())
    family = family_of(local)
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
        with quiet_diffusers():
            pipe = family.pipeline_class().from_pretrained(local, torch_dtype=torch_dtype, local_files_only=True,
                                                           **extra)
    except Exception as e:
        raise BaseModelError(f"{local} could not be loaded as a diffusers pipeline "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    if device:
        pipe = pipe.to(device)
    return pipe


def load_components(source: str, torch_dtype: Any = None) -> dict[str, Any]:
    """Load the parts a trainer needs (UNet, VAE, text encoders, tokenizers, noise scheduler) without the pipeline.

    Text encoders and tokenizers come back as lists in the family's order (SDXL: ``text_encoder`` then
    ``text_encoder_2``, the second with its projection), and ``family`` says how to use them.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    from sdloop.families import family_of

    local = resolve_base(source)
    index = json.loads((local / "model_index.json").read_text())
    family = family_of(local)
    absent = [name for name in family.text_encoders if not isinstance(index.get(name), list) or index[name][0] is None]
    if absent:
        raise BaseModelError(f"{local} has no {absent[0]}; a {family.title} pipeline has "
                             f"{' and '.join(family.text_encoders)} (sdloop trains text-conditioned pipelines).")
    try:
        unet = UNet2DConditionModel.from_pretrained(local, subfolder="unet", torch_dtype=torch_dtype,
                                                    local_files_only=True)
        vae = AutoencoderKL.from_pretrained(local, subfolder="vae", torch_dtype=torch_dtype, local_files_only=True)
        encoders, tokenizers = [], []
        for i, (enc_name, tok_name) in enumerate(zip(family.text_encoders, family.tokenizers)):
            encoders.append(family.text_encoder_class(i).from_pretrained(
                local, subfolder=enc_name, local_files_only=True, **({"dtype": torch_dtype} if torch_dtype else {})))
            tokenizers.append(AutoTokenizer.from_pretrained(local, subfolder=tok_name, local_files_only=True,
                                                            use_fast=False))
        noise_scheduler = DDPMScheduler.from_pretrained(local, subfolder="scheduler", local_files_only=True)
    except Exception as e:
        raise BaseModelError(f"{local} could not be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); is it a complete {family.title} "
                             "pipeline?") from None
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers,
            "noise_scheduler": noise_scheduler, "local_dir": local, "family": family}

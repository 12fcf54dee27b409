"""The model-family seam: the one place that knows what differs between SD 1.x, SD 2.x and SDXL.

A stage never checks "is this SDXL?" itself. It asks the base's ``Family`` (``family_of(base)``) for what differs:
the text encoders and tokenizers a pipeline has and how captions become UNet conditioning
(``encode_prompts`` / ``encode_ids`` -> ``TextConditioning``), the extra conditioning the UNet takes
(``time_ids``, ``added_cond``, ``unet_kwargs``), the pipeline classes for PyTorch and onnxruntime
(``pipeline_class()``, ``ort_pipeline_class()``), the folders a pipeline must have (``components()``), the LoRA
key layouts (``lora_components``, ``kohya_prefixes``) and the native resolution.

Families: ``sd1`` (epsilon, one CLIP encoder), ``sd2`` (the same layout; v-prediction, 768 px) and ``sdxl`` (two
CLIP encoders, the second with a projection whose pooled output joins the size/crop ``add_time_ids``). Adding the next
family (SD3, Flux) means one more module beside ``sd.py`` and ``sdxl.py`` that subclasses ``Family`` and one line in
``FAMILIES`` and ``_from_class_name``; see the README's "Model families".

This package imports no stage and loads no weights at import time (torch, diffusers and optimum are imported inside
the methods that need them), so the command line's help and the shared layer stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from sdloop.errors import UserError
from sdloop.families.base import Family, TextConditioning
from sdloop.families.sd import SD1, SD2
from sdloop.families.sdxl import SDXL

__all__ = ["FAMILIES", "Family", "FamilyError", "FamilyMismatchError", "SD1", "SD2", "SDXL", "TextConditioning",
           "check_same_layout", "family_by_name", "family_for_record", "family_of"]

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}


class FamilyError(UserError):
    """A pipeline whose family sdloop does not support (SD3, Flux, ...), or an unknown family name."""


class FamilyMismatchError(UserError):
    """Two things of different families met (an SD 1.x LoRA on an SDXL base); the message names both."""


def family_by_name(name: str) -> Family:
    """The family called ``name`` (sd1, sd2, sdxl); anything else is a one-line FamilyError."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(f"unknown model family {name!r}; sdloop knows {', '.join(FAMILIES)}.") from None


UNSUPPORTED = ("StableDiffusion3", "Flux", "PixArt", "Sana", "Kandinsky", "StableCascade", "Wuerstchen", "HunyuanDiT",
               "Lumina", "AuraFlow", "CogView")


def _from_class_name(class_name: str) -> Optional[Family]:
    """The family a diffusers (or optimum ``ORT...``) pipeline class name names; None when the name alone does not
    tell (SD 1.x and 2.x share one class; a generic ``DiffusionPipeline`` is told by its components)."""
    name = class_name[3:] if class_name.startswith("ORT") else class_name
    if name.startswith("StableDiffusionXL"):
        return SDXL
    if not name.startswith(UNSUPPORTED):
        return None
    raise FamilyError(f"{class_name} is not a family sdloop supports ({', '.join(FAMILIES)}); SD3 and Flux are not "
                      "yet: pass an SD 1.x, 2.x or SDXL diffusers pipeline.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def family_of(base: Union[str, Path, Mapping[str, Any]]) -> Family:
    """The family of a base: a diffusers folder, a hub id (resolved as ``sdloop.pipelines.resolve_base`` does), or
    the content of a ``model_index.json``.

    SDXL is named by ``_class_name`` or by a ``text_encoder_2`` component. SD 2.x differs from SD 1.x only in its
    weights: v-prediction in the scheduler or a 1024-wide (OpenCLIP-H) text encoder; from a bare model_index.json,
    which holds neither, an SD pipeline reads as sd1.
    """
    folder: Optional[Path] = None
    if isinstance(base, Mapping):
        index: Mapping[str, Any] = base
    else:
        from sdloop.pipelines import resolve_base

        folder = resolve_base(str(base))
        index = _read_json(folder / "model_index.json")
    found = _from_class_name(str(index.get("_class_name", "StableDiffusionPipeline")))
    te2 = index.get("text_encoder_2")
    if found is None and isinstance(te2, (list, tuple)) and te2 and te2[0] is not None:
        found = SDXL
    if found is not None:
        return found
    if folder is None:
        return SD1
    prediction = _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    width = _read_json(folder / "text_encoder" / "config.json").get("hidden_size")
    return SD2 if prediction == "v_prediction" or width == 1024 else SD1


def family_for_record(family: str = "", pipeline_class: str = "", prediction_type: str = "epsilon") -> Family:
    """The family a record names (a run manifest, an export manifest); records written before families existed
    name none and read as sdxl by their pipeline class, else sd2 for v-prediction, else sd1."""
    if family:
        return family_by_name(family)
    found = _from_class_name(pipeline_class) if pipeline_class else None
    if found is not None:
        return found
    return SD2 if prediction_type == "v_prediction" else SD1


def check_same_layout(expected: Family, got: Family, what: str, remedy: str) -> None:
    """Raise FamilyMismatchError naming both families when ``got`` cannot take what was made for ``expected``.

    SD 1.x and 2.x share their LoRA layout (a v-prediction variant of a base takes its LoRA), so only different
    layouts (sd vs sdxl) are a mismatch. ``what`` says what met what, ``remedy`` what to do instead.
    """
    if expected.lora_layout != got.lora_layout:
        raise FamilyMismatchError(f"{what}: {expected.name} ({expected.title}) vs {got.name} ({got.title}); "
                                  f"{remedy}")

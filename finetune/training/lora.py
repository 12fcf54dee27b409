"""LoRA adapters: attach them with peft, and read/write them as safetensors in two standard layouts.

- diffusers layout (``pytorch_lora_weights.safetensors``): ``unet.``/``text_encoder.`` prefixed peft keys plus the
  ``lora_adapter_metadata`` JSON that stock ``pipe.load_lora_weights(dir)`` reads to restore rank and alpha.
- kohya layout (``lora_kohya.safetensors``): ``lora_unet_<module_path>.lora_down/lora_up.weight`` and ``.alpha``,
  which AUTOMATIC1111, ComfyUI and kohya sd-scripts read (the UNet keys use diffusers module names; the text encoder
  prefixes are the family's ``kohya_prefixes``: ``lora_te_`` for SD 1.x/2.x, ``lora_te1_``/``lora_te2_`` for SDXL).

The components (``unet``, ``text_encoder``, SDXL's ``text_encoder_2``) and their prefixes come from
``sdloop.families``; the SD 1.x signatures (a UNet and one text encoder state dict) are kept.

Only safetensors are written or read: no pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from sdloop.atomic import load_safetensors, save_safetensors
from sdloop.families import SD1, Family
from sdloop.runfolder import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME

__all__ = ["DIFFUSERS_WEIGHT_NAME", "KOHYA_WEIGHT_NAME", "add_lora", "lora_parameters", "lora_state_dict",
           "load_lora_state_dict", "split_prefixed", "split_components", "save_diffusers_lora", "save_kohya_lora",
           "to_kohya", "read_safetensors"]
ADAPTER = "default"


def lora_config(rank: int, alpha: float, dropout: float, target_modules: list[str]) -> Any:
    """The peft LoraConfig sdloop trains with (gaussian init of A, zeros for B, as the diffusers scripts do)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> None:
    """Attach a trainable LoRA adapter to a diffusers or transformers model in place; base weights stay frozen."""
    config = lora_config(rank, alpha, dropout, target_modules)
    if hasattr(model, "add_adapter"):
        try:
            model.add_adapter(config)
        except ValueError as e:  # peft names the modules it could not find
            raise ValueError(f"cannot add LoRA to {type(model).__name__}: {e}. "
                             "Check target_modules (e.g. to_q,to_k,to_v,to_out.0 for a UNet).") from None
    else:  # pragma: no cover - every supported model has add_adapter
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of a model, in a stable order."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft key form (``...to_q.lora_A.weight``), detached fp32 copies on CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy peft-form adapter weights back into a model that already carries the adapter."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{len(missing)} LoRA tensors did not match the model, e.g. {missing[0]}.")


def split_prefixed(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``unet.``/``text_encoder.`` prefixed adapter tensors into the two peft state dicts."""
    parts = split_components(tensors)
    return parts.get("unet", {}), parts.get("text_encoder", {})


def split_components(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter tensors by component: ``unet.``, ``text_encoder.``, ``text_encoder_2.`` prefixes -> peft dicts."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if rest:
            out.setdefault(component, {})[rest] = value
    return out


def _peft_meta(prefix: str, rank: int, alpha: float, target_modules: list[str]) -> dict[str, Any]:
    """The full LoraConfig as diffusers stores it (``unet.r``, ``unet.lora_alpha``, ...), JSON-safe."""
    config = lora_config(rank, alpha, 0.0, target_modules).to_dict()
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        out[f"{prefix}.{key}"] = value
    return out


def save_diffusers_lora(path: Path, unet_sd: dict[str, torch.Tensor],
                        text_encoder_sd: Optional[dict[str, torch.Tensor]],
                        rank: int, alpha: float, unet_targets: list[str], text_targets: list[str],
                        extra_metadata: dict[str, Any],
                        text_encoder_2_sd: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the diffusers layout that the family's ``load_lora_weights`` (SD or SDXL pipeline) reads as it is."""
    # peft key names (lora_A/lora_B) as they are: diffusers reads them directly, while its own peft->diffusers
    # renaming only knows attention projections and would leave a mix of two key styles for conv/ff targets
    tensors = {f"unet.{k}": v for k, v in unet_sd.items()}
    adapter_meta = _peft_meta("unet", rank, alpha, unet_targets)
    for prefix, sd in (("text_encoder", text_encoder_sd), ("text_encoder_2", text_encoder_2_sd)):
        if sd:
            tensors.update({f"{prefix}.{k}": v for k, v in sd.items()})
            adapter_meta.update(_peft_meta(prefix, rank, alpha, text_targets))
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_meta, sort_keys=True)}
    metadata.update({f"sdloop.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in extra_metadata.items()})
    save_safetensors(path, tensors, metadata)


def to_kohya(unet_sd: dict[str, torch.Tensor], text_encoder_sd: Optional[dict[str, torch.Tensor]],
             alpha: float, family: Family = SD1,
             text_encoder_2_sd: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Rename peft keys to kohya's: module path with '_' for '.', lora_A -> lora_down, lora_B -> lora_up, + alpha;
    each component under the family's kohya prefix (SDXL: lora_unet_, lora_te1_, lora_te2_)."""
    out: dict[str, torch.Tensor] = {}
    parts = {"unet": unet_sd, "text_encoder": text_encoder_sd or {}, "text_encoder_2": text_encoder_2_sd or {}}
    for component in family.lora_components:
        prefix, sd = family.kohya_prefix(component), parts[component]
        for key, value in sd.items():
            if ".lora_A." in key:
                module, kind = key.split(".lora_A.")[0], "lora_down"
            elif ".lora_B." in key:
                module, kind = key.split(".lora_B.")[0], "lora_up"
            else:
                raise ValueError(f"unexpected LoRA key {key!r}: only plain LoRA (A/B) weights can be converted.")
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.{kind}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya_lora(path: Path, unet_sd: dict[str, torch.Tensor], text_encoder_sd: Optional[dict[str, torch.Tensor]],
                    rank: int, alpha: float, extra_metadata: dict[str, Any], family: Family = SD1,
                    text_encoder_2_sd: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the kohya / A1111 / ComfyUI layout, with the ss_* metadata those tools display."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_base_model_version": family.kohya_model_version,
                "ss_sd_model_name": str(extra_metadata.get("base_model", "")),
                "ss_steps": str(extra_metadata.get("steps", "")), "format": "pt"}
    metadata.update({f"sdloop.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in extra_metadata.items()})
    save_safetensors(path, to_kohya(unet_sd, text_encoder_sd, alpha, family, text_encoder_2_sd), metadata)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata of a LoRA file (``sdloop.atomic.load_safetensors``: damage is a user error)."""
    return load_safetensors(path)

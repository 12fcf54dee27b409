"""Config values from the command line: ``--set key=value`` overrides and the ``--help-config`` listing.

An override is parsed with the one YAML loader (YAML 1.2: ``1e-4`` is a number, only true/false are booleans), but a
key declared as text takes the text as typed, so ``--set mixed_precision=no`` stays "no" and a prompt is never turned
into a number; the config's own type check then refuses what does not fit.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from sdloop.configfile import ConfigError, yaml_load

from finetune.training.config import AugmentConfig, DataConfig, TrainConfig

_NESTED = {"data_config": DataConfig, "augment": AugmentConfig}


def declared_type(parts: list[str]) -> Any:
    """The declared type of the TrainConfig key ``parts`` (e.g. ["augment", "flip_p"]), or None if unknown."""
    cls: Any = TrainConfig
    for i, name in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if name not in hints:
            return None
        tp = hints[name]
        if i == len(parts) - 1:
            return tp
        if not dataclasses.is_dataclass(tp):
            return None
        cls = tp
    return None


def parse_value(text: str, declared: Any = None) -> Any:
    """Parse a command-line override value with YAML 1.2 rules (numbers, true/false, [lists]).

    A key declared as a string takes the text as typed (so ``--set mixed_precision=no`` is "no", and a prompt or a
    path is never turned into a number), unquoted if it is a quoted YAML string; text that is not valid YAML stays
    text, for the type check to name.
    """
    try:
        value = yaml_load(text)
    except yaml.YAMLError:
        return text
    if declared is str and not isinstance(value, str):
        return text
    return value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` or ``section.key=value`` overrides (any config key) to a mapping, returning a copy."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. augment.flip_p=0.5).")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        parts = key.split(".")
        if parts[0] == "data" and len(parts) > 1:  # `data.x` is the friendlier spelling of `data_config.x`
            parts[0] = "data_config"
        target = out
        for p in parts[:-1]:
            if target.get(p) is None:
                target[p] = {}
            target = target[p]
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section.")
        target[parts[-1]] = parse_value(raw, declared_type(parts))
    return out


def field_help(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) for each field, nested sections flattened, for ``--help-config``."""
    rows: list[tuple[str, Any, str]] = []
    inst = cls() if cls is not TrainConfig else TrainConfig()
    for f in dataclasses.fields(cls):
        if f.name in _NESTED:
            for name, default, text in field_help(_NESTED[f.name]):
                rows.append((f"{f.name}.{name}", default, text))
        else:
            rows.append((f.name, getattr(inst, f.name), f.metadata.get("help", "")))
    return rows

"""``--set KEY=VALUE`` and ``--help-config``: the one way every config dataclass takes settings from a command line.

Why one module: train, export and monitor each had their own ``--set`` loop and they disagreed. Export read values
with YAML 1.1 (``--set guidance_scale=5e-1`` became the string "5e-1", and a wrong type surfaced later as a
TypeError), monitor and train differed on dotted keys. Now every command (and any config added later, such as the
service's) parses its overrides here, so a value typed on any command line means the same thing:

- the value is read with the one YAML 1.2 loader (``sdloop.configfile.yaml_load``): ``5e-2`` is a number, only
  ``true``/``false`` are booleans, ``[a, b]`` is a list. A key declared as text keeps the text as typed
  (``mixed_precision=no`` is "no", a prompt is never turned into a number); quotes around it are removed;
- the key must be a field of the config dataclass: an unknown key is one line naming the known keys;
- ``section.key=value`` reaches into a section (a field whose type is a dataclass, also under its ``prefix``
  metadata, e.g. ``data.`` for ``TrainConfig.data_config``) or sets one key of a mapping setting (a field declared
  ``dict``, e.g. ``train_overrides.max_steps=50``, ``tolerances.min_psnr=45``);
- the value is checked against the field's declared type (``sdloop.config_types.check_value``), so a wrong type is
  refused with the field's name before anything runs; the config's ``__post_init__`` then checks the ranges.

A new config uses it like this (everything it needs is importable from here)::

    @dataclass
    class ServeConfig:
        port: int = help_field(3000, "TCP port of the service.")

        def __post_init__(self) -> None:
            check_types(self, "")   # types first, then the ranges, each error naming the field and its range
            if not 1 <= self.port <= 65535:
                raise ConfigError(f"port={self.port!r} is invalid: an integer in [1, 65535].")

    values = parse_overrides(ServeConfig, args.set or [])   # {"port": 8080}; ConfigError (one line) on a mistake
    cfg = build_dataclass(ServeConfig, values, prefix="")    # unknown keys, types, ranges: one ConfigError line
    print(config_help(ServeConfig))                          # the --help-config listing

``parse_value(text, declared)`` reads one value (an environment variable, say) the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import yaml

from sdloop.config_types import build_dataclass, check_types, check_value, field_types, help_field, optional_inner
from sdloop.configfile import ConfigError, yaml_load

__all__ = ["ConfigError", "apply_overrides", "build_dataclass", "check_types", "config_help", "help_field",
           "help_rows", "parse_overrides", "parse_value"]


def _is_text(declared: Any) -> bool:
    return declared is str or optional_inner(declared) is str


def parse_value(text: str, declared: Any = None) -> Any:
    """One value as typed on a command line (or in an environment variable), read with YAML 1.2 rules.

    ``declared`` is the field's type (None: free-form, as inside a mapping setting). Text fields keep the text as
    typed, unquoted when it is a quoted YAML string (``'linear'`` is linear), so ``no`` stays "no" and ``a #1`` is
    not cut at the ``#``; ``null`` is None for an ``Optional[str]`` field. Text that is not valid YAML stays text,
    for the type check to name.
    """
    try:
        value = yaml_load(text)
    except yaml.YAMLError:
        return text
    if _is_text(declared):
        if value is None and declared is not str and text.strip() in ("null", "~", "Null", "NULL"):
            return None
        quoted = text.strip()[:1] in ("'", '"')
        return value if quoted and isinstance(value, str) else text
    return value


def _split(item: str) -> tuple[list[str], str]:
    """KEY=VALUE into (key parts, value text); ``-`` in a key is ``_`` (``--set max-steps=5`` works too)."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r} is not KEY=VALUE, e.g. --set {key or 'key'}=VALUE.")
    return parts, raw


def _is_mapping(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or tp is dict


def _section_name(cls: type, part: str) -> str:
    """The field a dotted key's head names: the field itself when it is a section or a mapping setting, else the
    section whose ``prefix`` metadata it is (``data`` -> ``data_config``), else ``part`` unchanged."""
    hints = field_types(cls)
    if part in hints and _is_mapping(hints[part]):
        return part
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and f.metadata.get("prefix") == part + ".":
            return f.name
    return part


def _lookup(cls: type, parts: list[str], item: str) -> tuple[list[str], Any, str]:
    """Where ``parts`` points in ``cls``: (the path of keys, the declared type or None if free-form, the name an
    error shows, e.g. ``data.split_seed``)."""
    path: list[str] = []
    prefix = ""
    current: Optional[type] = cls
    for i, part in enumerate(parts):
        if current is None:  # inside a mapping setting: its keys are checked by whoever reads it
            rest = parts[i:]
            return path + rest, None, prefix + ".".join(rest)
        hints = field_types(current)
        last = i == len(parts) - 1
        name = part if last else _section_name(current, part)
        if not last and not (name in hints and _is_mapping(hints[name])):
            sections = ", ".join(n for n, tp in hints.items() if _is_mapping(tp)) or "none"
            raise ConfigError(f"--set {item!r}: {prefix}{part} is not a section or a mapping setting; only "
                              f"sections and mapping settings take a dotted key (here: {sections}).")
        if name not in hints:
            raise ConfigError(f"--set {item!r}: unknown config key {prefix}{part}; known keys: "
                              f"{', '.join(sorted(hints))}.")
        tp = hints[name]
        path.append(name)
        if last:
            return path, tp, prefix + name
        if dataclasses.is_dataclass(tp):
            field = next(f for f in dataclasses.fields(current) if f.name == name)
            prefix, current = field.metadata.get("prefix", prefix + name + "."), tp
        else:  # a mapping setting
            prefix, current = prefix + name + ".", None
    raise AssertionError("unreachable: the loop returns at the last part")


def apply_overrides(cls: type, values: Mapping[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """``values`` (a mapping of ``cls`` settings, e.g. from a config file) with each ``KEY=VALUE`` of ``items``
    applied in order; a copy, ``values`` is not changed.

    A whole value replaces what was there (``augment={flip_p: 0.5}``); a dotted key sets one key inside a section
    or mapping setting and keeps the others. Every mistake (not KEY=VALUE, an unknown key, a wrong type) is one
    ``ConfigError`` line naming the key; ranges are left to the config's own ``__post_init__``.
    """
    out: dict[str, Any] = dict(values)
    for item in items:
        parts, raw = _split(item)
        path, declared, shown = _lookup(cls, parts, item)
        value = parse_value(raw, declared)
        if declared is not None and not dataclasses.is_dataclass(declared):
            value = check_value(shown, value, declared)
        target = out
        for key in path[:-1]:
            inner = target.get(key)
            if inner is None:
                inner = {}
            elif dataclasses.is_dataclass(inner) and not isinstance(inner, type):
                inner = dataclasses.asdict(inner)
            elif isinstance(inner, Mapping):
                inner = dict(inner)
            else:
                raise ConfigError(f"--set {item!r}: {key} holds {inner!r}, not a mapping; set it whole instead "
                                  f"(e.g. --set {key}={{...}}).")
            target[key] = inner
            target = inner
        target[path[-1]] = value
    return out


def parse_overrides(cls: type, items: Iterable[str]) -> dict[str, Any]:
    """The settings of ``cls`` that ``--set`` items give, as a (nested) mapping for ``build_dataclass`` or for
    merging over a config file's values; see ``apply_overrides``."""
    return apply_overrides(cls, {}, items)


def _default(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def help_rows(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, help) of every setting of ``cls``, sections flattened as ``section.key`` (their field name:
    ``--set`` takes that spelling too)."""
    rows: list[tuple[str, Any, str]] = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += [(f"{f.name}.{name}", default, text) for name, default, text in help_rows(hints[f.name])]
        else:
            rows.append((f.name, _default(f), f.metadata.get("help", "")))
    return rows


def config_help(cls: type) -> str:
    """The ``--help-config`` listing of ``cls``: one line per setting with its default (as JSON) and its help."""
    lines = []
    for name, default, text in help_rows(cls):
        lines.append(f"{name:36s} {json.dumps(default, default=str):>28s}  {text}")
    return "\n".join(lines)

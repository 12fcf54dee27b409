"""Config files and YAML values, read the same way by every stage: the one YAML loader.

The loader reads YAML 1.2 scalars: ``1e-4`` is a number (PyYAML's YAML 1.1 reads it as the string "1e-4") and only
``true``/``false`` are booleans (YAML 1.1 also turns ``no``, ``yes``, ``on``, ``off`` into booleans, so
``mixed_precision: no`` would have been ``False``). Training configs, export settings and ``--set key=value``
overrides all go through it, so a value means the same thing wherever it is typed.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from sdloop.errors import UserError


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KB; anything past 1 MiB is not one


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and floats (``1e-4`` without a dot)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """Parse YAML text with the config loader (YAML 1.2 booleans and floats); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line out of PyYAML's multi-line message: what is wrong and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping: the one place that reads config files and words their errors.

    Only a regular file is read (a FIFO would hang), at most ``MAX_CONFIG_BYTES``; a missing file, a folder, bytes
    that are not UTF-8, broken YAML and a document that is not a mapping are each one ``ConfigError`` line.
    An empty file is an empty mapping.
    """
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; check the path.") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"config file {p} is a folder; pass a YAML file (e.g. train.yaml).")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config file {p} is not a regular file; pass a YAML file.")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is {st.st_size} bytes; a config is a small YAML file "
                          f"(at most {MAX_CONFIG_BYTES} bytes).")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8.") from None
    try:
        values = yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values (key: value lines), "
                          f"not a {_kind(values)}.")
    return values


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)

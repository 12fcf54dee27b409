"""Typed config values: the check of every key against its declared type (the YAML loader is sdloop.configfile).

Why a module of its own: a value of the wrong type must be refused, not coerced. Before this check,
``--set sample_prompts=hello`` became five one-letter prompts, ``max_steps=2.5`` trained 3 steps and
``augment.flip_p=yes`` meant probability 1. Each config dataclass calls ``check_types`` first in its
``__post_init__``, before its range checks, so the range checks only ever compare numbers with numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

from sdloop.configfile import ConfigError  # noqa: F401 - re-exported: stages import it from finetune.training.config
from sdloop.seeding import MAX_SEED  # noqa: F401 - torch and numpy take 64-bit seeds; ours are 63-bit


def help_field(default: Any, help: str, **metadata: Any) -> Any:
    """A config dataclass field with its help text in the metadata (``--help-config`` prints it); a list or dict
    default is copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


# ---- type checks -------------------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED = {bool: "true or false (bool)", int: "an integer (int)", float: "a number (float)",
             str: "a string (str)"}
_ELEMENT = {str: ("strings", 'e.g. ["a", "b"]'), int: ("integers", "e.g. [4, 8]"),
            float: ("numbers", "e.g. [0.0001, 0.001]")}


def optional_inner(tp: Any) -> Any:
    """X for a declared ``Optional[X]`` (a setting that may be null, e.g. "the target's default"), else None."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def expected_text(tp: Any) -> str:
    """How an error names a declared type: 'a number (float)', 'a list of strings (list[str]), e.g. [...]'."""
    inner = optional_inner(tp)
    if inner is not None:
        return f"{expected_text(inner)} or null"
    if tp is dict:
        return "a mapping of key: value"
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        words, example = _ELEMENT[elem]
        return f"a list of {words} (list[{elem.__name__}]), {example}"
    if dataclasses.is_dataclass(tp):
        return "a section of key: value lines (a mapping)"
    return _EXPECTED[tp]


def _hint(value: Any, tp: Any) -> str:
    tp = optional_inner(tp) or tp
    if isinstance(value, bool) and tp is str:
        return "; quote it in YAML (e.g. \"no\")"
    if isinstance(value, str) and tp in (int, float) and _is_number(value):
        return "; write the number without quotes"
    if isinstance(value, str) and typing.get_origin(tp) is list:
        return "; a single item is written [item]"
    return ""


def _is_float_word(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _wrong(name: str, value: Any, tp: Any) -> ConfigError:
    if tp is float and isinstance(value, str) and not _is_number(value) and _is_float_word(value):
        return ConfigError(f"{name}={_short(value)} is invalid: expected a finite number (float).")
    return ConfigError(f"{name}={_short(value)} has the wrong type: expected {expected_text(tp)}{_hint(value, tp)}.")


def _accepts(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the declared scalar type (an int is a float; a bool is neither int nor float)."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported config type {tp!r}")  # a declaration this module does not know: a bug


def _accepts_shape(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the declared type ``tp`` (scalar, list[scalar] or dict), before normalising."""
    if tp is dict:
        return isinstance(value, Mapping)
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_accepts(v, elem) for v in value)
    return _accepts(value, tp)


def _normalised(name: str, shown: Any, value: Any, tp: Any) -> Any:
    """A value of the right type, normalised: ints in float slots become floats; no infinities, NaNs or NULs."""
    if tp is float:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{name}={_short(shown)} is invalid: expected a finite number (float).")
        return number
    if tp is str and "\x00" in value:
        raise ConfigError(f"{name}={_short(shown)} is invalid: it contains a NUL byte.")
    return value


def check_value(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the declared type ``tp`` (scalar or list[scalar]) and normalised.

    Lists come back as lists (a tuple is accepted), ints in float slots as floats; ``Optional[X]`` takes None or
    an X. Sections (dataclass types) are handled by ``check_types``.
    """
    inner = optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        if not _accepts_shape(value, inner):
            raise _wrong(name, value, tp)
        return check_value(name, value, inner)
    if tp is dict:  # a free-form section (e.g. settings handed on to another stage, which checks them itself)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}={_short(value)} has the wrong type: expected a mapping of key: value.")
        return dict(value)
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or not all(_accepts(v, elem) for v in value):
            raise _wrong(name, value, tp)
        return [_normalised(name, value, v, elem) for v in value]
    if not _accepts(value, tp):
        raise _wrong(name, value, tp)
    return _normalised(name, value, value, tp)


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each field of config dataclass ``cls`` (annotations resolved once per class)."""
    return typing.get_type_hints(cls)


def check_types(obj: Any, prefix: str) -> None:
    """Check every field of config dataclass ``obj`` against its annotation, normalising in place.

    A nested section (a field whose type is a dataclass) may be given as a mapping (built with ``build_dataclass``
    and the field's ``prefix`` metadata, so its errors say e.g. ``augment.flip_p``), ``None`` (its defaults) or an
    instance; anything else is named as the wrong type.
    """
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        tp, value, name = hints[f.name], getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = tp()
            elif isinstance(value, Mapping):
                value = build_dataclass(tp, value, prefix=f.metadata.get("prefix", name + "."))
            elif not isinstance(value, tp):
                raise _wrong(name, value, tp)
        else:
            value = check_value(name, value, tp)
        setattr(obj, f.name, value)


def build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate a config dataclass from a mapping, naming unknown keys (with their section prefix)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={_short(values)} has the wrong type: expected "
                          "a section of key: value lines (a mapping).")
    names = {f.name for f in dataclasses.fields(cls)}
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"config key {prefix}{_short(odd[0])} is not a name; keys are words like learning_rate.")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known keys: {', '.join(sorted(names))}.")
    return cls(**values)

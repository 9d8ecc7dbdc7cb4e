"""How every config is checked: each field against its annotation, each key of a mapping against the fields.

There is one validator. The dataclasses' `__post_init__` call `check_fields`, and `validate` builds a dataclass from a
plain mapping (keyword options, a YAML section) with the same checks and the same messages, under the key path the
user wrote: "fit.lr: expected float, got str 'fast'.", "fit.lrr: unknown key; did you mean 'lr'?".
`dmm_wrap.config` re-exports all of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """Invalid user input: a configuration value, or a file or data set that one names. The message starts with what
    is wrong (the key path for a config value); the CLI prints it on one line and exits with status 2."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or folder that the user named (a config file, a model folder) does not exist."""


def type_name(tp: Any) -> str:
    """How an annotation reads in an error message: "int", "float or None", "one of 'avg', 'max'", ..."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(tp) and origin is None and isinstance(tp, type):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def got(value: Any) -> str:
    """A value as an error message shows it: its type and repr."""
    return f"{type(value).__name__} {value!r}"


def matches(value: Any, tp: Any) -> bool:
    """Whether `value` is of the annotated type `tp`: an int or a float for float (never a bool: Python counts it as
    an int), an int for int, None for Optional, a member for Literal, a list or tuple of such items for sequences."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp))
    if origin in (list, tuple):
        item = next((a for a in typing.get_args(tp) if a is not Ellipsis), Any)
        return isinstance(value, (list, tuple)) and all(matches(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"Internal: no type check for the annotation {tp!r}.")


def check_value(path: str, value: Any, tp: Any) -> None:
    """Raise ConfigError "PATH: expected TYPE, got TYPE VALUE." unless `value` is of the annotated type `tp`."""
    if not matches(value, tp):
        raise ConfigError(f"{path}: expected {type_name(tp)}, got {got(value)}.")


def check_choice(owner: str, key: str, value: Any, choices: tuple) -> None:
    """Raise ConfigError "OWNER.KEY must be one of [...], got VALUE." unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{owner}.{key} must be one of {list(choices)}, got {value!r}.")


def known_keys(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of `d` that the dataclass `cls` has fields for; the others are dropped with a warning naming them
    as `what` keys, as peft does for a config written by a newer version. For reading saved files, not user input."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        warnings.warn(f"Ignoring unknown {what} keys {unknown} (written by a newer dmm_wrap?).", stacklevel=3)
    return {k: v for k, v in d.items() if k in names}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of the dataclass `cls`, for the fields its __init__ takes."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance `obj` against its annotation; called by each config's
    `__post_init__`. Errors name the field as "Class.field", e.g. "FitConfig.lr: expected float, got str '1e-3'."."""
    cls = type(obj)
    for name, tp in _field_types(cls).items():
        _read(f"{cls.__name__}.{name}", getattr(obj, name), tp, coerce=False)


def _read(path: str, value: Any, tp: Any, coerce: bool) -> Any:
    """`value` checked against the annotation `tp` (a ConfigError naming `path` otherwise), items of a sequence under
    "path[i]". With `coerce` it is read as plain data: a mapping builds a nested dataclass, an int or a numeric string
    becomes a float for a float field, and a list a tuple for a tuple field."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType) and value is not None:
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _read(path, value, arg, coerce)
                except ConfigError:
                    continue
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        item = next((a for a in typing.get_args(tp) if a is not Ellipsis), Any)
        items = [_read(f"{path}[{i}]", v, item, coerce) for i, v in enumerate(value)]
        if coerce:
            return tuple(items) if origin is tuple else items
    elif coerce and dataclasses.is_dataclass(tp) and isinstance(tp, type) and not isinstance(value, tp):
        return validate(tp, value, path, coerce=True)
    elif coerce and tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string
        except ValueError:
            pass
    elif origin is Literal and not matches(value, tp):
        close = difflib.get_close_matches(str(value), [str(c) for c in typing.get_args(tp)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(f"{path}: expected {type_name(tp)}, got {got(value)}{hint}")
    check_value(path, value, tp)
    return value


def _key_error(key_path: str, key: Any, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}."
    return ConfigError(f"{key_path}: unknown key; {hint}")


def _required(cls: type, given: Mapping[str, Any], path: str) -> None:
    """Raise ConfigError for the first field of `cls` without a default that `given` lacks."""
    for f in dataclasses.fields(cls):
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and missing and f.name not in given:
            key_path = f"{path}.{f.name}" if path else f.name
            raise ConfigError(f"{key_path}: required, expected {type_name(_field_types(cls)[f.name])}.")


def validate(cls: type, mapping: Any, path: str = "", *, coerce: bool = False) -> Any:
    """Build the dataclass `cls` from a plain mapping, checking every key and value; errors name the key path.

    Args:
        cls: a dataclass. Fields it lists in a class attribute `_flatten` (nested dataclasses) take their keys at
            this level, as `ModelConfig` does with the head options.
        mapping: {field: value}; None is an empty mapping.
        path: the key path of `mapping` in messages ("fit" gives "fit.lr: ..."); "" at the top level.
        coerce: read plain data, as from YAML: mappings build nested dataclasses, ints and numeric strings become
            floats (PyYAML reads `1e-3` as a string), lists become tuples. Off, values must already be of their type.

    Raises:
        ConfigError: an unknown key (with the closest valid one), a missing required one, a value of the wrong type
            or one that the dataclass refuses, always under the key path, e.g. "fit.lrr: unknown key; did you mean
            'lr'?" or "fit.lam must lie in [0, 1], got 1.5.".

    Example:
        >>> validate(FitConfig, {"lr": 1e-3, "max_steps": 5}, "fit")
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of options, got {got(mapping)}.")
    own = dict(_field_types(cls))
    flattened = {name: own.pop(name) for name in getattr(cls, "_flatten", ())}
    owner = {key: name for name, sub in flattened.items() for key in _field_types(sub)}
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in flattened}
    for key, value in mapping.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key in own:
            kwargs[key] = _read(key_path, value, own[key], coerce)
        elif key in owner:
            nested[owner[key]][key] = value
        else:
            raise _key_error(key_path, key, [*own, *owner])
    _required(cls, {**kwargs, **nested}, path)
    for name, sub in flattened.items():
        kwargs[name] = validate(sub, nested[name], path, coerce=coerce)
    try:
        return cls(**kwargs)
    except ValueError as err:  # ConfigError included; a TypeError here would be a bug, not the user's
        # The dataclasses name their fields "FitConfig.lam"; say "fit.lam", the key the user wrote.
        msg = str(err).replace(f"{cls.__name__}.", f"{path}." if path else "")
        if msg == str(err) and path and not msg.startswith(f"{path}."):
            msg = f"{path}: {msg}"
        if msg == str(err) and isinstance(err, ConfigError):
            raise
        raise ConfigError(msg) from err


__all__ = ["ConfigError", "MissingFileError", "validate", "check_fields", "check_value", "check_choice", "known_keys",
           "matches", "type_name", "got"]

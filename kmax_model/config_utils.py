"""Generic utilities for nested typed-dataclass configs (used by every config in the project).

- `config_to_dict(cfg)`: plain nested dict (tuples become lists) — YAML / MLflow / Tune friendly.
- `config_from_dict(cls, data)`: the inverse, with type coercion and errors that name the dotted field
  (``model.decoder.num_clusters: expected int, got 'abc'``; ``unknown field model.decoder.foo``).
- `apply_overrides(cfg, ["a.b.c=value", ...] | {"a.b.c": value})`: a new, validated config.
  String values are coerced to the field's declared type: int, float, bool (true/false/1/0/yes/no),
  str, ``Literal[...]`` (membership checked), tuples (``"(2,2,2)"``, ``"2,2,2"`` or ``"[2, 2, 2]"``),
  ``Optional[X]`` (``none``/``null`` -> None) and nested dataclasses (from a mapping).
- `load_yaml(cls, path)` / `save_yaml(cfg, path)`.

Every dataclass's own ``__post_init__`` validation still runs (the config is rebuilt by calling its
constructor); its error message is prefixed with the dotted path of the sub-config that failed.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", "~", ""}


class ConfigError(ValueError):
    """A config field is unknown or has a bad value; the message names the dotted field path."""


def config_to_dict(cfg: Any) -> Any:
    """Recursively turn a dataclass config into plain python containers (tuples -> lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _split_items(text: str) -> list[str]:
    text = text.strip()
    if len(text) >= 2 and text[0] + text[-1] in ("()", "[]"):
        text = text[1:-1]
    return [t.strip() for t in text.split(",") if t.strip()]


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType))


def coerce_value(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (possibly a string from a command line) to type ``tp``; raise naming ``path``."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return config_from_dict(tp, config_to_dict(value), path)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, path)
    if _is_union(tp):
        args = get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: {value!r} matches none of {tp} ({'; '.join(errors)})")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (
                isinstance(value, str) and not isinstance(choice, str) and value == str(choice)
            ):
                return choice
        raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
    if origin in (tuple, list):
        items = _split_items(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{path}: expected a sequence, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(items)} ({value!r})")
            out = [coerce_value(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(items, args))]
        else:
            elem = args[0] if args else Any
            out = [coerce_value(v, elem, f"{path}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys and bad values raise `ConfigError`
    naming the dotted path (``prefix`` is prepended, e.g. ``"model"``). Missing keys keep defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_join(prefix, str(k)) for k in unknown)
        raise ConfigError(f"unknown config field(s) {names}; known: {sorted(fields)}")
    kwargs = {name: coerce_value(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(_prefixed(prefix, str(err))) from err


def _prefixed(prefix: str, message: str) -> str:
    """Qualify a sub-config's own message with the full dotted path: a message that already starts
    with the sub-config's field name ("decoder.num_clusters must be > 0") gets the parents prepended
    ("model.decoder.num_clusters must be > 0"); any other message gets "prefix: " in front."""
    if not prefix:
        return message
    last = prefix.rsplit(".", 1)[-1]
    if message.startswith(last + "."):
        return prefix + message[len(last) :]
    return f"{prefix}: {message}"


def _parse_overrides(overrides: Iterable[str] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.path=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value.strip()))
    return pairs


def apply_overrides(cfg: T, overrides: Iterable[str] | Mapping[str, Any]) -> T:
    """Return a new config equal to ``cfg`` with dotted-path overrides applied and validated.

    Raises `ConfigError` naming the dotted path for unknown fields or values of the wrong type.
    """
    data = config_to_dict(cfg)
    for key, value in _parse_overrides(overrides):
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override key {key!r} is not a dotted path")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config field {'.'.join(parts[: i + 1])} (in override {key!r})")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config field {key} (in override {key!r})")
        node[parts[-1]] = value
    return config_from_dict(type(cfg), data)


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML file holding a (partial) nested mapping for ``cls``; errors name the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        return config_from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def save_yaml(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (written to a temporary file then renamed, so a crash never truncates it)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


__all__ = [
    "ConfigError",
    "apply_overrides",
    "coerce_value",
    "config_from_dict",
    "config_to_dict",
    "load_yaml",
    "save_yaml",
]

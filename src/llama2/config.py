"""Typed dataclass configs: loaded from TOML/YAML/JSON files, overridden from the command line.

Every stage declares one dataclass (nested dataclasses allowed). `parse(Cls, argv)` reads
`--config FILE` and then `--key value` / `--section.key value` / `--key=value` overrides.
An unknown or mistyped field is a one-line `ConfigError` naming it and the valid fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the dataclass."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from a file or a command-line string) to type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if value.lower().endswith(("e", "e+")) else int(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are errors."""
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown field {key!r}; valid fields: {', '.join(sorted(fields))}"
            )
        f = fields[key]
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and \
                f.default_factory is not dataclasses.MISSING:
            # A partial nested table overrides the stage's own defaults for that section
            # (e.g. SFT's train.lr), not the section class's defaults.
            value = _merge(dataclasses.asdict(f.default_factory()), value)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if p.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"{p}: cannot parse config: {e}") from None
    raise ConfigError(f"{p}: unknown config format {p.suffix!r} (expected .toml, .yaml or .json)")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.replace("-", "_").split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part!r} is not a section")
    node[last] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `--config FILE --a.b 3 --flag` into the config path and a nested dict."""
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (overrides are --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag
        if key == "config":
            config_path = value
        else:
            _set_dotted(overrides, key, value)
        i += 1
    return config_path, overrides


def parse(cls: type[T], argv: list[str], defaults: dict[str, Any] | None = None) -> T:
    """Defaults of `cls` <- `defaults` <- `--config FILE` <- `--key value` overrides."""
    config_path, overrides = parse_overrides(argv)
    data = dict(defaults or {})
    if config_path:
        data = _merge(data, load_file(config_path))
    data = _merge(data, overrides)
    return from_dict(cls, data)


def save(cfg: Any, path: str | os.PathLike) -> None:
    from llama2.utils import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, default=str) + "\n")

"""Config loading: dataclass defaults <- YAML file <- dotted command-line overrides.

Why this module exists: every command must reject a bad config (unknown key, wrong type, missing
file, malformed override) with one clear line *before* spending compute, and every run folder
must record the exact, fully resolved config it ran with. The schema of each command is a plain
dataclass (every field commented), so the defaults live in code, YAML files only say what
differs, and the object handed to a recipe is a real, typed dataclass instance.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from spo.errors import ConfigError

T = TypeVar("T")

__all__ = ["dump_config", "load_config"]


# --------------------------------------------------------------------------------------------
# Schema introspection (what keys and types a dataclass schema accepts)
# --------------------------------------------------------------------------------------------


def _field_types(schema: type) -> dict[str, Any]:
    """Field name -> resolved type hint (works with `from __future__ import annotations`)."""
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # unresolvable forward reference: fall back to the raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(schema)}


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X, so that optional nested sections are still checked key by key."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_section(tp: Any) -> bool:
    """A nested dataclass: its keys are checked like the top level's."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_free_mapping(tp: Any) -> bool:
    """A `dict[str, X]` field: any sub-key is allowed, so key checking stops there."""
    return tp is dict or typing.get_origin(tp) in (dict, Mapping)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _unknown_key(key: str, valid: Sequence[str], source: str) -> ConfigError:
    """The one-line error for a key the schema does not have, with the closest valid key."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    if close:
        hint = f"did you mean '{close[0]}'?"
    elif valid:
        hint = "valid keys: " + ", ".join(valid)
    else:
        hint = "this section has no keys"
    return ConfigError(f"unknown config key '{key}' in {source}; {hint}")


def _check_mapping_keys(data: Mapping, schema: type, prefix: str, source: str) -> None:
    """Reject unknown keys of a YAML mapping at every nesting level."""
    fields = _field_types(schema)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(dotted, [f"{prefix}{k}" for k in fields], source)
        tp = _unwrap_optional(fields[key])
        if _is_section(tp) and isinstance(value, Mapping):
            _check_mapping_keys(value, tp, dotted + ".", source)


def _check_dotted_key(key: str, schema: type, source: str) -> Any:
    """Reject an unknown dotted key; return the expected type of the field it names."""
    parts = key.split(".")
    current, prefix = schema, ""
    tp: Any = Any
    for i, part in enumerate(parts):
        fields = _field_types(current)
        if part not in fields:
            raise _unknown_key(prefix + part, [prefix + k for k in fields], source)
        tp = _unwrap_optional(fields[part])
        if i == len(parts) - 1:
            return fields[part]
        if _is_free_mapping(tp):
            return Any
        if not _is_section(tp):
            raise ConfigError(
                f"unknown config key '{key}' in {source}; "
                f"'{prefix + part}' is a value of type {_type_name(tp)}, not a section"
            )
        current, prefix = tp, prefix + part + "."
    return tp


def _expected_type(schema: type, dotted: str) -> Any | None:
    """Best-effort type of a dotted key, for error messages only."""
    try:
        return _check_dotted_key(dotted, schema, "")
    except ConfigError:
        return None


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return "?"
        data = data[part]
    return data


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> DictConfig:
    """Read a YAML file that must be a mapping; every failure is one line naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
        # OmegaConf reads a bare scalar file ("hello") as {"hello": None}: check the raw shape.
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        where = ""
        if e.problem_mark is not None:
            where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
        raise ConfigError(f"cannot parse config file {path}: {e.problem or e}{where}") from e
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if not isinstance(loaded, DictConfig) or not (raw is None or isinstance(raw, dict)):
        kind = "list" if isinstance(loaded, ListConfig) else type(raw).__name__
        raise ConfigError(f"config file {path} must be a YAML mapping of key: value, got a {kind}")
    return loaded


def _invalid_value(key: str, value: Any, schema: type, source: str) -> ConfigError:
    expected = _expected_type(schema, key)
    want = f": expected {_type_name(expected)}" if expected is not None else ""
    return ConfigError(f"invalid value {value!r} for config key '{key}' in {source}{want}")


def _parse_override(token: str) -> tuple[str, str]:
    key, sep, value = token.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override '{token}': expected key=value")
    return key, value


def load_config(
    schema: type[T],
    path: str | Path | None,
    overrides: Sequence[str] = (),
    out: str | None = None,
) -> T:
    """Build a `schema` instance: dataclass defaults <- YAML `path` <- `overrides` <- `out`.

    `overrides` are dotted `key=value` tokens (`model.lr=1e-5`); values are parsed as YAML
    scalars and type-checked against the schema. `out`, when given, replaces the `out` field
    (the CLI's `--out`). Any problem raises a one-line ConfigError naming the file or override,
    the key, and for unknown keys the closest valid one.
    """
    if not _is_section(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    cfg = OmegaConf.structured(schema)

    if path is not None:
        path = Path(path)
        loaded = _load_yaml(path)
        data = OmegaConf.to_container(loaded, resolve=False)
        assert isinstance(data, dict)
        _check_mapping_keys(data, schema, "", str(path))
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            if key:
                raise _invalid_value(str(key), _lookup(data, str(key)), schema, str(path)) from e
            raise ConfigError(f"invalid config file {path}: {e}") from e

    for token in overrides:
        key, value = _parse_override(token)
        source = f"override '{token}'"
        _check_dotted_key(key, schema, source)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([token]))
        except OmegaConfBaseException as e:
            raise _invalid_value(key, value, schema, source) from e

    if out is not None:
        if "out" not in _field_types(schema):
            raise TypeError(f"{schema.__name__} has no 'out' field, so --out cannot be applied")
        try:
            cfg.out = out
        except OmegaConfBaseException as e:
            raise _invalid_value("out", out, schema, "--out") from e

    try:
        result = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required config key '{getattr(e, 'full_key', e)}'") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}") from e
    assert isinstance(result, schema)
    return result


def dump_config(cfg: Any) -> str:
    """YAML text of a resolved config (a dataclass instance); `load_config` reads it back."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)

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
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from spo.errors import ConfigError
from spo.sources import read_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `1e-3` is a float (YAML 1.1 wants `1.0e-3`) and a key
    given twice is an error instead of silently the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document in `text` and its node tree, which keeps every scalar's text as written."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    finally:
        loader.dispose()


def _keep_text(value: Any, node: yaml.Node | None, tp: Any) -> Any:
    """`value` with each scalar that sits where the schema wants a `str` replaced by its text as
    written: YAML 1.1 reads no / off / yes / on as booleans and 1e5 or 0123 as numbers, which
    would turn `mixed_precision: no` into "False" and `resume: NO` into "False". A null stays
    None (an optional string), and other types keep YAML's reading (a bool field still takes
    true / false)."""
    tp = _unwrap_optional(tp)
    if isinstance(node, yaml.ScalarNode):
        return node.value if tp is str and value is not None else value
    if isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        if typing.get_origin(tp) is not list:
            return value
        (item,) = typing.get_args(tp) or (Any,)
        return [_keep_text(v, n, item) for v, n in zip(value, node.value, strict=True)]
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        if _is_section(tp):
            types_of = _field_types(tp)
        elif _is_free_mapping(tp) and len(typing.get_args(tp)) == 2:
            types_of = dict.fromkeys(value, typing.get_args(tp)[1])
        else:
            return value
        nodes = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        return {k: _keep_text(v, nodes.get(k), types_of.get(k, Any)) for k, v in value.items()}
    return value


def _load_yaml(path: Path | Traversable, schema: type, retired: Sequence[str] = ()) -> dict:
    """Read a YAML file that must be a mapping, string-typed values as written, less the
    dotted `retired` keys; every failure is one line naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data, node = _parse_yaml(read_text(path, "config file"))
    except yaml.MarkedYAMLError as e:
        where = ""
        if e.problem_mark is not None:
            where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
        raise ConfigError(f"cannot parse config file {path}: {e.problem or e}{where}") from e
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise ConfigError(f"config file {path} must be a YAML mapping of key: value, got a {kind}")
    for key in retired:
        *parents, leaf = key.split(".")
        section = data
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    _check_mapping_keys(data, schema, "", str(path))
    return _keep_text(data, node, schema)


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
    path: str | Path | Traversable | None,
    overrides: Sequence[str] = (),
    out: str | None = None,
    *,
    retired: Sequence[str] = (),
) -> T:
    """Build a `schema` instance: dataclass defaults <- YAML `path` <- `overrides` <- `out`.

    `overrides` are dotted `key=value` tokens (`model.lr=1e-5`); values are parsed as YAML
    and type-checked against the schema, except that a string key keeps its text as given
    (`mixed_precision=no` is "no", not False). `out`, when given, replaces the `out` field
    (the CLI's `--out`). Any problem raises a one-line ConfigError naming the file or override,
    the key, and for unknown keys the closest valid one. `retired` keys of the file are
    dropped (a run folder's config.yaml recorded by an older version).
    """
    if not _is_section(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    cfg = OmegaConf.structured(schema)

    if path is not None:
        path = Path(path) if isinstance(path, str) else path
        data = _load_yaml(path, schema, retired)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            if key:
                raise _invalid_value(str(key), _lookup(data, str(key)), schema, str(path)) from e
            raise ConfigError(f"invalid config file {path}: {e}") from e

    for token in overrides:
        key, value = _parse_override(token)
        source = f"override '{token}'"
        tp = _check_dotted_key(key, schema, source)
        try:
            parsed, node = _parse_yaml(value)
        except yaml.YAMLError as e:
            if _unwrap_optional(tp) is not str:
                raise ConfigError(
                    f"invalid value {value!r} for config key '{key}' in {source}: not YAML "
                    f"({getattr(e, 'problem', None) or e})"
                ) from e
            parsed, node = value, None  # a string key takes any text (`out=@runs`)
        patch = _keep_text(parsed, node, tp)
        for part in reversed(key.split(".")):
            patch = {part: patch}
        try:
            cfg = OmegaConf.merge(cfg, patch)
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

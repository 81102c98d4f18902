"""The errors of judge checkpoints and the checks that raise them, importable without torch
(the `spo` CLI catches them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A folder or state dict that is not a loadable SPM checkpoint; the message is one line."""


class CheckpointNotFoundError(FileNotFoundError):
    """An SPM checkpoint folder or its weights file does not exist; the message is one line."""


def check_state_dict(
    expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], source: str
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    for problem, keys in (
        ("missing weight", [k for k in expected if k not in got]),
        ("unexpected weight", [k for k in got if k not in expected]),
    ):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{source}: {problem} {keys[0]!r}{more}")
    for key, shape in expected.items():
        if tuple(got[key]) != tuple(shape):
            raise CheckpointError(
                f"{source}: weight {key!r} has shape {tuple(got[key])}, "
                f"the model expects {tuple(shape)}"
            )


def read_config_file(path: Path, schema: Any, kind: str, version: int) -> Any:
    """A checkpoint's JSON config as a `schema` dataclass; one line naming the first problem:
    not JSON, another kind, another format version, an unknown or a missing key."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: kind is {found!r}, expected {kind!r}")
    if data.get("version") != version:
        raise CheckpointError(
            f"{path}: format version {data.get('version')!r} is not supported "
            f"(this code reads version {version})"
        )
    fields = dataclasses.fields(schema)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}")
    missing = sorted(
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r}")
    return schema(**data)

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


def check_safetensors(path: Path) -> None:
    """One line for a weights file that is cut short or is not safetensors, read from its
    header alone (no tensor is loaded): an interrupted copy fails before any model is built."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"{path}: not a complete safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes of {8 + n + end}; an interrupted copy or download?)"
        )


# A judge folder holds one of these configs (preference_model.model / .latent) and its weights:
# the pixel SPM (judges decoded images) or the latent judge (judges a model family's latents).
JUDGE_KINDS = {"pixel": "spm_config.json", "latent": "latent_judge_config.json"}
JUDGE_CONFIGS = tuple(JUDGE_KINDS.values())
JUDGE_WEIGHTS = "model.safetensors"


def judge_kind(folder: str | Path) -> str | None:
    """Which judge a folder holds, by its config file: "pixel", "latent", or None."""
    return next((k for k, name in JUDGE_KINDS.items() if (Path(folder) / name).is_file()), None)


def judge_trained_on(folder: str | Path) -> dict[str, Any] | None:
    """The base model a judge was trained on, as its config records it ({"source", "family",
    "resolution", "latent_channels"}; None when unknown), read without building the judge."""
    kind = judge_kind(folder)
    if kind is None:
        return None
    try:
        data = json.loads((Path(folder) / JUDGE_KINDS[kind]).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None  # check_judge_folder / load name the problem
    trained_on = data.get("trained_on") if isinstance(data, dict) else None
    return trained_on if isinstance(trained_on, dict) else None


def check_judge_folder(folder: str | Path, kind: str | None = None, use: str = "") -> None:
    """The cheap checks of a judge folder, before any model is built: it exists, holds a judge
    config (of `kind`, when given: `use` says what needs that kind), and its weights file is
    whole."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: no such SPM checkpoint folder")
    if not any((folder / name).is_file() for name in JUDGE_CONFIGS):
        hint = "; it is a diffusers pipeline" if (folder / "model_index.json").is_file() else ""
        raise CheckpointError(
            f"{folder} is not a step-aware judge checkpoint (no {' or '.join(JUDGE_CONFIGS)}{hint})"
        )
    found = judge_kind(folder)
    if kind is not None and found != kind:
        raise CheckpointError(f"{folder} is a {found} judge, but {use} takes a {kind} judge")
    weights = folder / JUDGE_WEIGHTS
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{folder}: weights file {JUDGE_WEIGHTS} is missing")
    check_safetensors(weights)

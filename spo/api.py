"""The Python API: the commands as functions, with the CLI's config checks.

    from spo import load_config, train_dpo
    cfg = load_config("train-dpo", "configs/toy/dpo.yaml", {"max_steps": 50}, out="runs/mine")
    summary = train_dpo(cfg)                          # or train_dpo("configs/toy/dpo.yaml", ...)

Each function takes a config object (from `load_config`, possibly edited), or a YAML path (or
None for the built-in defaults) with dotted overrides and `out`, validates it exactly as the
`spo` command does (a one-line `spo.errors.ConfigError` before any model loads), runs the
command and returns its result as a dict. Errors are raised, not turned into exit codes. An
`out` holding another command's run, or a non-empty folder no command made, is refused as by the
CLI (`use_existing_out=True` is its `--use-existing-out`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spo.config import COMMAND_CONFIGS, command_config, require_finite

__all__ = ["compare", "load_config", "train_dpo", "train_preference_model", "train_spo"]


def load_config(
    command: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
) -> Any:
    """The validated config of `command` ("train-dpo", ...): defaults <- YAML `path` <-
    `overrides` ({"optim.lr": 1e-4, ...}) <- `out`, as `spo COMMAND --config PATH --out OUT
    key=value ...` builds it."""
    if command not in COMMAND_CONFIGS:
        from spo.errors import ConfigError

        raise ConfigError(f"unknown command {command!r}; known: {', '.join(COMMAND_CONFIGS)}")
    tokens = [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]
    return command_config(command, path, tokens, None if out is None else str(out))


def _resolve(command: str, config: Any, overrides, out) -> Any:
    if config is None or isinstance(config, str | Path):
        return load_config(command, config, overrides, out)
    if not isinstance(config, COMMAND_CONFIGS[command]):
        raise TypeError(f"{command} needs a {COMMAND_CONFIGS[command].__name__}")
    if overrides or out is not None:  # re-read through the loader, so overrides are checked
        from spo.config import dump_config

        config = _from_yaml(command, dump_config(config), overrides or {}, out)
    require_finite(config)
    config.validate()
    return config


def _from_yaml(command: str, text: str, overrides: Mapping[str, Any], out) -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(command, f.name, overrides, out)
    finally:
        Path(f.name).unlink()


def _run(command: str, function: str, config, overrides, out, use_existing_out: bool) -> dict:
    import importlib

    from spo.runs import check_out

    cfg = _resolve(command, config, overrides, out)
    check_out(command, cfg.out, existing_ok=use_existing_out)
    module = importlib.import_module(f"spo.commands.{command.replace('-', '_')}")
    return getattr(module, function)(cfg)


def train_preference_model(
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    use_existing_out: bool = False,
) -> dict:
    """`spo train-preference-model`: returns the final evaluation (eval.json)."""
    return _run(
        "train-preference-model", "train_preference_model", config, overrides, out, use_existing_out
    )


def train_dpo(
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    use_existing_out: bool = False,
) -> dict:
    """`spo train-dpo`: returns the run's summary (final/train_summary.json)."""
    return _run("train-dpo", "train_dpo", config, overrides, out, use_existing_out)


def train_spo(
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    use_existing_out: bool = False,
) -> dict:
    """`spo train-spo`: returns the run's summary (final/train_summary.json)."""
    return _run("train-spo", "train_spo", config, overrides, out, use_existing_out)


def compare(
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    use_existing_out: bool = False,
) -> dict:
    """`spo compare`: returns results.json's content (means, intervals, win rates)."""
    return _run("compare", "run_compare", config, overrides, out, use_existing_out)

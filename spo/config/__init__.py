"""Typed run configs: dataclass defaults <- YAML file <- dotted command-line overrides.

Why: every command must reject a bad config (unknown key, wrong type, missing file, malformed
override) with one clear line *before* spending compute, and every run folder records the
exact, fully resolved config it ran with. `loader` holds the machinery, `schemas` the
dataclass of each command, `shipped` finds the configs that ship in the package, `commented`
prints a config with its comments (`--print-config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spo.config.commented import commented_yaml
from spo.config.loader import dump_config, load_config
from spo.config.schemas import (
    COMMAND_CONFIGS,
    BenchmarkConfig,
    CompareConfig,
    DemoConfig,
    DPOTrainConfig,
    ModelSpec,
    OptimConfig,
    PolicyConfig,
    PreparePromptsConfig,
    SamplerConfig,
    SpeedConfig,
    SPMTrainConfig,
    SPOTrainConfig,
    ToyWorldConfig,
    ValidationImagesConfig,
    require_finite,
)
from spo.config.shipped import TOY_CONFIGS, resolve_config, shipped_configs

__all__ = [
    "BenchmarkConfig",
    "COMMAND_CONFIGS",
    "CompareConfig",
    "DPOTrainConfig",
    "DemoConfig",
    "ModelSpec",
    "OptimConfig",
    "PolicyConfig",
    "PreparePromptsConfig",
    "SPMTrainConfig",
    "SPOTrainConfig",
    "SamplerConfig",
    "SpeedConfig",
    "TOY_CONFIGS",
    "ToyWorldConfig",
    "ValidationImagesConfig",
    "command_config",
    "commented_yaml",
    "dump_config",
    "load_config",
    "shipped_configs",
]


def command_config(
    command: str, path: str | Path | None, overrides: list[str], out: str | None = None
) -> Any:
    """The validated config of `command` (`spo <command> --config PATH --out OUT overrides`):
    what the CLI and the demo's stages run with. `path` may name a shipped config (`toy/dpo`).
    Raises a one-line ConfigError."""
    source = None if path is None else resolve_config(path, command)
    cfg = load_config(COMMAND_CONFIGS[command], source, overrides, out)
    require_finite(cfg)
    cfg.validate()
    return cfg

"""Typed run configs: dataclass defaults <- YAML file <- dotted command-line overrides.

Why: every command must reject a bad config (unknown key, wrong type, missing file, malformed
override) with one clear line *before* spending compute, and every run folder records the
exact, fully resolved config it ran with. `loader` holds the machinery, `schemas` the
dataclass of each command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    SamplerConfig,
    SpeedConfig,
    SPMTrainConfig,
    SPOTrainConfig,
    ToyWorldConfig,
    ValidationImagesConfig,
    require_finite,
)

__all__ = [
    "BenchmarkConfig",
    "COMMAND_CONFIGS",
    "CompareConfig",
    "DPOTrainConfig",
    "DemoConfig",
    "ModelSpec",
    "OptimConfig",
    "PolicyConfig",
    "SPMTrainConfig",
    "SPOTrainConfig",
    "SamplerConfig",
    "SpeedConfig",
    "ToyWorldConfig",
    "ValidationImagesConfig",
    "command_config",
    "dump_config",
    "load_config",
]


def command_config(
    command: str, path: str | Path | None, overrides: list[str], out: str | None = None
) -> Any:
    """The validated config of `command` (`spo <command> --config PATH --out OUT overrides`):
    what the CLI and the demo's stages run with. Raises a one-line ConfigError."""
    cfg = load_config(COMMAND_CONFIGS[command], path, overrides, out)
    require_finite(cfg)
    cfg.validate()
    return cfg

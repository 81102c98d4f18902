"""The errors every `spo` command turns into one line and exit code 2.

Why a module of their own: every layer raises them (config checks, data loading, model loading,
the training loop), and the CLI catches them, so they sit at the bottom where anyone can import
them without pulling in torch or a config schema.
"""

from __future__ import annotations

from preference_model.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "INPUT_ERRORS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "TrainingError",
]


class ConfigError(ValueError):
    """A bad config or bad input. Its message is always one line: the CLI prints it as-is."""

    def __init__(self, message: str) -> None:
        # Collapse newlines so that no caller can break the one-line contract by accident.
        super().__init__(" ".join(str(message).split()))


class TrainingError(RuntimeError):
    """A run that had to stop (non-finite loss, a failed demo stage, ...); the message is one
    line."""


# Bad input or a stopped run: printed as one line, exit code 2 (a missing file included).
INPUT_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    TrainingError,
    CheckpointError,
    FileNotFoundError,
)

"""The errors of SPM checkpoints, importable without torch (the `spo` CLI catches them)."""


class CheckpointError(ValueError):
    """A folder or state dict that is not a loadable SPM checkpoint; the message is one line."""


class CheckpointNotFoundError(FileNotFoundError):
    """An SPM checkpoint folder or its weights file does not exist; the message is one line."""

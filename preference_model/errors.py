"""The errors of SPM checkpoints, importable without torch (the `spo` CLI catches them)."""


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

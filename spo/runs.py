"""The run folder contract shared by every command.

A run folder holds the resolved `config.yaml`, an append-only `metrics.jsonl`, `checkpoints/`
and `final/`. Why: any run can be inspected, compared or resumed from its folder alone, and
the folder is checked to be writable *before* any compute is spent. The atomic helpers here are
how every trainer writes files and checkpoints, so that a killed run never leaves a half-written
file or checkpoint that resume would pick up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo.config.loader import dump_config
from spo.errors import ConfigError
from spo.sources import check_hub_model, is_local_path

__all__ = [
    "RUN_MARKER",
    "RunDir",
    "RunLock",
    "check_out",
    "check_writable",
    "clean_leftovers",
    "atomic_dir",
    "atomic_write_bytes",
    "made_by",
    "prepare_run_dir",
    "require_base_model",
    "require_model",
    "require_path",
    "run_folder_command",
]

# The demo's stage folders (OUT/<stage>) and the command that makes each.
TOY_STAGES = {
    "world": "toy-world",
    "spm": "train-preference-model",
    "dpo": "train-dpo",
    "spo": "train-spo",
    "compare": "compare",
}
# Toy run folders -> the command that makes them, for "input missing" messages.
_MADE_BY = {
    "world": "spo toy-world",
    "spm": "spo train-preference-model --config configs/toy/spm.yaml",
    "dpo": "spo train-dpo --config configs/toy/dpo.yaml",
    "spo": "spo train-spo --config configs/toy/spo.yaml",
}
# Every run folder names the command that made it here, so no other command writes into it.
RUN_MARKER = "spo_run.json"


def _umask() -> int:
    # Read the process umask (there is no read-only call) so temp files get normal permissions.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling file and `os.replace`.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use what open() would have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `final_path` only if the block succeeds.

    Use it for checkpoints: write everything into the yielded folder; on success it is renamed
    onto `final_path` (an existing folder there is replaced); on an exception it is deleted and
    `final_path` is left untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_path.parent, prefix=f".{final_path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old: Path | None = None
    try:
        if final_path.exists() or final_path.is_symlink():
            # A directory cannot be os.replace'd onto a non-empty one: move the old one aside
            # first, put the new one in place, then delete the old one.
            old = Path(tempfile.mkdtemp(dir=final_path.parent, prefix=f".{final_path.name}.old-"))
            old.rmdir()
            os.replace(final_path, old)
        os.replace(tmp, final_path)
    except BaseException:
        if old is not None and not final_path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final_path)  # put the previous version back
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)


def _jsonable(value: Any) -> Any:
    """Plain JSON values from numpy / torch scalars; non-finite floats become null."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a multi-element array or tensor
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


@dataclass(frozen=True)
class RunDir:
    """A prepared run folder; build it with `prepare_run_dir`."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        """Intermediate checkpoints, each written with `atomic_dir`."""
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        """The run's final artefacts (weights, data, report)."""
        return self.root / "final"

    @property
    def metrics_path(self) -> Path:
        """Append-only JSON lines: one object per `log_metrics` call."""
        return self.root / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        """The resolved config the run was started with."""
        return self.root / "config.yaml"

    def log_metrics(self, step: int, **values: Any) -> None:
        """Append one JSON line `{"step", "time", **values}` to metrics.jsonl.

        Non-finite floats are written as null so every line stays valid JSON.
        """
        reserved = {"step", "time"} & values.keys()
        if reserved:
            raise TypeError(f"log_metrics: {sorted(reserved)} are reserved metric names")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({str(k): _jsonable(v) for k, v in values.items()})
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)


def command_of(cfg: Any) -> str:
    """The command whose config `cfg` is."""
    from spo.config.schemas import COMMAND_CONFIGS

    for name, schema in COMMAND_CONFIGS.items():
        if isinstance(cfg, schema):
            return name
    raise TypeError(f"{type(cfg).__name__} is no command's config")


def _unwritable(out: str | Path, error: OSError) -> ConfigError:
    """One line for any OS error met while creating or writing a run folder."""
    reason = error.strerror or str(error)
    if isinstance(error, NotADirectoryError | FileExistsError):
        reason = "a parent of it is a file, not a folder"
    return ConfigError(f"cannot write to output folder {out}: {reason}")


def prepare_run_dir(
    out: str | Path, cfg: Any, *, folders: tuple[str, ...] = (), metrics: bool = False
) -> RunDir:
    """Create the run folder `out` and record `cfg`, failing fast if it cannot be written.

    Writes the marker naming the command (`spo_run.json`) and the resolved `config.yaml`;
    creates `folders` (a trainer's `checkpoints`, `final`) and, with `metrics`, an empty
    `metrics.jsonl` (an existing one is kept, so a resumed run appends to it). Raises a
    one-line ConfigError "cannot write to output folder OUT: reason" before anything else.
    """
    root = Path(out)
    try:
        if root.exists() and not root.is_dir():
            raise ConfigError(f"cannot write to output folder {out}: it exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _unwritable(out, e) from e

    run = RunDir(root)
    command = command_of(cfg)
    try:
        if not (root / RUN_MARKER).is_file():
            marker = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_bytes(root / RUN_MARKER, (json.dumps(marker) + "\n").encode())
        for name in folders:
            (root / name).mkdir(exist_ok=True)
        if metrics:
            run.metrics_path.touch(exist_ok=True)
        atomic_write_bytes(run.config_path, dump_config(cfg).encode("utf-8"))
    except OSError as e:
        raise _unwritable(out, e) from e
    return run


def check_writable(out: str | Path) -> None:
    """A one-line ConfigError when `out` could not be created or written, checked without
    leaving anything behind: the nearest existing ancestor must be a folder in which a
    (removed at once) probe folder can be made, which also catches places the kernel refuses
    to root (/sys, /proc) and read-only mounts."""
    path = Path(out).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise ConfigError(f"cannot write to output folder {out}: it exists and is not a folder")
    if not probe.is_dir():
        raise ConfigError(f"cannot write to output folder {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to output folder {out}: {probe} is not writable")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot write to output folder {out}: {probe}: {reason}") from e


def _config_command(config: Path) -> str | None:
    """The command whose schema best fits the top-level keys of a run's config.yaml (run
    folders written before the marker): the one sharing the most keys, at least half."""
    import yaml

    from spo.config.schemas import COMMAND_CONFIGS

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or not data:
        return None
    keys = set(map(str, data))

    def overlap(schema: type) -> float:
        names = {f.name for f in dataclasses.fields(schema)}
        return len(keys & names) / len(keys | names)

    name, schema = max(COMMAND_CONFIGS.items(), key=lambda item: overlap(item[1]))
    return name if overlap(schema) >= 0.5 else None


def run_folder_command(folder: str | Path) -> str | None:
    """The `spo` command that made `folder` (its marker; for older folders, its config.yaml,
    or demo.json for the demo's), or None when it is not a run folder."""
    folder = Path(folder)
    marker = folder / RUN_MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text(encoding="utf-8"))["command"])
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown"
    if (folder / "config.yaml").is_file():
        return _config_command(folder / "config.yaml")
    if (folder / "demo.json").is_file():
        return "demo"
    return None


def _user_entries(folder: Path) -> list[str]:
    """What `folder` holds besides run locks and leftovers of interrupted writes."""
    return sorted(
        e.name
        for e in folder.iterdir()
        if not (e.name.startswith(RunLock.NAME) or _LEFTOVER.match(e.name))
    )


def check_out(command: str, out: str | Path, *, existing_ok: bool = False) -> None:
    """Refuse, in one line and before anything is created, an `--out` that would spoil what
    is there: a run folder of another command, a place inside any run folder but the demo's
    (reading a DPO run or an SPM never writes into it), or, for a folder `out`, one that is
    not empty and no run folder (unless `existing_ok`). The demo's own folder may hold its
    stage folders, each made by its stage's command, and other run folders beside them, but no
    file of another command."""
    path = Path(out).absolute()
    for parent in path.parents:
        owner = run_folder_command(parent) if parent.is_dir() else None
        if owner is not None and (owner != "demo" or command == "prepare-prompts"):
            raise ConfigError(
                f"--out {out} lies inside {parent}, a run folder of `spo {owner}`; "
                f"`spo {command}` never writes into another run's folder: choose an --out "
                "outside it"
            )
    if command == "prepare-prompts" or not path.is_dir():
        return
    owner = run_folder_command(path)
    if command == "demo":
        for stage, maker in TOY_STAGES.items():
            if (path / stage).is_dir():
                check_out(maker, path / stage, existing_ok=existing_ok)
    if owner is None:
        entries = _user_entries(path)
        if command == "demo":
            entries = [e for e in entries if e not in TOY_STAGES]
        if entries and not existing_ok:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(
                f"--out {out} is not empty ({shown}) and is no spo run folder; choose an empty "
                "or new folder, or pass --use-existing-out to write into it"
            )
    elif owner != command:
        raise ConfigError(
            f"--out {out} is a run folder of `spo {owner}`; `spo {command}` would overwrite "
            "it: choose another --out"
        )


# What an interrupted atomic write leaves behind: `.NAME.tmp-*`, `.NAME.old-*` (atomic_dir),
# `.NAME.*.tmp` (atomic_write_bytes), `.step-N.tmp` (checkpoints), `.write-probe-*`.
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(tmp-.+|old-.+|.+\.tmp|tmp)$|^\.write-probe-")


def clean_leftovers(root: str | Path) -> list[str]:
    """Delete what killed runs left half-written in `root` and `root/checkpoints`; a folder
    moved aside by `atomic_dir` (`.NAME.old-*`) whose replacement never arrived is put back.
    Call it only while holding the run's lock. Returns the names removed or restored."""
    done = []
    root = Path(root)
    for folder in (root, root / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            m = _LEFTOVER.match(entry.name)
            if m is None:
                continue
            original = folder / m.group("name") if m.group("name") else None
            if ".old-" in entry.name and original is not None and not original.exists():
                os.replace(entry, original)
                done.append(f"restored {original.name}")
                continue
            _remove(entry)
            done.append(entry.name)
    return done


class RunLock:
    """Exclusive use of a run folder for the life of a run.

    `OUT/.lock` is held (flock, exclusive) by the run's main process and names it; every
    process of the run holds `OUT/.lock.ranks` shared. A second run fails on the first lock;
    a run started while workers of a killed launcher still write into the folder fails on the
    second. The kernel drops both when a process dies, so a stale lock cannot block a run.
    """

    NAME, RANKS = ".lock", ".lock.ranks"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._files: list = []

    def acquire(self) -> None:
        """Main process: take the folder, or a one-line ConfigError naming who holds it."""
        lock = open(self.root / self.NAME, "a+")  # noqa: SIM115 -- held until release()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(
                f"run folder {self.root} is in use by another run ({holder}); wait for it "
                "to end or choose another --out"
            ) from None
        ranks = open(self.root / self.RANKS, "a+")  # noqa: SIM115
        try:
            fcntl.flock(ranks, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = _flock_holders(self.root / self.RANKS)
            who = f"pid {', '.join(map(str, pids))}" if pids else "processes"
            ranks.close()
            lock.close()
            raise ConfigError(
                f"run folder {self.root} is still written by {who} of an earlier run whose "
                "launcher was killed; stop them first"
            ) from None
        fcntl.flock(ranks, fcntl.LOCK_UN)
        ranks.close()
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n")
        lock.flush()
        self._files.append(lock)

    def join(self) -> None:
        """Every process of the run (the main one too, after `acquire`)."""
        ranks = open(self.root / self.RANKS, "a+")  # noqa: SIM115
        fcntl.flock(ranks, fcntl.LOCK_SH)
        self._files.append(ranks)

    def release(self) -> None:
        """Drop the locks; the files stay (deleting them would race with the next run)."""
        for f in self._files:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        self._files = []


def _flock_holders(path: Path) -> list[int]:
    """Pids holding a flock on `path` (Linux /proc/locks; [] where it cannot be read)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(inode):
            pids.append(int(fields[4]))
    return sorted(set(pids))


def made_by(path: str | Path) -> str | None:
    """The command that writes `path` when it lies in a toy run folder (runs/toy/<stage>/...)."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "toy" and parts[i + 1] in _MADE_BY:
            return _MADE_BY[parts[i + 1]]
    return None


def require_path(path: str | Path, what: str) -> Path:
    """`path` if it exists, else a one-line ConfigError saying which command makes it."""
    path = Path(path)
    if not path.exists():
        command = made_by(path)
        hint = f"; `{command}` writes it" if command else ""
        raise ConfigError(f"{what} not found: {path}{hint}")
    return path


def require_base_model(cfg: Any) -> None:
    """A trainer's `base_model` and, when set, its replacement `vae` (`require_model`)."""
    require_model(cfg.base_model)
    if cfg.vae is not None:
        require_model(cfg.vae, "vae", "config.json")


def require_model(source: str, what: str = "base model", file: str = "model_index.json") -> None:
    """A model named by a local folder must exist and hold `file` (a diffusers pipeline's
    model_index.json; a component's config.json), with one line naming the command that
    makes it for a toy run folder; a name shaped like a Hub repository (`org/name`) that is no
    local path gets the Hub's fast one-line check (`spo.sources.check_hub_model`)."""
    path = Path(source).expanduser()
    if not (path.exists() or made_by(source) or is_local_path(source)):
        check_hub_model(source, what, file)
        return
    require_path(path, what)
    if path.is_dir() and not (path / file).is_file():
        kind = "a diffusers pipeline folder" if file == "model_index.json" else "a model folder"
        raise ConfigError(f"{what} {source} is not {kind} (no {file})")

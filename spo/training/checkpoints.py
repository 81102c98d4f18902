"""Resumable checkpoints, written atomically from every rank.

Why shared: the SPM, DPO and SPO trainers must all write checkpoints with
`accelerator.save_state` called on every rank (the released DPO code saved on rank 0 only and
hung under DeepSpeed), never leave a half-written checkpoint that resume would pick up, never
record diverged weights as good, say "disk full" in one line rather than in a traceback, fall
back past a checkpoint that does not load, and refuse to resume from a checkpoint of another
kind or mode.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from spo.errors import ConfigError, TrainingError
from spo.runs import atomic_write_bytes
from spo.training.distributed import local_part, on_main, ranks_where

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
METRICS_BYTES = "metrics_bytes"  # the size of metrics.jsonl when the checkpoint was written
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e3:,.0f} kB" if n >= 1e3 else f"{n:.0f} bytes"


class Checkpointer:
    """Resumable checkpoints `checkpoints/step-N/` written atomically from every rank.

    Each holds `accelerator.save_state` output plus `trainer_state.json` with the trainer's
    `kind` and `step`; `checkpoints/latest` names the newest complete one. A checkpoint appears
    under its final name only once every rank has written its part.
    """

    def __init__(self, root: Path, kind: str, total_limit: int) -> None:
        self.root = root
        self.kind = kind
        self.total_limit = total_limit

    @property
    def metrics_path(self) -> Path:
        return self.root.parent / "metrics.jsonl"

    # ---------------------------------------------------------------------------- writing

    def save(self, accelerator, step: int, state: dict[str, Any], params=()) -> Path:
        """Write `step-N` from every rank. Refused (TrainingError on every rank, nothing
        written) when a parameter in `params` (this rank's part of it) is not finite or the
        disk has no room for it."""
        finite = all(bool(torch.isfinite(local_part(p)).all()) for p in params)
        if ranks_where(accelerator, not finite):
            raise TrainingError(
                f"the weights are not finite at step {step}; not saved as a checkpoint. "
                f"{self.last_good()}"
            )
        needed = self._needed_bytes(params)
        on_main(accelerator, lambda: self._make_room(step, needed))
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        error = None
        try:
            accelerator.save_state(str(tmp))
        except Exception as e:  # noqa: BLE001 -- reported on every rank below, in one line
            error = e
        if ranks_where(accelerator, error is not None):
            on_main(accelerator, lambda: self._write_failed(tmp, step, needed, error))
        accelerator.wait_for_everyone()

        def publish() -> None:
            payload = {"kind": self.kind, "step": step, **state}
            if self.metrics_path.is_file():
                payload[METRICS_BYTES] = self.metrics_path.stat().st_size
            try:
                atomic_write_bytes(tmp / STATE_FILE, json.dumps(payload, indent=2).encode())
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write_bytes(self.root / LATEST_FILE, final.name.encode())
            except OSError as e:
                self._write_failed(tmp, step, needed, e)
            self._prune(keep=final, limit=self.total_limit)

        on_main(accelerator, publish)
        accelerator.wait_for_everyone()
        return final

    def mark(self, accelerator, step: int, **fields: Any) -> None:
        """Add `fields` to checkpoint step-N's trainer state (main process, atomically)."""
        if accelerator.is_main_process:
            path = self.root / f"step-{step}" / STATE_FILE
            state = json.loads(path.read_text()) | fields
            atomic_write_bytes(path, json.dumps(state, indent=2).encode())
        accelerator.wait_for_everyone()

    def newest_step(self) -> int | None:
        done = self._complete()
        return max(map(_step_of, done)) if done else None

    def _needed_bytes(self, params) -> int:
        """The room a new checkpoint needs: the newest one's size, else three times the
        trainable weights (weights and two Adam moments)."""
        done = self._complete()
        if done:
            return folder_bytes(max(done, key=_step_of))
        sizes = (getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
        return 3 * sum(sizes) + 64_000  # ds_numel: a ZeRO-3 weight's whole size

    def _make_room(self, step: int, needed: int) -> None:
        """Delete old checkpoints early (never the newest) when the disk cannot hold one
        more, and say "disk full" when even that is not enough."""
        self.root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.root).free >= needed:
            return
        self._prune(keep=None, limit=max(1, self.total_limit - 1))
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise TrainingError(
                f"disk full: checkpoint step-{step} needs about {_mb(needed)}, {_mb(free)} "
                f"free in {self.root}; free some space or lower checkpoints_total_limit. "
                f"{self.last_good()}"
            )

    def _write_failed(self, tmp: Path, step: int, needed: int, error) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(self.root).free
        full = (
            isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        ) or free < needed
        what = (
            f"disk full while writing checkpoint step-{step} ({_mb(free)} free in "
            f"{self.root}, about {_mb(needed)} needed)"
            if full
            else f"could not write checkpoint step-{step}: {error or 'on another process'}"
        )
        raise TrainingError(f"{what}. {self.last_good()}")

    def _prune(self, keep: Path | None, limit: int) -> None:
        steps = sorted(self._complete(), key=_step_of)
        newest = steps[-1] if steps else None
        old = [p for p in steps if p not in (keep, newest)]
        for path in old[: max(0, len(steps) - limit)]:
            shutil.rmtree(path, ignore_errors=True)

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            p
            for p in self.root.iterdir()
            if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
        ]

    def last_good(self) -> str:
        """Which checkpoint a resume would start from, for error messages."""
        done = self._complete()
        if not done:
            return "No checkpoint was written yet."
        newest = max(done, key=_step_of)
        return f"The last good checkpoint is {newest} (step {_step_of(newest)})."

    # ---------------------------------------------------------------------------- resuming

    def resolve(self, resume: str) -> list[Path]:
        """The checkpoints to try, in order: [] for `none` or when there is none yet; for
        `latest` every complete checkpoint of this kind, newest first (the `latest` pointer's
        first); else the one folder named, which must be a checkpoint of this kind."""
        if resume == "none":
            return []
        if resume != "latest":
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"resume checkpoint not found: {path}")
            self.read_state(path)
            return [path]
        found = sorted(self._complete(), key=_step_of, reverse=True)
        pointer = self.root / LATEST_FILE
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        if named in found:
            found.remove(named)
            found.insert(0, named)
        usable = []
        for path in found:
            try:
                self.read_state(path)
            except ConfigError as e:
                if "is a checkpoint of kind" in str(e):
                    raise
                print(f"skipping checkpoint {path}: {e}")
                continue
            usable.append(path)
        return usable

    def check_mode(
        self, paths: list[Path], mode: str, key: str = "policy.mode", default: str | None = None
    ) -> None:
        """One line when resuming a run of one mode from another mode's checkpoint (a LoRA run
        from a full one, a latent judge from a pixel one); `default` stands for checkpoints
        that record no mode."""
        for path in paths[:1]:
            theirs = self.read_state(path).get("mode", default)
            if theirs != mode:
                raise ConfigError(
                    f"cannot resume a {mode} run from {path}: that checkpoint is of a {theirs} "
                    f"run (set {key}={theirs} or resume=none)"
                )

    def read_state(self, path: Path) -> dict[str, Any]:
        """The checkpoint's trainer state; a one-line ConfigError for another kind."""
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise ConfigError(f"{path} is not a training checkpoint (no {STATE_FILE})")
        try:
            state = json.loads(state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{state_file}: not valid JSON ({e})") from e
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            kind = state.get("kind") if isinstance(state, dict) else None
            raise ConfigError(
                f"{path} is a checkpoint of kind {kind!r}; this run needs {self.kind!r}"
            )
        return state

    def load(self, accelerator, paths: list[Path]) -> dict[str, Any]:
        """Load the first of `paths` whose accelerate state loads on every rank, saying which
        were skipped and why; return its trainer state ({} when `paths` is empty). The main
        process cuts metrics.jsonl back to what it held when that checkpoint was written."""
        for i, path in enumerate(paths):
            error = None
            try:
                accelerator.load_state(str(path))
            except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: try the next one
                error = e
            failed = ranks_where(accelerator, error is not None)
            if not failed:
                state = self.read_state(path)
                if accelerator.is_main_process:
                    self._rewind_metrics(state.get(METRICS_BYTES))
                accelerator.print(f"resumed from {path} at step {state['step']}")
                return state
            reason = " ".join(str(error).split())[:200] if error else f"on rank {failed[0]}"
            if i + 1 < len(paths):
                accelerator.print(
                    f"checkpoint {path} does not load ({reason}); falling back to {paths[i + 1]}"
                )
                continue
            raise TrainingError(
                f"checkpoint {path} does not load ({reason}) and there is no earlier one to "
                "fall back to; resume=none starts afresh"
            )
        return {}

    def _rewind_metrics(self, size: int | None) -> None:
        """Drop the metrics logged after the checkpoint (the resumed run logs them again)."""
        path = self.metrics_path
        if size is None or not path.is_file() or path.stat().st_size <= size:
            return
        atomic_write_bytes(path, path.read_bytes()[:size])

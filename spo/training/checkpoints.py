"""Resumable checkpoints, written atomically from every rank.

Why shared: the SPM, DPO and SPO trainers must all write checkpoints with
`accelerator.save_state` called on every rank (the released DPO code saved on rank 0 only and
hung under DeepSpeed), never leave a half-written checkpoint that resume would pick up, and
refuse to resume from a checkpoint of another kind or mode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from spo.errors import ConfigError
from spo.runs import atomic_write_bytes

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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

    def save(self, accelerator, step: int, state: dict[str, Any]) -> Path:
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            payload = {"kind": self.kind, "step": step, **state}
            atomic_write_bytes(tmp / STATE_FILE, json.dumps(payload, indent=2).encode())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_bytes(self.root / LATEST_FILE, final.name.encode())
            self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        steps = sorted(self._complete(), key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
        old = [p for p in steps if p != keep][: max(0, len(steps) - self.total_limit)]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            p
            for p in self.root.iterdir()
            if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
        ]

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, `latest` (None when there is none yet), or a
        folder, which must be a complete checkpoint of this trainer's kind."""
        if resume == "none":
            return None
        if resume == "latest":
            pointer = self.root / LATEST_FILE
            path = self.root / pointer.read_text().strip() if pointer.is_file() else None
            if path is None or not (path / STATE_FILE).is_file():
                found = self._complete()
                if not found:
                    return None
                path = max(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
        else:
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"resume checkpoint not found: {path}")
        self.read_state(path)
        return path

    def check_mode(
        self, path: Path | None, mode: str, key: str = "policy.mode", default: str | None = None
    ) -> None:
        """One line when resuming a run of one mode from another mode's checkpoint (a LoRA run
        from a full one, a latent judge from a pixel one); `default` stands for checkpoints
        that record no mode."""
        if path is None:
            return
        theirs = self.read_state(path).get("mode", default)
        if theirs != mode:
            raise ConfigError(
                f"cannot resume a {mode} run from {path}: that checkpoint is of a {theirs} run "
                f"(set {key}={theirs} or resume=none)"
            )

    def read_state(self, path: Path) -> dict[str, Any]:
        """The checkpoint's trainer state; a one-line ConfigError for another kind."""
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise ConfigError(f"{path} is not a training checkpoint (no {STATE_FILE})")
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{state_file}: not valid JSON ({e})") from e
        if state.get("kind") != self.kind:
            raise ConfigError(
                f"{path} is a checkpoint of kind {state.get('kind')!r}; this run needs "
                f"{self.kind!r}"
            )
        return state

    def load(self, accelerator, path: Path | None) -> dict[str, Any]:
        """Load a checkpoint's accelerate state (every rank) and return its trainer state ({}
        when starting afresh)."""
        if path is None:
            return {}
        state = self.read_state(path)
        accelerator.load_state(str(path))
        accelerator.print(f"resumed from {path} at step {state['step']}")
        return state

"""What every trainer's loop needs besides its math: schedules, checkpoints, resume, seeds.

Why shared: the SPM, DPO and SPO trainers must all write checkpoints atomically with
`accelerator.save_state` called on every rank (the released DPO code saved on rank 0 only and
hung under DeepSpeed), refuse to resume from a checkpoint of another kind, and derive their
randomness from (seed, step) so that a killed and resumed run takes the same path.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo.config import ConfigError, OptimConfig
from spo.runs import atomic_write_bytes

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Toy run folders -> the command that makes them, for "input missing" messages.
_MADE_BY = {
    "world": "spo toy-world",
    "spm": "spo train-preference-model --config configs/toy/spm.yaml",
    "dpo": "spo train-dpo --config configs/toy/dpo.yaml",
    "spo": "spo train-spo --config configs/toy/spo.yaml",
}


class TrainingError(RuntimeError):
    """A run that had to stop (non-finite loss, ...); the message is one line."""


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


def seeded_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator whose state depends only on `keys` (e.g. seed, step, rank): resumable."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the peak lr at optimiser step s: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant_with_warmup":
            return 1.0
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(name: str, o: OptimConfig, max_steps: int, params, lr: float):
    """AdamW, Adafactor (the released SDXL full fine-tune) or 8-bit AdamW, with the schedule."""
    if name == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(
            params,
            lr=lr,
            weight_decay=o.weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            clip_threshold=1.0,
        )
    else:
        if name == "adamw8bit":
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        optimizer = cls(
            params,
            lr=lr,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_epsilon,
            weight_decay=o.weight_decay,
        )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, max_steps))


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

    def check_mode(self, path: Path | None, mode: str) -> None:
        """One line when resuming a LoRA run from a full one's checkpoint, or the reverse."""
        if path is None:
            return
        theirs = self.read_state(path).get("mode")
        if theirs != mode:
            raise ConfigError(
                f"cannot resume a {mode} run from {path}: that checkpoint is of a {theirs} run "
                f"(set policy.mode={theirs} or resume=none)"
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


def micro_batch_rows(
    n_rows: int, batch_size: int, micro_step: int, accelerator, seed: int
) -> tuple[int, list[int]]:
    """(epoch, rows) of one process's micro-batch number `micro_step`.

    Each epoch is a permutation seeded by (seed, epoch); every process takes its own slice of
    each global batch, and a partial last batch is dropped. A pure function of its arguments,
    so a resumed run continues with exactly the rows it would have seen.
    """
    per_step = batch_size * accelerator.num_processes
    batches_per_epoch = max(1, n_rows // per_step)
    epoch, offset = divmod(micro_step, batches_per_epoch)
    order = torch.randperm(n_rows, generator=seeded_generator(seed, epoch)).tolist()
    start = offset * per_step + accelerator.process_index * batch_size
    return epoch, order[start : start + batch_size]


class MetricLogger:
    """Averages metrics over the steps between two log lines and writes them to
    `metrics.jsonl` (main process) and to the accelerate tracker, if any."""

    def __init__(self, run, accelerator, tracker: bool) -> None:
        self.run, self.accelerator, self.tracker = run, accelerator, tracker
        self.window: dict[str, list[float]] = {}

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.window.setdefault(key, []).append(float(value))

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """Log the window's means plus `extra` at `step`; return what was logged."""
        metrics = {
            k: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")
            for k, v in self.window.items()
        }
        metrics.update(extra)
        self.window = {}
        self.log(step, metrics)
        return metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            self.run.log_metrics(step, **metrics)
        if self.tracker:
            self.accelerator.log(metrics, step=step)


class Validator:
    """Fixed-seed samples of the policy during training: a PNG grid per validation and, with
    a scorer, their mean score logged as `val/<scorer>` next to the elapsed time (the reward
    against compute curve). Prompts and scorer are loaded when the run starts, so a bad path
    fails before any compute."""

    def __init__(self, v, device: str | torch.device = "cpu") -> None:
        from spo.data import load_prompts
        from spo.evaluation.scorers import build_scorer

        prompts = list(v.prompts)
        if v.prompts_file:
            prompts += load_prompts(v.prompts_file, made_by=made_by(v.prompts_file))
        self.v = v
        self.texts = [p for p in prompts for _ in range(v.images_per_prompt)]
        self.seeds = [v.seed + i for i in range(len(self.texts))]
        self.scorer = build_scorer(v.scorer, device=device) if v.scorer and self.texts else None
        self.seconds = 0.0  # time spent validating: not charged to the training budget

    @property
    def enabled(self) -> bool:
        return bool(self.texts)

    def due(self, step: int) -> bool:
        return self.enabled and bool(self.v.every) and step % self.v.every == 0

    def run(self, model, folder: Path, step: int, logger, elapsed_s: float) -> None:
        """Sample with the policy as it is now (`model.pipe` holds it); write the grid."""
        from torchvision.utils import save_image

        v, start = self.v, time.time()
        images = model.generate(self.texts, self.seeds, v.num_inference_steps, v.guidance_scale)
        folder.mkdir(parents=True, exist_ok=True)
        save_image(images, folder / f"step-{step}.png", nrow=max(v.images_per_prompt, 4))
        if self.scorer is not None:
            score = float(self.scorer(images, self.texts).mean())
            logger.log(step, {f"val/{v.scorer}": score, "val/train_seconds": elapsed_s})
        self.seconds += time.time() - start

    def baseline(self, model, folder: Path, logger) -> None:
        """Step 0's point of the reward curve, the untrained policy (only with a scorer)."""
        if self.scorer is not None:
            self.run(model, folder, 0, logger, 0.0)

    def periodic(self, model, folder: Path, step: int, logger, started: float, last: bool) -> None:
        """The validation every `every` steps; the last step's is `final`'s, not done twice."""
        if self.due(step) and not last:
            self.run(model, folder, step, logger, self.train_seconds(started))

    def final(self, model, folder: Path, step: int, logger, started: float) -> None:
        """The last validation of a run (nothing when no prompts are configured)."""
        if self.enabled:
            self.run(model, folder, step, logger, self.train_seconds(started))

    def train_seconds(self, started: float) -> float:
        """Wall-clock seconds since `started`, less the time spent validating."""
        return time.time() - started - self.seconds


def out_of_time(max_minutes: float | None, seconds: float) -> bool:
    """True once a run's wall-clock budget is spent (the demo gives DPO and SPO the same)."""
    return max_minutes is not None and seconds >= 60 * max_minutes


def make_accelerator(cfg):
    """The run's Accelerator: mixed precision, gradient accumulation, tracker, project folder."""
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.out,
    )


def guarded_step(
    accelerator,
    loss: torch.Tensor,
    model,
    optimizer,
    scheduler,
    max_grad_norm: float,
    checkpoints: Checkpointer,
    step: int,
    state: dict[str, Any],
    what: str,
) -> None:
    """Backward, clip, step, inside `accelerator.accumulate`. A non-finite loss first saves the
    weights (still those of the last good step) as a checkpoint and stops the run."""
    if not torch.isfinite(loss):
        checkpoints.save(accelerator, step, state)
        raise TrainingError(
            f"non-finite {what} loss at step {step}; the last good state is in "
            f"{checkpoints.root}/step-{step}"
        )
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def resume(accelerator, checkpoints: Checkpointer, path: Path | None) -> dict[str, Any]:
    """Load a checkpoint's accelerate state (every rank) and return its trainer state ({} when
    starting afresh)."""
    if path is None:
        return {}
    state = checkpoints.read_state(path)
    accelerator.load_state(str(path))
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state


def finish_run(accelerator, run, save, summary: dict[str, Any], tracker: bool, after=None) -> None:
    """Write `final/` atomically on the main process (`save(folder)` plus train_summary.json),
    run `after()` there (e.g. the last validation), and close the trackers."""
    from spo.runs import atomic_dir

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(run.final) as tmp:
            save(tmp)
            (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if after is not None:
            after()
    if tracker:
        accelerator.end_training()
    accelerator.wait_for_everyone()

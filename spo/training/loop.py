"""The training loop every trainer shares: one small object, the recipes keep their math.

Why: the SPM, DPO and SPO trainers open and close a run the same way (resume target checked
before any model loads, accelerator, run folder, resume, tracker, progress bar, metrics,
periodic validation and checkpoints, a non-finite guard, `final/` written atomically) and differ
only in how they load their models and compute a loss. A recipe reads top to bottom:

    loop = TrainLoop(cfg, kind=KIND, name="dpo", mode=..., validator=...)  # cheap checks
    with loop:                         # releases the run folder and the progress bar
        accelerator = loop.make_accelerator()   # also locks and opens the run folder
        ... load models ...
        unet, state = loop.begin(policy.unet, policy.trainable_parameters(), desc="train DPO")
        while loop.running():
            ... loss ...
            loop.optimizer_step(loss)            # inside accelerator.accumulate(model)
            loop.end_step()                      # step + 1, progress, metrics every log_every
            if loop.due(cfg.checkpoint_every):
                loop.save_checkpoint(state())
        loop.finish(policy.save, summary=summary)  # final/; with push_to_hub, uploaded

Randomness derives from (seed, step, rank) through `seeded_generator`, so a killed and resumed
run takes the same path. Every decision that stops or skips (a non-finite loss, the time
budget, a checkpoint that does not load) is taken by all processes together
(`spo.training.distributed`), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from spo.config.schemas import OptimConfig
from spo.errors import ConfigError, TrainingError
from spo.runs import RunDir, RunLock, atomic_dir, check_writable, clean_leftovers, prepare_run_dir
from spo.training.checkpoints import Checkpointer
from spo.training.distributed import (
    check_world,
    deepspeed_plugin,
    die_with_launcher,
    load_models_whole,
    on_main,
    ranks_where,
    sharded,
    sharding_launch,
)
from spo.training.publish import check_hub_token, push_folder
from spo.training.validation import BEST_FILE, Best, Validator

BEST_STATE = "validation_best"  # the trainer state's key for the best validation so far


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


def build_optimizer(name: str, o: OptimConfig, max_steps: int, params, lr: float | None = None):
    """AdamW, Adafactor (the released SDXL full fine-tune) or 8-bit AdamW, with the schedule.
    `lr` defaults to `o.lr`."""
    lr = o.lr if lr is None else lr
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


def metric_name(key: str) -> str:
    """One naming for every trainer: `train/<name>` unless the key names its group already
    (`val/...`)."""
    return key if "/" in key else f"train/{key}"


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The run's whole config as flat scalars (dotted keys; lists and None as text), which
    trackers take as hyperparameters."""
    flat = _flat(cfg)
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


class MetricLogger:
    """Averages metrics over the steps between two log lines and writes them to
    `metrics.jsonl` (main process) and to the accelerate tracker, if any, each named by
    `metric_name`."""

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
        return {metric_name(k): v for k, v in metrics.items()}

    def log_images(self, step: int, name: str, images) -> None:
        """Images (N, 3, H, W) in [0, 1] to the tracker (TensorBoard, W&B), if any."""
        if not self.tracker:
            return
        arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: arrays}, step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: list(arrays)}, step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {metric_name(k): v for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            self.run.log_metrics(step, **metrics)
        if self.tracker:
            self.accelerator.log(metrics, step=step)


def out_of_time(max_minutes: float | None, seconds: float) -> bool:
    """True once a run's wall-clock budget is spent (the demo gives DPO and SPO the same)."""
    return max_minutes is not None and seconds >= 60 * max_minutes


def launcher_precision() -> str:
    """The mixed precision `accelerate launch` (its flag or `accelerate config`) asks for."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def check_precision(cfg) -> None:
    """Before any model loads: fp16 (mixed precision, or a frozen model's dtype) needs a GPU;
    a config that overrides the launcher's precision says so."""
    precision = cfg.mixed_precision or launcher_precision()
    on_gpu = torch.cuda.is_available()
    if precision == "fp16" and not on_gpu:
        where = "mixed_precision=fp16" if cfg.mixed_precision else "accelerate launch's fp16"
        raise ConfigError(f"{where} needs a GPU; on a CPU use mixed_precision=bf16 or no")
    if getattr(cfg, "base_dtype", None) == "float16" and not on_gpu:
        raise ConfigError("base_dtype=float16 needs a GPU; on a CPU use float32 or bfloat16")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if cfg.mixed_precision and launcher and launcher.lower() != cfg.mixed_precision:
        print(
            f"mixed_precision={cfg.mixed_precision} from the config overrides the launcher's "
            f"{launcher} (mixed_precision=null defers to the launcher)"
        )


# Keys a resumed run may change: they change how a run is watched, kept or how long it goes,
# not what a step trains. Any other change to a run folder's recorded config is refused.
RESUMABLE_CHANGES = (
    "out",
    "resume",
    "log_every",
    "tracker",
    "checkpoint_every",
    "checkpoints_total_limit",
    "max_steps",
    "max_minutes",
    "max_epochs",
    "validation_every",
    "validation_pairs_periodic",
    "validation_images.",
    "push_to_hub",
    "hub_model_id",
)
EXTENDING = ("max_steps", "max_minutes", "max_epochs")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: value}


def config_changes(recorded: Any, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (recorded value, new value)} of every key that differs."""
    old, new = _flat(recorded), _flat(cfg)
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def make_accelerator(cfg):
    """The run's Accelerator: mixed precision (the config's, else the launcher's), gradient
    accumulation, tracker, project folder; under a DeepSpeed launch, the plugin given the
    config's accumulation, clipping and micro-batch (`deepspeed_plugin`), the models to be
    loaded whole (`load_models_whole`)."""
    from accelerate import Accelerator

    deepspeed = sharding_launch() == "DeepSpeed"
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.out,
        **({"deepspeed_plugin": deepspeed_plugin(cfg)} if deepspeed else {}),
    )
    if deepspeed:
        load_models_whole()
    return accelerator


def autocast(accelerator):
    """The run's autocast: accelerate's; under DeepSpeed with 16-bit weights (its config's bf16
    or fp16, where accelerate's autocast does nothing) torch's autocast to that dtype, so that
    float32 inputs meet the engine's 16-bit weights as in any mixed-precision run."""
    from accelerate.utils import DistributedType

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and half is not None:
        return torch.autocast(accelerator.device.type, dtype=half)
    return accelerator.autocast()


class TrainLoop:
    """The opening, the per-step bookkeeping and the closing of a training run (see the module
    docstring for how a recipe uses it). `step` counts optimiser steps."""

    def __init__(
        self,
        cfg,
        *,
        kind: str,
        name: str,
        mode: str | None = None,
        mode_key: str = "policy.mode",
        mode_default: str | None = None,
        validator: Validator | None = None,
        max_minutes: float | None = None,
        hub_model_id: str | None = None,
        shardable: bool = False,
    ) -> None:
        """Cheap checks only, before any model loads: the run folder can be written, the
        precision exists on this machine, the resume target exists and is a checkpoint of this
        `kind` and `mode` (the config key `mode_key`; `mode_default` for checkpoints that
        record none), a Hub token exists when `final/` is to be pushed to `hub_model_id`, and
        a sharded launch (FSDP, DeepSpeed) is refused unless the trainer is `shardable`."""
        engine = sharding_launch()
        if engine and not shardable:
            raise ConfigError(
                f"{name.upper()} training does not run sharded ({engine}); launch it without "
                f"a {engine} accelerate config ({engine} is for train-dpo and train-spo)"
            )
        if engine == "DeepSpeed":
            from accelerate.utils import is_deepspeed_available

            if not is_deepspeed_available():
                raise ConfigError(
                    "a DeepSpeed launch needs the deepspeed package: "
                    "pip install 'spo-diffusion[deepspeed]'"
                )
        self.cfg, self.name, self.mode = cfg, name, mode
        self.validator, self.max_minutes = validator, max_minutes
        self.hub_model_id = hub_model_id
        self.tracker = cfg.tracker != "none"
        check_writable(cfg.out)
        if hub_model_id is not None:
            check_hub_token()
        self.checkpoints = Checkpointer(
            Path(cfg.out) / "checkpoints", kind, cfg.checkpoints_total_limit
        )
        self.resume_from = self.checkpoints.resolve(cfg.resume)
        if mode is not None:
            self.checkpoints.check_mode(self.resume_from, mode, mode_key, mode_default)
        self.step = 0
        self.stopped_early = False  # validation_images.patience ran out
        self.validated_at: int | None = None  # the step of the newest validation
        self.last_logged: dict[str, float | None] = {}  # the newest metrics window, its step
        self.accelerator = None
        self.lock = RunLock(cfg.out)
        self.progress = None
        self.already_finished = self._check_resumed_config()

    def _check_resumed_config(self) -> bool:
        """A resumed run must train what its folder's recorded config says: a change to any
        key outside `RESUMABLE_CHANGES` is refused in one line. Returns whether the run is
        already finished (its last checkpoint marked so, `final/` written, and no longer
        budget asked for): then there is nothing to do."""
        if not self.resume_from:
            return False
        from spo.config.loader import load_config

        recorded_file = Path(self.cfg.out) / "config.yaml"
        if not recorded_file.is_file():
            return False
        retired = getattr(self.cfg, "RETIRED", ())
        recorded = load_config(type(self.cfg), recorded_file, retired=retired)
        changes = config_changes(recorded, self.cfg)
        trained = {k: v for k, v in changes.items() if not k.startswith(RESUMABLE_CHANGES)}
        if trained:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(trained.items())[:3])
            more = f" (and {len(trained) - 3} more)" if len(trained) > 3 else ""
            raise ConfigError(
                f"{self.cfg.out} holds a run trained with another config ({shown}{more}); "
                "resume=none starts afresh there (its checkpoints are replaced), or choose "
                "another --out"
            )
        state = self.checkpoints.read_state(self.resume_from[0])
        extended = any(k in changes for k in EXTENDING)
        final = Path(self.cfg.out) / "final"
        written = bool(state.get("final_written")) and final.is_dir() and any(final.iterdir())
        return written and not extended

    def previous_result(self, name: str = "final/train_summary.json") -> dict:
        """The result a finished run wrote (`name` in its folder), said to be reused, with
        `already_finished: true`."""
        path = Path(self.cfg.out) / name
        print(
            f"{self.cfg.out}: this run already finished (final/ written); nothing to do "
            "(raise max_steps to train on, or resume=none to start afresh)"
        )
        result = json.loads(path.read_text()) if path.is_file() else {}
        return result | {"already_finished": True}

    @classmethod
    def for_diffusion(cls, cfg, *, kind: str, name: str) -> TrainLoop:
        """The loop of a diffusion trainer (DPO, SPO): its policy mode, validation images,
        wall-clock budget and Hub upload."""
        return cls(
            cfg,
            kind=kind,
            name=name,
            mode=cfg.policy.mode,
            validator=Validator(cfg.validation_images),
            max_minutes=cfg.max_minutes,
            hub_model_id=cfg.hub_model_id if cfg.push_to_hub else None,
            shardable=True,
        )

    def make_accelerator(self):
        """The accelerator, then the run folder: refused in one line (on every rank) when
        the launcher and accelerate disagree about the world or another run holds the folder;
        else locked for this run, cleared of what killed runs left, and its config written."""
        die_with_launcher()
        self.accelerator = accelerator = make_accelerator(self.cfg)
        check_world(accelerator)

        def open_run() -> RunDir:
            root = Path(self.cfg.out)
            check_writable(root)
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot write to output folder {root}: {e.strerror}") from e
            self.lock.acquire()
            for name in clean_leftovers(root):
                print(f"run folder: removed {name} left by an interrupted run")
            run = prepare_run_dir(root, self.cfg, folders=("checkpoints", "final"), metrics=True)
            if not self.resume_from:  # a new run: the metrics of an earlier one go
                run.metrics_path.write_text("")
            return run

        self.run = on_main(accelerator, open_run) or RunDir(Path(self.cfg.out))
        accelerator.wait_for_everyone()
        self.lock.join()
        return accelerator

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def begin(
        self, model: torch.nn.Module, params, *, desc: str, optimizer: str = "adamw", lr=None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The optimiser (`build_optimizer(optimizer, cfg.optim, ..., params, lr)`) and
        `accelerator.prepare`, then the run folder (written by the main process), the resumed
        state (every rank; {} when starting afresh), tracker, logger, progress bar. Returns the
        prepared model and the checkpoint's trainer state."""
        accelerator, cfg = self.accelerator, self.cfg
        opt, schedule = build_optimizer(optimizer, cfg.optim, cfg.max_steps, params, lr)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, opt, schedule)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        state = self.checkpoints.load(accelerator, self.resume_from)
        self.step = state.get("step", 0)
        if self.validator is not None and state.get(BEST_STATE):
            self.validator.best = Best(**state[BEST_STATE])
        if self.tracker:
            accelerator.init_trackers(self.name, config=hyperparameters(cfg))
        self.logger = MetricLogger(self.run, accelerator, self.tracker)
        if self.max_minutes is None:
            self.progress = tqdm(
                total=cfg.max_steps, initial=self.step, desc=desc, disable=not self.main
            )
        else:  # a time budget: the bar is the budget, the steps go in its postfix
            self.progress = tqdm(
                total=round(60 * self.max_minutes),
                desc=desc,
                unit="s",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s of budget{postfix}",
                disable=not self.main,
            )
        if self.main and self.validator is not None:
            self.validator.start(accelerator.device)
        self.started = time.time()
        return self.model, state

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.close()  # ends the bar's line, also before an error message
        self.lock.release()

    # ------------------------------------------------------------------------------ per step

    def train_seconds(self) -> float:
        """Wall-clock seconds since `begin`, less the time spent on validation images."""
        spent = self.validator.seconds if self.validator is not None else 0.0
        return time.time() - self.started - spent

    def running(self) -> bool:
        """Steps left, time left (`max_minutes`; spent when it is spent on any rank) and no
        early stop."""
        if self.step >= self.cfg.max_steps or self.stopped_early:
            return False
        if self.max_minutes is None:
            return True
        spent = out_of_time(self.max_minutes, self.train_seconds())
        return not ranks_where(self.accelerator, spent)

    def autocast(self):
        """The context the loss is computed in (`autocast`)."""
        return autocast(self.accelerator)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, clip, step, inside `accelerator.accumulate`. A non-finite loss on any
        rank stops every rank, with nothing saved: the newest checkpoint is the last good
        state (a checkpoint is never written from diverged weights)."""
        accelerator, cfg = self.accelerator, self.cfg
        bad = ranks_where(accelerator, not bool(torch.isfinite(loss)))
        if bad:
            where = f" on rank {bad[0]}" if accelerator.num_processes > 1 else ""
            raise TrainingError(
                f"non-finite {self.name.upper()} loss at step {self.step}{where}; stopped, "
                f"nothing saved. {self.checkpoints.last_good()}"
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end_step(self, loss_key: str = "loss", **extra: float) -> None:
        """One optimiser step done: the progress bar, and every `log_every` steps (and at the
        last) the averaged metrics with the lr, `extra` and the training seconds."""
        self.step += 1
        if self.max_minutes is None:
            self.progress.update(1)
        else:
            self.progress.n = min(self.progress.total, round(self.train_seconds()))
            self.progress.set_postfix(step=self.step, refresh=True)
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
            metrics = self.logger.flush(
                self.step,
                lr=self.scheduler.get_last_lr()[0],
                **extra,
                elapsed_s=self.train_seconds(),
            )
            loss = metrics.get(metric_name(loss_key), math.nan)
            self.progress.set_postfix(step=self.step, loss=f"{loss:.4f}")
            finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
            self.last_logged = {"step": self.step, **finite}  # None: valid JSON for nan

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """A resumable checkpoint at this step (refused, on every rank, when the trainable
        weights are not finite or the disk is full). It also keeps the best validation so
        far (the main process's), so best/ is chosen after a resume as without one."""
        if self.validator is not None:
            state = state | {BEST_STATE: dataclasses.asdict(self.validator.best)}
        self.checkpoints.save(self.accelerator, self.step, state, self.params)

    def due(self, every: int, count: int | None = None) -> bool:
        """Every `every`-th `count` (default: the step), except once the run is at its last
        step, which `final/` covers."""
        count = self.step if count is None else count
        return bool(every) and count % every == 0 and self.step < self.cfg.max_steps

    # ------------------------------------------------------------------------------ images

    @property
    def _image_folder(self) -> Path:
        return self.run.root / "validation"

    @property
    def _validates(self) -> bool:
        """Whether this rank takes part in validations: the main process, and when the policy
        is sharded (FSDP, DeepSpeed) every rank (each sampling step of FSDP or ZeRO-3 needs
        every rank's shard; best/ needs every rank's part of the weights)."""
        return self.main or sharded(self.accelerator)

    def baseline_images(self, model, policy) -> None:
        """Step 0's point of the reward curve, the untrained policy (with scorers only): the
        first candidate for best/."""
        v = self.validator
        if self.step == 0 and self._validates and v is not None and v.scored:
            self._validate(model, policy, 0.0)

    def periodic_images(self, model, policy) -> None:
        """The validation every `every` steps (the last step's is `finish`'s, not done twice);
        with `patience`, every rank learns whether the run stops early."""
        v = self.validator
        if v is None or not v.due(self.step) or self.step >= self.cfg.max_steps:
            return
        if self._validates:
            self._validate(model, policy, self.train_seconds())
        spent = self.main and v.patience_spent()
        if v.v.patience is not None and ranks_where(self.accelerator, spent):
            self.stopped_early = True
            if self.main:
                print(
                    f"stopping early at step {self.step}: {v.v.patience} validations without a "
                    f"better {v.v.select_by} (best at step {v.best.step}, {v.best.score:.4g})"
                )

    def _validate(self, model, policy, elapsed_s: float) -> None:
        """One validation (the ranks of `_validates`; the main process writes and scores); a
        new best by `select_by` is written to best/ atomically, as final/ is: the policy's
        weights and best.json."""
        v, together = self.validator, sharded(self.accelerator)
        self.validated_at = self.step
        logged = v.run(
            model, self._image_folder, self.step, self.logger, elapsed_s, policy, main=self.main
        )
        best = v.select(logged, self.step)  # the main process's scores decide
        if together:
            best = bool(ranks_where(self.accelerator, best))
        if not best:
            return
        if together:
            policy.gather()
        if self.main:
            with atomic_dir(self.run.root / "best") as tmp:
                policy.save(tmp)
                (tmp / BEST_FILE).write_bytes(v.best_record(self.step, logged))

    # ------------------------------------------------------------------------------ closing

    @property
    def result_location(self) -> str:
        """Where users load the result from: the Hub repository it is pushed to, else
        `final/`."""
        return self.hub_model_id or str(Path(self.cfg.out) / "final")

    def finish(
        self,
        save: Callable[[Path], None],
        summary: dict[str, Any] | None = None,
        *,
        images_of=None,
        policy=None,
        after: Callable[[], None] | None = None,
        idle_reason: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        """The last step's checkpoint (with the trainer `state`, marked finished; unless
        checkpoint_every is 0), then `final/` written atomically on the main process
        (`save(folder)`, plus train_summary.json with a `summary`, which gains whether the run
        stopped early), the last validation of `images_of` (a DiffusionModel, with its
        `policy`; it may write best/) unless this step had one, and `after()` there, `final/`
        uploaded to `hub_model_id` if given (a failed upload stops every rank with one line);
        then the checkpoint is marked `final_written`, so that the same command run again has
        nothing to do, and the tracker is closed. A run that made no optimiser step at all
        writes nothing and stops with one line (`idle_reason`, or the time budget) rather than
        hand over its untrained model as a result."""
        accelerator = self.accelerator
        if self.step == 0:
            reason = idle_reason or (
                f"the time budget max_minutes={self.max_minutes:g} ran out first"
                if self.max_minutes is not None
                else "no data"
            )
            raise TrainingError(
                f"{self.name.upper()} made no optimiser step ({reason}); no result written"
            )
        checkpointed = bool(self.cfg.checkpoint_every) and state is not None
        if checkpointed and self.checkpoints.newest_step() != self.step:
            self.save_checkpoint(state)
        if checkpointed:
            self.checkpoints.mark(accelerator, self.step, finished=True)
        accelerator.wait_for_everyone()

        v, together = self.validator, sharded(self.accelerator)
        if summary is not None and v is not None and v.selecting:
            summary["stopped_early"] = self.stopped_early

        def final_images() -> None:  # unless this step had its validation already
            fresh = self.validated_at != self.step
            if images_of is not None and v is not None and v.enabled and fresh:
                self._validate(images_of, policy, self.train_seconds())

        def write_final() -> None:  # main process; an error is raised on every rank
            try:
                with atomic_dir(self.run.final) as tmp:
                    save(tmp)
                    if summary is not None:
                        summary["mixed_precision"] = accelerator.mixed_precision
                        text = json.dumps(summary, indent=2) + "\n"
                        (tmp / "train_summary.json").write_text(text)
            except OSError as e:
                full = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
                raise TrainingError(
                    f"{full}: final/ of {self.run.root} was not written ({e.strerror or e}). "
                    f"{self.checkpoints.last_good()}"
                ) from e
            if not together:
                final_images()
            if after is not None:
                after()

        if together and policy is not None:
            policy.gather()  # every rank; the main process writes it
        on_main(accelerator, write_final)
        if together:
            final_images()
        if self.hub_model_id is not None:
            pushed = on_main(accelerator, lambda: push_folder(self.run.final, self.hub_model_id))
            if pushed is not None:
                print(f"{self.run.final} uploaded to https://huggingface.co/{pushed}")
        if checkpointed:
            self.checkpoints.mark(accelerator, self.step, final_written=True)
        if self.tracker:
            accelerator.end_training()
        accelerator.wait_for_everyone()

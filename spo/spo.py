"""`spo train-spo`: step-aware preference optimisation (SPEC.md section 3).

Each epoch: a sampling pass over this process's share of the prompts with the current policy
(`pool_sampler.PoolSampler`, judged by the SPM), the kept pairs of all processes gathered and
shuffled, then training micro-batches: the log-probability of every stored win and lose
transition under the policy and under the reference (LoRA: adapters disabled), and the SPO loss
(`spo.losses.spo_loss`). Checkpoints are written at epoch ends, so a resumed run repeats exactly
the epochs an uninterrupted one would run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spo.config import ConfigError, SPOTrainConfig
from spo.data import load_prompts
from spo.losses import spo_loss
from spo.models import DiffusionModel
from spo.policy import Policy, register_lora_checkpoint_hooks
from spo.pool_sampler import KeptPairs, PoolSampler, PoolSettings, chain_log_probs
from spo.runs import RunDir, prepare_run_dir
from spo.training import (
    WEIGHT_DTYPES,
    Checkpointer,
    MetricLogger,
    Validator,
    build_optimizer,
    finish_run,
    guarded_step,
    made_by,
    make_accelerator,
    out_of_time,
    require_path,
    resume,
    seeded_generator,
)

KIND = "spo_training"


def load_spm(cfg: SPOTrainConfig, model: DiffusionModel):
    """The SPM, refused with one line when it was trained on another model family."""
    import preference_model

    spm = preference_model.load(cfg.spm, device=model.device)
    trained_on = spm.config.trained_on
    if trained_on is not None:
        ours = model.describe()
        for key in ("family", "resolution", "latent_channels"):
            if trained_on.get(key) != ours[key]:
                raise ConfigError(
                    f"SPM {cfg.spm} was trained on x0_hat of a {trained_on.get('family')} model "
                    f"({key} {trained_on.get(key)}), this base model has {key} {ours[key]}; "
                    "SPO needs the SPM of the same model family (SPEC.md 2)"
                )
    return spm


def _gather(accelerator, pairs: KeptPairs) -> KeptPairs:
    """Every process's kept pairs, on every process (CPU tensors)."""
    if accelerator.num_processes == 1:
        return pairs
    from accelerate.utils import gather_object

    return KeptPairs.cat(gather_object([pairs]))


def train_spo(cfg: SPOTrainConfig) -> dict:
    """Run the recipe; returns a summary (also in OUT/final/train_summary.json)."""
    from accelerate.utils import set_seed

    if made_by(cfg.base_model) or Path(cfg.base_model).exists():
        require_path(cfg.base_model, "base model")
    require_path(cfg.spm, "SPM")
    prompts = load_prompts(
        cfg.prompts, cfg.prompt_column, cfg.prompt_split, made_by=made_by(cfg.prompts)
    )[: cfg.max_prompts]
    checkpoints = Checkpointer(Path(cfg.out) / "checkpoints", KIND, cfg.checkpoints_total_limit)
    resume_from = checkpoints.resolve(cfg.resume)
    checkpoints.check_mode(resume_from, cfg.policy.mode)
    validator = Validator(cfg.validation_images, "cuda" if torch.cuda.is_available() else "cpu")

    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    model = DiffusionModel.from_pretrained(
        cfg.base_model,
        dtype=WEIGHT_DTYPES[cfg.mixed_precision],
        device=accelerator.device,
        vae=cfg.vae,
    )
    spm = load_spm(cfg, model)
    policy = Policy(model, cfg.policy)
    optimizer, scheduler = build_optimizer(
        "adamw", cfg.optim, cfg.max_steps, policy.trainable_parameters(), cfg.optim.lr
    )
    if cfg.policy.mode == "lora":
        register_lora_checkpoint_hooks(accelerator, policy)
    unet, optimizer, scheduler = accelerator.prepare(policy.unet, optimizer, scheduler)
    run = prepare_run_dir(cfg.out, cfg) if main else RunDir(Path(cfg.out))
    accelerator.wait_for_everyone()

    s = cfg.sampler
    settings = PoolSettings(
        s.num_steps,
        s.eta,
        s.guidance_scale,
        s.k,
        s.divert_step,
        s.threshold,
        s.continuation,
        s.inner_steps,
    )

    def judge(images: torch.Tensor, texts: list[str], t: int) -> torch.Tensor:
        return spm.score(images, texts, t, value_range="-1-1")

    sampler = PoolSampler(model, judge, settings)
    state = resume(accelerator, checkpoints, resume_from)
    step, epoch = state.get("step", 0), state.get("epoch", 0)
    if cfg.tracker != "none":
        accelerator.init_trackers("spo", config={"out": cfg.out, "seed": cfg.seed})
    logger = MetricLogger(run, accelerator, cfg.tracker != "none")
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train SPO", disable=not main)
    started = time.time()
    loop = _Loop(
        accelerator,
        model,
        sampler,
        policy,
        unet,
        optimizer,
        scheduler,
        logger,
        progress,
        started,
        checkpoints,
        validator,
    )
    if step == 0 and main:
        validator.baseline(model, run.root / "validation", logger)
    try:
        while (
            step < cfg.max_steps
            and epoch < cfg.max_epochs
            and not out_of_time(cfg.max_minutes, validator.train_seconds(started))
        ):
            pairs, stats = _sampling_epoch(cfg, accelerator, sampler, policy, prompts, epoch)
            pairs = _gather(accelerator, pairs)
            logger.log(step, {"epoch": epoch, "kept_pairs": len(pairs), **stats})
            step = _training_epoch(cfg, loop, pairs, epoch, step)
            epoch += 1
            if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                checkpoints.save(accelerator, step, {"epoch": epoch, "mode": cfg.policy.mode})
    finally:
        progress.close()

    summary = {"step": step, "epochs": epoch, "mode": cfg.policy.mode, "family": model.family}
    finish_run(
        accelerator,
        run,
        policy.save,
        summary,
        cfg.tracker != "none",
        after=lambda: validator.final(model, run.root / "validation", step, logger, started),
    )
    return summary


def _sampling_epoch(cfg, accelerator, sampler, policy, prompts, epoch):
    """This process's share of the epoch's prompts, sampled in batches with the policy."""
    order = torch.randperm(len(prompts), generator=seeded_generator(cfg.seed, epoch)).tolist()
    mine = order[accelerator.process_index :: accelerator.num_processes]
    kept, stats = [], []
    policy.unet.eval()
    batches = range(0, len(mine), cfg.sample_batch_size)
    for b, start in enumerate(
        tqdm(
            batches,
            desc=f"sample epoch {epoch}",
            leave=False,
            disable=not accelerator.is_main_process,
        )
    ):
        texts = [prompts[i] for i in mine[start : start + cfg.sample_batch_size]]
        gen = seeded_generator(cfg.seed, epoch, b, accelerator.process_index)
        pairs, st = sampler.sample(policy.unet, texts, gen)
        kept.append(pairs)
        stats.append(st)
    policy.unet.train()
    mean = {k: float(np.mean([st[k] for st in stats])) for k in stats[0]} if stats else {}
    return KeptPairs.cat(kept), mean


@dataclass
class _Loop:
    """What the training epochs share (built once in `train_spo`)."""

    accelerator: object
    model: DiffusionModel
    sampler: PoolSampler
    policy: Policy
    unet: torch.nn.Module
    optimizer: object
    scheduler: object
    logger: MetricLogger
    progress: tqdm
    started: float
    checkpoints: Checkpointer
    validator: Validator


def _training_epoch(cfg, loop: _Loop, pairs: KeptPairs, epoch: int, step: int) -> int:
    """Train on the gathered pairs: a shuffled permutation, each process its slice."""
    accelerator, model, policy, unet = loop.accelerator, loop.model, loop.policy, loop.unet
    optimizer, scheduler, logger = loop.optimizer, loop.scheduler, loop.logger
    validator, started, sampler = loop.validator, loop.started, loop.sampler
    per_step = cfg.batch_size * accelerator.num_processes
    n_batches = len(pairs) // per_step
    if n_batches == 0:
        return step
    order = torch.randperm(len(pairs), generator=seeded_generator(cfg.seed, epoch, 1)).tolist()
    accum = cfg.gradient_accumulation_steps
    for b in range(n_batches):
        start = b * per_step + accelerator.process_index * cfg.batch_size
        batch = pairs.index(order[start : start + cfg.batch_size])
        both = KeptPairs.cat([batch, batch])
        chains = torch.cat([batch.win, batch.lose])
        with accelerator.accumulate(unet):
            with accelerator.autocast():
                stored = (
                    both,
                    chains,
                    sampler.schedule,
                    cfg.sampler.guidance_scale,
                    cfg.sampler.eta,
                )
                logp = chain_log_probs(model, unet, *stored)
                with policy.reference(unet) as reference:
                    ref = chain_log_probs(model, reference, *stored)
            logp_w, logp_l = logp.chunk(2)
            ref_w, ref_l = ref.chunk(2)
            loss, ratio_w, ratio_l, clipped = spo_loss(
                logp_w, ref_w, logp_l, ref_l, cfg.beta, cfg.ratio_clip
            )
            guarded_step(
                accelerator,
                loss,
                unet,
                optimizer,
                scheduler,
                cfg.optim.max_grad_norm,
                loop.checkpoints,
                step,
                {"epoch": epoch, "mode": cfg.policy.mode},
                "SPO",
            )
        logger.add(
            loss=loss.item(),
            ratio_win=ratio_w.mean().item(),
            ratio_lose=ratio_l.mean().item(),
            clamp_share=clipped.item(),
            score_gap_kept=batch.score_gap.mean().item(),
        )
        if (b + 1) % accum:
            continue
        step += 1
        loop.progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = logger.flush(
                step, lr=scheduler.get_last_lr()[0], elapsed_s=validator.train_seconds(started)
            )
            loop.progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if accelerator.is_main_process:
            last = step >= cfg.max_steps
            validator.periodic(model, Path(cfg.out) / "validation", step, logger, started, last)
        if step >= cfg.max_steps or out_of_time(cfg.max_minutes, validator.train_seconds(started)):
            break
    return step

"""`spo train-dpo`: the Diffusion-DPO baseline (SPEC.md section 1), SD1.5 and SDXL families.

The loop only; the loss is `spo.losses.dpo_loss`. One step for a micro-batch of B pairs: the
winners and losers (winner first, ties dropped) are VAE-encoded, each pair gets one timestep
and one noise, the policy and the reference (LoRA: the same UNet with adapters disabled) predict
the noise of all 2B latents, and the loss compares their errors on winner and loser.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spo.config import ConfigError, DPOTrainConfig
from spo.data import BadImageCounter, PairDataset, check_pair_table, load_pair_table
from spo.losses import dpo_loss, sft_loss
from spo.models import DiffusionModel, TextConditioning
from spo.policy import Policy, register_lora_checkpoint_hooks
from spo.runs import RunDir, prepare_run_dir
from spo.sampling import add_noise
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
    micro_batch_rows,
    out_of_time,
    require_path,
    resume,
    seeded_generator,
)

KIND = "dpo_training"


def effective_lr(cfg: DPOTrainConfig, num_processes: int) -> float:
    """The learning rate after `lr_scaling` (written out in DPOTrainConfig's comments)."""
    batch = cfg.batch_size * cfg.gradient_accumulation_steps * num_processes
    if cfg.lr_scaling == "code":
        return cfg.optim.lr * batch
    if cfg.lr_scaling == "paper":
        return cfg.optim.lr * batch * 2000.0 / cfg.beta
    return cfg.optim.lr


def load_dpo_pairs(cfg: DPOTrainConfig) -> tuple[object, np.ndarray, int]:
    """The training table and its labels, checked; ties are removed later (after relabelling).
    Returns (table, labels (N, 2), N)."""
    source = cfg.pairs.train
    table = load_pair_table(source, cfg.pairs.train_split, made_by=made_by(source))
    if cfg.pairs.max_train_pairs is not None and cfg.pairs.max_train_pairs < len(table):
        table = table.select(range(cfg.pairs.max_train_pairs))
    return table, check_pair_table(table, source), len(table)


def relabel(cfg: DPOTrainConfig, table, device: str, resolution: int) -> np.ndarray:
    """AI feedback (the released code's "choice model"): every pair relabelled by a scorer."""
    from spo.data import decode_image, to_pixels
    from spo.evaluation.scorers import build_scorer, prefer_by_scorer

    scorer = build_scorer(cfg.relabel_with, device=device)
    scores = {0: [], 1: []}
    rows = table.select_columns(["caption", "jpg_0", "jpg_1"])
    for start in tqdm(range(0, len(rows), 64), desc="relabel", leave=False):
        chunk = rows[start : start + 64]
        for k in (0, 1):
            images = []
            for data in chunk[f"jpg_{k}"]:
                try:
                    images.append((to_pixels(decode_image(data), resolution) + 1) / 2)
                except Exception:  # undecodable: scored -inf, the pair is skipped later anyway
                    images.append(None)
            blank = torch.zeros(3, resolution, resolution)
            batch = torch.stack([im if im is not None else blank for im in images])
            s = scorer(batch, chunk["caption"]).numpy().astype(np.float64)
            s[[im is None for im in images]] = -np.inf
            scores[k].append(s)
    return prefer_by_scorer(np.concatenate(scores[0]), np.concatenate(scores[1]))


def _usable_rows(cfg: DPOTrainConfig, labels: np.ndarray) -> np.ndarray:
    """Rows with a winner (DPO drops ties); one line when there is none."""
    decided = np.flatnonzero(labels[:, 0] != 0.5)
    if len(decided) == 0:
        raise ConfigError(
            f"{cfg.pairs.train}: no usable pair ({len(labels)} pairs, all ties; DPO drops ties)"
        )
    return decided


def train_dpo(cfg: DPOTrainConfig) -> dict:
    """Run the recipe; returns a summary (also written to OUT/final/train_summary.json)."""
    from accelerate.utils import set_seed

    # Cheap checks first: inputs, resume target, before any model is loaded.
    if made_by(cfg.base_model) or Path(cfg.base_model).exists():
        require_path(cfg.base_model, "base model")
    table, labels, n_rows = load_dpo_pairs(cfg)
    BadImageCounter(cfg.pairs.max_bad_image_share, cfg.pairs.train).probe(table)
    checkpoints = Checkpointer(Path(cfg.out) / "checkpoints", KIND, cfg.checkpoints_total_limit)
    resume_from = checkpoints.resolve(cfg.resume)
    checkpoints.check_mode(resume_from, cfg.policy.mode)
    validator = Validator(cfg.validation_images, "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.relabel_with == "none":
        _usable_rows(cfg, labels)

    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    model = DiffusionModel.from_pretrained(
        cfg.base_model,
        dtype=WEIGHT_DTYPES[cfg.mixed_precision],
        device=accelerator.device,
        vae=cfg.vae,
    )
    if cfg.relabel_with != "none":
        labels = relabel(cfg, table, accelerator.device, model.resolution)
    decided = _usable_rows(cfg, labels)
    dataset = PairDataset(
        table.select(decided),
        model.resolution,
        labels[decided],
        winner_first=True,
        random_crop=cfg.random_crop,
        random_flip=cfg.random_flip,
        seed=cfg.seed,
    )
    policy = Policy(model, cfg.policy)
    lr = effective_lr(cfg, accelerator.num_processes)
    optimizer, scheduler = build_optimizer(
        cfg.optimizer, cfg.optim, cfg.max_steps, policy.trainable_parameters(), lr
    )
    if cfg.policy.mode == "lora":
        register_lora_checkpoint_hooks(accelerator, policy)
    unet, optimizer, scheduler = accelerator.prepare(policy.unet, optimizer, scheduler)
    run = prepare_run_dir(cfg.out, cfg) if main else RunDir(Path(cfg.out))
    accelerator.wait_for_everyone()

    bad = BadImageCounter(cfg.pairs.max_bad_image_share, cfg.pairs.train)
    state = resume(accelerator, checkpoints, resume_from)
    step, bad.seen, bad.bad = (state.get(k, 0) for k in ("step", "seen_pairs", "bad_pairs"))
    if cfg.tracker != "none":
        accelerator.init_trackers("dpo", config={"out": cfg.out, "seed": cfg.seed})
    logger = MetricLogger(run, accelerator, cfg.tracker != "none")
    if main:
        run.log_metrics(
            step, pairs=n_rows, ties_dropped=int(n_rows - len(decided)), effective_lr=lr
        )

    def state() -> dict:
        return {"seen_pairs": bad.seen, "bad_pairs": bad.bad, "mode": cfg.policy.mode}

    empty = model.empty_text(1)
    accum = cfg.gradient_accumulation_steps
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train DPO", disable=not main)
    started = time.time()
    if step == 0 and main:
        validator.baseline(model, run.root / "validation", logger)
    try:
        while step < cfg.max_steps and not out_of_time(
            cfg.max_minutes, validator.train_seconds(started)
        ):
            micro = step * accum
            for _ in range(accum):
                epoch, rows = micro_batch_rows(
                    len(dataset), cfg.batch_size, micro, accelerator, cfg.seed
                )
                dataset.epoch = epoch
                batch = PairDataset.collate([dataset[i] for i in rows])
                bad.update(len(rows), batch.bad)
                micro += 1
                b = len(batch.captions)
                if b == 0:
                    continue
                gen = seeded_generator(cfg.seed, micro, accelerator.process_index)
                pixels = torch.cat([batch.pixels[:, 0], batch.pixels[:, 1]])  # winners, then losers
                latents = model.encode_images(pixels, generator=gen).float()
                noise = (
                    torch.randn((b, *latents.shape[1:]), generator=gen)
                    .to(latents)
                    .repeat(2, 1, 1, 1)
                )
                t = torch.randint(0, model.num_train_timesteps, (b,), generator=gen)
                t = t.to(latents.device).repeat(2)
                x_t = add_noise(latents, noise, model.alpha_bar(t))
                target = noise
                if model.prediction_type == "v_prediction":
                    a = model.alpha_bar(t).view(-1, 1, 1, 1)
                    target = a.sqrt() * noise - (1 - a).sqrt() * latents
                drop = torch.rand(b, generator=gen) < cfg.prompt_dropout
                text = model.encode_text(batch.captions)
                text = TextConditioning.cat(
                    [empty if d else text.index([i]) for i, d in enumerate(drop.tolist())]
                )
                text = TextConditioning.cat([text, text])
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        pred = model.unet_forward(unet, x_t, t, text)
                        if cfg.loss == "sft":
                            loss = sft_loss(pred, target)
                            out = None
                        else:
                            with policy.reference(unet) as reference:
                                ref_pred = model.unet_forward(reference, x_t, t, text)
                            out = dpo_loss(pred, ref_pred, target, cfg.beta, cfg.beta_scale)
                            loss = out.loss
                    guarded_step(
                        accelerator,
                        loss,
                        unet,
                        optimizer,
                        scheduler,
                        cfg.optim.max_grad_norm,
                        checkpoints,
                        step,
                        state(),
                        "DPO",
                    )
                values = {"loss": loss.item()}
                if out is not None:
                    values |= {
                        "implicit_acc": out.implicit_acc.item(),
                        "model_mse": out.model_mse.item(),
                        "ref_mse": out.ref_mse.item(),
                        "margin": out.margin.item(),
                    }
                logger.add(**values)
            step += 1
            progress.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics = logger.flush(
                    step,
                    lr=scheduler.get_last_lr()[0],
                    bad_pairs=bad.bad,
                    elapsed_s=validator.train_seconds(started),
                )
                progress.set_postfix(loss=f"{metrics.get('loss', math.nan):.4f}")
            if main:
                last = step >= cfg.max_steps
                validator.periodic(model, run.root / "validation", step, logger, started, last)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                checkpoints.save(accelerator, step, state())
    finally:
        progress.close()  # ends the bar's line, also before an error message

    summary = {"step": step, "pairs": n_rows, "ties_dropped": int(n_rows - len(decided))}
    summary |= {"effective_lr": lr, "mode": cfg.policy.mode, "family": model.family}
    finish_run(
        accelerator,
        run,
        policy.save,
        summary,
        cfg.tracker != "none",
        after=lambda: validator.final(model, run.root / "validation", step, logger, started),
    )
    return summary

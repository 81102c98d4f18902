"""`spo train-spo`: step-aware preference optimisation (method.md section 3).

Each epoch, as the released code: the prompts shuffled and shared out; for each sampling batch,
a sampling pass with the current policy (`pool_sampler.PoolSampler`, judged by the SPM), the
kept pairs of all processes gathered (a multi-step segment split into its transitions), shuffled
and dealt out equally, then training micro-batches on them (the last one may be smaller): the
log-probability of every stored win and lose transition under the policy and under the
reference (LoRA: adapters disabled), and the SPO loss (`spo.losses.spo_loss`). The next
sampling batch is drawn by the updated policy. Checkpoints are written at epoch ends, so a
resumed run repeats exactly the epochs an uninterrupted one would run.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import preference_model
from preference_model.errors import check_judge_folder, judge_kind, judge_trained_on
from spo.annotators import selected_prompts
from spo.commands import report
from spo.config import SPOTrainConfig
from spo.data import load_prompts
from spo.errors import ConfigError
from spo.judges import bind_judge, step_judge
from spo.losses import spo_loss
from spo.models import (
    DTYPES,
    DiffusionModel,
    check_family,
    describe_pipeline_folder,
    require_family,
)
from spo.policy import Policy, check_lora_targets, register_lora_checkpoint_hooks
from spo.pool_sampler import KeptPairs, PoolSampler, StepSchedule, chain_log_probs
from spo.runs import made_by, require_base_model, require_path
from spo.training.loop import TrainLoop, check_precision, seeded_generator
from spo.training.publish import model_card

KIND = "spo_training"


def check_judge_kind(cfg: SPOTrainConfig) -> None:
    """One line, before any model loads, when `spm` holds the other kind of judge."""
    found = judge_kind(cfg.spm)
    if found is not None and found != cfg.judge:
        raise ConfigError(
            f"{cfg.spm} is a {found} judge, but judge={cfg.judge}: set judge={found}, or give "
            f"a {cfg.judge} judge (`spo train-preference-model judge={cfg.judge}` makes one)"
        )


def check_judge_family(cfg: SPOTrainConfig, trained_on: dict | None, ours: dict | None) -> None:
    """One line when the judge was trained on another model family than the base model's
    (`trained_on` and `ours` as `DiffusionModel.describe` gives them; unknown: no check)."""
    if trained_on is None or ours is None:
        return
    for key in ("family", "resolution", "latent_channels"):
        if trained_on.get(key) != ours[key]:
            raise ConfigError(
                f"judge {cfg.spm} was trained on a {trained_on.get('family')} model "
                f"({key} {trained_on.get(key)}), this base model has {key} {ours[key]}; "
                "SPO needs a judge of the same model family (method.md 2)"
            )


def load_spm(cfg: SPOTrainConfig, model: DiffusionModel):
    """The step-aware judge (in `speed.judge_dtype`), refused with one line when it was
    trained on another model family (checked before loading already for a local base model;
    here for a Hub one)."""
    spm = preference_model.load(cfg.spm, device=model.device, dtype=DTYPES[cfg.speed.judge_dtype])
    check_judge_family(cfg, spm.config.trained_on, model.describe())
    return bind_judge(spm, model)


def _gather(accelerator, pairs: KeptPairs) -> KeptPairs:
    """Every process's kept pairs, on every process (CPU tensors)."""
    if accelerator.num_processes == 1:
        return pairs
    from accelerate.utils import gather_object

    return KeptPairs.cat(gather_object([pairs]))


def run(cfg: SPOTrainConfig) -> int:
    """`spo train-spo`: train, print the summary."""
    summary = train_spo(cfg)
    return report(summary, f"SPO result written to {cfg.out}/final")


def train_spo(cfg: SPOTrainConfig) -> dict:
    """Run the recipe; returns a summary (also in OUT/final/train_summary.json)."""
    check_precision(cfg)
    require_base_model(cfg)
    require_family(cfg.base_model, cfg.model_family)
    require_path(cfg.spm, "SPM")
    check_judge_kind(cfg)
    check_judge_folder(cfg.spm)
    ours = describe_pipeline_folder(cfg.base_model)
    if ours is not None and cfg.resolution is not None:
        ours["resolution"] = cfg.resolution
    check_judge_family(cfg, judge_trained_on(cfg.spm), ours)
    check_lora_targets(cfg.base_model, cfg.policy)
    if cfg.prompt_annotators.active:
        prompts = selected_prompts(
            cfg.prompt_annotators, cfg.prompts, cfg.prompt_column, cfg.prompt_split
        )
    else:
        prompts = load_prompts(
            cfg.prompts, cfg.prompt_column, cfg.prompt_split, made_by=made_by(cfg.prompts)
        )
    prompts = prompts[: cfg.max_prompts]
    loop = TrainLoop.for_diffusion(cfg, kind=KIND, name="spo")
    if loop.already_finished:
        return loop.previous_result()
    with loop:
        accelerator = loop.make_accelerator()
        set_seed(cfg.seed)
        model = DiffusionModel.for_training(cfg, accelerator)
        check_family(model.family, cfg.model_family, cfg.base_model)  # a Hub model's, loaded
        spm = load_spm(cfg, model)
        if cfg.speed.fast_decode:
            model.fast_decode(compile_decoder=cfg.speed.compile_vae)
        policy = Policy(model, cfg.policy)
        policy.compile(cfg.speed.compile, announce=loop.main)
        if cfg.policy.mode == "lora":
            register_lora_checkpoint_hooks(accelerator, policy)
        unet, resumed = loop.begin(policy.unet, policy.trainable_parameters(), desc="train SPO")

        judge = step_judge(spm, model, cfg.judge)
        sampler = PoolSampler(model, judge, cfg.sampler, latent=cfg.judge == "latent")
        epoch, kept_total = resumed.get("epoch", 0), 0
        loop.baseline_images(model, policy)
        while loop.running() and epoch < cfg.max_epochs:
            kept, stats = _epoch(cfg, loop, model, sampler, policy, prompts, epoch)
            kept_total += kept
            loop.logger.log(loop.step, {"epoch": epoch, "kept_pairs": kept, **stats})
            epoch += 1
            if loop.due(cfg.checkpoint_every, epoch):
                loop.save_checkpoint({"epoch": epoch, "mode": cfg.policy.mode})

        summary = {
            "step": loop.step,
            "epochs": epoch,
            "mode": cfg.policy.mode,
            "family": model.family,
            "final_metrics": loop.last_logged,
        }
        idle = (
            f"{kept_total} pairs kept in {epoch} epochs; a sampling batch trains only when it "
            f"keeps at least one pair per process ({accelerator.num_processes}); lower "
            "sampler.threshold or give more prompts"
        )
        state = {"epoch": epoch, "mode": cfg.policy.mode}
        card = model_card(
            method="SPO",
            command="spo train-spo",
            policy=policy.describe(),
            settings=card_settings(cfg, accelerator.num_processes, sampler.schedule),
            summary=summary,
            location=loop.result_location,
        )
        loop.finish(
            partial(policy.save, card=card),
            summary,
            images_of=model,
            policy=policy,
            idle_reason=idle,
            state=state,
        )
    return summary


def card_settings(cfg: SPOTrainConfig, num_processes: int, schedule: StepSchedule) -> dict:
    """The key settings the model card lists."""
    s = cfg.sampler
    return {
        "prompts": cfg.prompts,
        "judge": f"{cfg.judge}: {cfg.spm}",
        "sampler": (
            f"{s.num_steps} {schedule.describe()}, CFG {s.guidance_scale:g}, {s.k} "
            f"candidates per step from step {s.divert_step}, threshold {s.threshold:g}"
        ),
        "beta": cfg.beta,
        "ratio_clip": cfg.ratio_clip,
        "segment pairs": cfg.segment_pairs if s.inner_steps else "single transitions",
        "gradient clipping": cfg.optim.max_grad_norm or "none (as the release)",
        "learning rate": cfg.optim.lr,
        "lr schedule": f"{cfg.optim.lr_schedule}, {cfg.optim.warmup_steps} warm-up steps",
        "kept pairs per step": cfg.batch_size * cfg.gradient_accumulation_steps * num_processes,
        "max_steps": cfg.max_steps,
        "max_epochs": cfg.max_epochs,
        "mixed precision": cfg.mixed_precision,
        "seed": cfg.seed,
    }


def round_batches(
    n_pairs: int, num_processes: int, rank: int, batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """How the released code deals one sampling batch's gathered pairs out: one permutation
    shared by every process, n_pairs // num_processes pairs to each (the remainder is not
    trained), cut into micro-batches of `batch_size` of which the last may be smaller."""
    order = torch.randperm(n_pairs, generator=generator).tolist()
    each = n_pairs // num_processes
    mine = order[rank * each : (rank + 1) * each]
    return [mine[i : i + batch_size] for i in range(0, each, batch_size)]


def _epoch(
    cfg: SPOTrainConfig,
    loop: TrainLoop,
    model: DiffusionModel,
    sampler: PoolSampler,
    policy: Policy,
    prompts: list[str],
    epoch: int,
) -> tuple[int, dict]:
    """One epoch: every sampling batch (this process's share of the shuffled prompts) sampled
    with the current policy, then trained on. Returns the pairs kept by all processes and the
    sampler's mean statistics."""
    accelerator = loop.accelerator
    order = torch.randperm(len(prompts), generator=seeded_generator(cfg.seed, epoch)).tolist()
    mine = order[accelerator.process_index :: accelerator.num_processes]
    # the same number of sampling batches on every process (each one gathers)
    share = math.ceil(len(prompts) / accelerator.num_processes)
    rounds = math.ceil(share / cfg.sample_batch_size)
    kept, stats = 0, []
    for b in tqdm(
        range(rounds),
        desc=f"epoch {epoch}",
        leave=False,
        disable=not accelerator.is_main_process,
    ):
        texts = [prompts[i] for i in mine[b * cfg.sample_batch_size :][: cfg.sample_batch_size]]
        pairs = KeptPairs.empty()
        if texts:
            policy.unet.eval()
            gen = seeded_generator(cfg.seed, epoch, b, accelerator.process_index)
            pairs, st = sampler.sample(policy.unet, texts, gen)
            stats.append(st)
            policy.unet.train()
        pairs = _gather(accelerator, pairs)
        if cfg.segment_pairs == "transitions":
            pairs = pairs.transitions()
        kept += len(pairs)
        if not _train_round(cfg, loop, model, sampler, policy, pairs, (epoch, b)):
            break
    mean = {k: float(np.mean([st[k] for st in stats])) for k in stats[0]} if stats else {}
    return kept, mean


def _train_round(
    cfg: SPOTrainConfig,
    loop: TrainLoop,
    model: DiffusionModel,
    sampler: PoolSampler,
    policy: Policy,
    pairs: KeptPairs,
    key: tuple[int, int],
) -> bool:
    """Train on one sampling batch's gathered pairs (`round_batches`). Its last micro-batch
    ends an optimiser step even when fewer than gradient_accumulation_steps were accumulated,
    so that no gradient is pending at a checkpoint (method.md's differences). Returns False
    once the run is out of steps or time."""
    accelerator, unet = loop.accelerator, loop.model
    batches = round_batches(
        len(pairs),
        accelerator.num_processes,
        accelerator.process_index,
        cfg.batch_size,
        seeded_generator(cfg.seed, *key, 1),
    )
    accum = cfg.gradient_accumulation_steps
    settings = {"schedule": sampler.schedule, "share_start": cfg.speed.share_start}
    for b, rows in enumerate(batches):
        batch = pairs.index(rows)
        if b == len(batches) - 1:
            accelerator.step = accum - 1  # accelerate's count: the next micro-batch syncs
        with accelerator.accumulate(unet):
            with loop.autocast():
                logp_w, logp_l = chain_log_probs(model, unet, batch, **settings)
                with policy.reference(unet) as reference:
                    ref_w, ref_l = chain_log_probs(model, reference, batch, **settings)
            loss, ratio_w, ratio_l, clipped = spo_loss(
                logp_w, ref_w, logp_l, ref_l, cfg.beta, cfg.ratio_clip
            )
            loop.optimizer_step(loss)
            synced = accelerator.sync_gradients
        loop.logger.add(
            loss=loss.item(),
            ratio_win=ratio_w.mean().item(),
            ratio_lose=ratio_l.mean().item(),
            clamp_share=clipped.item(),
            score_gap_kept=batch.score_gap.mean().item(),
        )
        if not synced:
            continue
        loop.end_step()
        loop.periodic_images(model, policy)
        if not loop.running():
            return False
    return True

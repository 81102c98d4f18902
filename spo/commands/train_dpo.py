"""`spo train-dpo`: the Diffusion-DPO baseline (method.md section 1), SD1.5 and SDXL families.

The loop only; the loss is `spo.losses.dpo_loss`. One step for a micro-batch of B pairs: the
winners and losers (winner first, ties dropped) are VAE-encoded, each pair gets one timestep
and one noise, the policy and the reference (LoRA: the same UNet with adapters disabled) predict
the noise of all 2B latents, and the loss compares their errors on winner and loser.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from spo.annotators import announce, check_selection, keeps
from spo.commands import report
from spo.config import DPOTrainConfig
from spo.data import (
    BadImageCounter,
    PairDataset,
    check_pair_table,
    decode_image,
    read_pairs,
    split_rows,
    to_pixels,
)
from spo.errors import ConfigError
from spo.evaluation.scorers import build_scorer, check_scorer, prefer_by_scorer
from spo.latent_cache import PART_ROWS, DiskLatentCache, LatentCache, row_bytes, source_fingerprint
from spo.losses import DPOOutput, dpo_loss, sft_loss
from spo.models import DiffusionModel, TextConditioning, check_family, require_family
from spo.policy import Policy, check_lora_targets, register_lora_checkpoint_hooks
from spo.runs import check_writable, made_by, require_base_model
from spo.stream import PairStream, StreamedPairs, describe, stream_of_training_pairs
from spo.training.distributed import sum_over_ranks
from spo.training.loop import TrainLoop, check_precision, micro_batch_rows, seeded_generator
from spo.training.publish import model_card

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
    Returns (table, labels (N, 2), N). Streamed, only the first max_train_pairs are read."""
    p = cfg.pairs
    table = read_pairs(
        p.train,
        p.train_split,
        made_by(p.train),
        streaming=p.streams(p.train),
        limit=p.max_train_pairs,
        keep=keeps(p.annotators),
    )
    return table, check_pair_table(table, p.train), len(table)


def streamed(cfg: DPOTrainConfig) -> bool:
    """Whether training draws its pairs from a stream (max_train_pairs reads a table)."""
    return cfg.pairs.streams(cfg.pairs.train) and cfg.pairs.max_train_pairs is None


def relabel(cfg: DPOTrainConfig, table, device: str, resolution: int) -> np.ndarray:
    """AI feedback (the released code's "choice model"): every pair relabelled by a scorer."""

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


@dataclass(kw_only=True)
class DPOInputs:
    """One micro-batch made ready for the UNet: winners' rows first, then the losers'."""

    x_t: torch.Tensor  # (2B, C, h, w) noisy latents
    t: torch.Tensor  # (2B,) the pair's timestep, twice
    text: TextConditioning  # (2B) the caption, or the empty prompt when dropped
    # (2B, C, h, w) what the denoiser should predict: the noise, v, or the flow velocity
    target: torch.Tensor


def dpo_inputs(
    model: DiffusionModel,
    images: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    *,
    generator: torch.Generator,
    prompt_dropout: float,
    empty: TextConditioning,
) -> DPOInputs:
    """`images`: pixels (B, 2, 3, H, W) or cached posterior moments (mean, std), each
    (B, 2, C, h, w), winner first. Both images' latents are drawn from their VAE posterior, one
    timestep and one noise per pair, the caption dropped with probability `prompt_dropout`.
    Everything random comes from `generator`, in a fixed order (resumable)."""
    b = len(captions)
    gen = generator
    if isinstance(images, torch.Tensor):
        both = torch.cat([images[:, 0], images[:, 1]])  # winners, then losers
        latents = model.encode_images(both, generator=gen).float()
    else:
        mean, std = (torch.cat([x[:, 0], x[:, 1]]).to(model.device) for x in images)
        latents = model.sample_latents(mean, std, gen).float()
    noise = torch.randn((b, *latents.shape[1:]), generator=gen).to(latents).repeat(2, 1, 1, 1)
    t = model.training_timesteps(b, gen).to(latents.device).repeat(2)
    x_t, target = model.noised(latents, noise, t)
    drop = torch.rand(b, generator=gen) < prompt_dropout
    text = model.encode_text(captions)
    text = TextConditioning.cat(
        [empty if d else text.index([i]) for i, d in enumerate(drop.tolist())]
    )
    return DPOInputs(x_t=x_t, t=t, text=TextConditioning.cat([text, text]), target=target)


def dpo_objective(
    model: DiffusionModel, unet, policy: Policy, inputs: DPOInputs, cfg: DPOTrainConfig
) -> tuple[torch.Tensor, DPOOutput | None]:
    """The loss of one micro-batch (DPO against the reference, or SFT on the winners) and, for
    DPO, its diagnostics. Call it under the run's autocast."""
    pred = model.unet_forward(unet, inputs.x_t, inputs.t, inputs.text)
    if cfg.loss == "sft":
        return sft_loss(pred, inputs.target), None
    with policy.reference(unet) as reference:
        ref_pred = model.unet_forward(reference, inputs.x_t, inputs.t, inputs.text)
    out = dpo_loss(pred, ref_pred, inputs.target, cfg.beta, cfg.beta_scale)
    return out.loss, out


def _latent_cache(
    cfg: DPOTrainConfig,
    model: DiffusionModel,
    *,
    dataset: PairDataset | None,
    table,
    source_rows: np.ndarray | None,
    stream: PairStream | None,
    accelerator,
) -> LatentCache | DiskLatentCache | None:
    """The run's latent cache: on disk under `latent_cache_dir` (a table or a stream, built
    once, reused by later runs), else in memory (a table up to `latent_cache_max_gb`), or None
    (off, or random crops); its size is said before it is built."""
    main = accelerator.is_main_process
    say = print if main else (lambda *_: None)
    if not cfg.latent_cache:
        return None
    if cfg.random_crop:
        say("latent cache: off (random_crop draws a new crop every epoch)")
        return None
    flips = 2 if cfg.random_flip else 1
    per_pair = row_bytes(model, flips)
    what = f"2 images x {flips} mirror(s) per pair, {per_pair / 1e3:.0f} kB"
    if cfg.latent_cache_dir is not None:
        return _disk_cache(cfg, model, table, source_rows, stream, accelerator, what)
    if dataset is None:
        say("latent cache: off (streaming: set latent_cache_dir to keep one on disk)")
        return None
    size = len(dataset) * per_pair
    if size > cfg.latent_cache_max_gb * 1e9:
        say(
            f"latent cache: off, {len(dataset)} pairs ({what}) need {size / 1e9:.1f} GB > "
            f"latent_cache_max_gb {cfg.latent_cache_max_gb:g} (raise it, set latent_cache_dir "
            "to keep it on disk, or latent_cache=false to hide this)"
        )
        return None
    say(f"latent cache: {len(dataset)} pairs ({what}) = {size / 1e6:.1f} MB in memory")
    return LatentCache(model, dataset, progress=main)


def _disk_cache(cfg, model, table, source_rows, stream, accelerator, what: str):
    """The disk cache of the run's `table` (every row, ties too: a relabelling may need them;
    the training dataset's row i is its row `source_rows[i]`) or stream, built (or finished)
    first if it is not complete."""
    p = cfg.pairs
    data = {
        "source": source_fingerprint(p.train),
        "split": p.train_split,
        "annotators": dataclasses.asdict(p.annotators),
        "max_train_pairs": p.max_train_pairs,
    }
    if stream is not None:
        parts, rows = stream.num_shards, split_rows(stream.data)
        data["layout"] = f"{parts} data files"

        def read_part(part: int):
            rows_of = stream.data.shard(num_shards=stream.num_shards, index=part)
            return (r if stream.keep is None or stream.keep(r) else None for r in rows_of)
    else:
        images = table.select_columns(["caption", "jpg_0", "jpg_1"])
        rows = len(images)
        parts = -(-rows // PART_ROWS)
        data["layout"] = f"{rows} rows, {PART_ROWS} per part"

        def read_part(part: int):
            return (images[r] for r in range(part * PART_ROWS, min(rows, (part + 1) * PART_ROWS)))

    cache = DiskLatentCache.for_model(
        cfg.latent_cache_dir, model, data=data, random_flip=cfg.random_flip, parts=parts
    )
    cache.table_rows = source_rows
    cache.folder.mkdir(parents=True, exist_ok=True)
    missing = cache.missing()
    main = accelerator.is_main_process
    if not missing:
        if main:
            print(f"latent cache: reusing {cache.folder} ({what})")
        return cache
    if main:
        each = row_bytes(model, cache.flips)
        size = (
            f"about {rows * each / 1e9:.2f} GB for the whole split's {rows} pairs"
            if rows
            else f"{each:,} bytes a pair; the split's size is not known before reading it"
        )
        print(
            f"latent cache: encoding {len(missing)} of {parts} parts into {cache.folder} "
            f"({what}; {size}); a killed run resumes the build"
        )
        free = shutil.disk_usage(cache.folder).free
        need = rows * each * len(missing) / max(parts, 1) if rows else 0
        if need > free:
            raise ConfigError(
                f"latent cache: the missing parts need about {need / 1e9:.1f} GB, "
                f"{cfg.latent_cache_dir} has {free / 1e9:.1f} GB free"
            )
    cache.build(
        model,
        read_part,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        progress=main,
    )
    return cache


def stand_in(cache, resolution: int):
    """One blank pair (pixels, or cached moments): a micro-batch whose pairs are all
    undecodable still runs the model, with weight 0, so accelerate's accumulation count and the
    gradient all-reduce stay in step on every process."""
    if cache is None:
        return torch.zeros(1, 2, 3, resolution, resolution)
    return cache.blank()


def run(cfg: DPOTrainConfig) -> int:
    """`spo train-dpo`: train, print the summary."""
    summary = train_dpo(cfg)
    return report(summary, f"Diffusion-DPO result written to {cfg.out}/final")


def train_dpo(cfg: DPOTrainConfig) -> dict:
    """Run the recipe; returns a summary (also written to OUT/final/train_summary.json)."""
    # Cheap checks first: inputs, resume target, before any model is loaded.
    check_precision(cfg)
    require_base_model(cfg)
    require_family(cfg.base_model, cfg.model_family)
    p = cfg.pairs
    selection = check_selection(p.annotators, p.train, p.train_split)
    announce(selection, p.annotators, f"training pairs {p.train}")
    if streamed(cfg):
        stream = stream_of_training_pairs(p, cfg.seed)
    else:
        stream = None
        table, labels, n_rows = load_dpo_pairs(cfg)
        BadImageCounter(p.max_bad_image_share, p.train).probe(table)
    if cfg.relabel_with != "none":
        check_scorer(cfg.relabel_with)
    check_lora_targets(cfg.base_model, cfg.policy)
    if cfg.latent_cache and cfg.latent_cache_dir is not None:
        check_writable(cfg.latent_cache_dir)
    loop = TrainLoop.for_diffusion(cfg, kind=KIND, name="dpo")
    if loop.already_finished:
        return loop.previous_result()
    if stream is not None:
        return _train(cfg, loop, stream=stream)
    if cfg.relabel_with == "none":
        _usable_rows(cfg, labels)
    return _train(cfg, loop, table=table, labels=labels)


def _train(cfg: DPOTrainConfig, loop: TrainLoop, *, stream=None, table=None, labels=None):
    """The run itself, from a table (`table`, `labels`) or a `stream`."""
    with loop:
        accelerator = loop.make_accelerator()
        set_seed(cfg.seed)
        model = DiffusionModel.for_training(cfg, accelerator)
        check_family(model.family, cfg.model_family, cfg.base_model)  # a Hub model's, loaded
        dataset = pairs = None
        if stream is None:
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
            n_rows, ties = len(table), len(table) - len(decided)
        else:
            stream.assign(accelerator.process_index, accelerator.num_processes)
            pairs = StreamedPairs(
                stream,
                model.resolution,
                seed=cfg.seed,
                drop_ties=True,
                winner_first=True,
                random_crop=cfg.random_crop,
                random_flip=cfg.random_flip,
            )
            n_rows, ties, decided = split_rows(stream.data), 0, None
        policy = Policy(model, cfg.policy)
        policy.compile(cfg.speed.compile, announce=loop.main)
        lr = effective_lr(cfg, accelerator.num_processes)
        if cfg.policy.mode == "lora":
            register_lora_checkpoint_hooks(accelerator, policy)
        unet, resumed = loop.begin(
            policy.unet,
            policy.trainable_parameters(),
            desc="train DPO",
            optimizer=cfg.optimizer,
            lr=lr,
        )
        bad = BadImageCounter(cfg.pairs.max_bad_image_share, cfg.pairs.train, n_rows)
        cache = _latent_cache(  # its time counts as training time
            cfg,
            model,
            dataset=dataset,
            table=table,
            source_rows=decided,
            stream=stream,
            accelerator=accelerator,
        )
        bad.seen, bad.bad = resumed.get("seen_pairs", 0), resumed.get("bad_pairs", 0)
        data = {"data/pairs": n_rows, "data/ties_dropped": ties, "train/effective_lr": lr}
        if pairs is not None:
            pairs.restore(resumed.get("stream"), accelerator)
            data = {"train/effective_lr": lr} | ({"data/pairs": n_rows} if n_rows else {})
            if loop.main:
                print(describe(stream, cfg.pairs.train_split))
        loop.logger.log(loop.step, data)

        def state() -> dict:
            kept = {"seen_pairs": bad.seen, "bad_pairs": bad.bad, "mode": cfg.policy.mode}
            if pairs is not None:  # every process's position, in rank order
                kept["stream"] = pairs.gathered_state()
            return kept

        empty = model.empty_text(1)
        accum = cfg.gradient_accumulation_steps
        loop.baseline_images(model, policy)
        while loop.running():
            micro = loop.step * accum
            for _ in range(accum):
                if pairs is not None and cache is not None:  # the disk cache, streamed
                    records = pairs.next_records(cfg.batch_size)
                    images, captions, skipped = cache.stream_batch(records)
                    bad.count(cfg.batch_size, skipped)
                elif pairs is not None:
                    batch = pairs.next_batch(cfg.batch_size)
                    images, captions, skipped = batch.pixels, batch.captions, batch.bad
                    bad.count(cfg.batch_size, skipped)
                else:
                    epoch, rows = micro_batch_rows(
                        len(dataset), cfg.batch_size, micro, accelerator, cfg.seed
                    )
                    dataset.epoch = epoch
                    if cache is None:
                        batch = PairDataset.collate([dataset[i] for i in rows])
                        images, captions, skipped = batch.pixels, batch.captions, batch.bad
                    else:
                        images, captions, skipped = cache.batch(dataset, rows)
                    bad.count(len(rows), skipped)
                micro += 1
                weight = 1.0
                if not captions:  # all undecodable: a zero-weight stand-in keeps every rank
                    images, captions, weight = stand_in(cache, model.resolution), [""], 0.0
                gen = seeded_generator(cfg.seed, micro, accelerator.process_index)
                inputs = dpo_inputs(
                    model,
                    images,
                    captions,
                    generator=gen,
                    prompt_dropout=cfg.prompt_dropout,
                    empty=empty,
                )
                with accelerator.accumulate(unet):
                    with loop.autocast():
                        loss, out = dpo_objective(model, unet, policy, inputs, cfg)
                    loop.optimizer_step(loss * weight)
                if not weight:
                    continue
                values = {"loss": loss.item()}
                if out is not None:
                    values |= {
                        "implicit_acc": out.implicit_acc.item(),
                        "model_mse": out.model_mse.item(),
                        "ref_mse": out.ref_mse.item(),
                        "margin": out.margin.item(),
                    }
                loop.logger.add(**values)
            bad.settle(lambda counts: sum_over_ranks(accelerator, counts))
            streamed_counts = pairs.metrics(accelerator) if pairs is not None else {}
            loop.end_step(bad_pairs=bad.bad, **streamed_counts)
            loop.periodic_images(model, policy)
            if loop.due(cfg.checkpoint_every):
                loop.save_checkpoint(state())

        if pairs is not None:
            ties = pairs.metrics(accelerator)["data/ties_dropped"]
        summary = {"step": loop.step, "pairs": n_rows, "ties_dropped": int(ties)}
        summary |= {"effective_lr": lr, "mode": cfg.policy.mode, "family": model.family}
        summary["final_metrics"] = loop.last_logged
        card = model_card(
            method="Diffusion-DPO",
            command="spo train-dpo",
            policy=policy.describe(),
            settings=card_settings(cfg, lr, accelerator.num_processes),
            summary=summary,
            location=loop.result_location,
        )
        loop.finish(
            partial(policy.save, card=card), summary, images_of=model, policy=policy, state=state()
        )
    return summary


def card_settings(cfg: DPOTrainConfig, lr: float, num_processes: int) -> dict:
    """The key settings the model card lists."""
    return {
        "pairs": cfg.pairs.train,
        "loss": cfg.loss,
        "beta": cfg.beta,
        "beta_scale": cfg.beta_scale,
        "learning rate": lr,
        "lr schedule": f"{cfg.optim.lr_schedule}, {cfg.optim.warmup_steps} warm-up steps",
        "optimizer": cfg.optimizer,
        "pairs per step": cfg.batch_size * cfg.gradient_accumulation_steps * num_processes,
        "max_steps": cfg.max_steps,
        "mixed precision": cfg.mixed_precision,
        "seed": cfg.seed,
    }

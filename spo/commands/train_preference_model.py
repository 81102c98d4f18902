"""`spo train-preference-model`: the SPM training recipe (method.md section 2).

The loop only: pairs -> noisy x0_hat images from the frozen base pipeline (`noisy.py`) ->
SPM scores -> PickScore's loss (`losses.py`). Multi-process through accelerate: every process
takes its own slice of each epoch's permutation; timesteps and noise come from generators seeded
by (seed, micro-step, rank), so a killed and resumed run sees the same data and noise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from preference_model import (
    LatentJudge,
    NoisyImageMaker,
    NoisyLatentMaker,
    StepAwarePreferenceModel,
    TransformerJudge,
    pairwise_accuracy,
    preference_loss,
    toy_spm,
)
from preference_model.errors import check_safetensors
from spo.annotators import announce, check_selection, keeps
from spo.commands import report
from spo.config import SPMTrainConfig
from spo.config.schemas import AnnotatorsConfig
from spo.data import (
    BadImageCounter,
    PairBatch,
    PairDataset,
    check_pair_table,
    decode_image,
    examples_per_prompt,
    load_columns,
    read_pairs,
    split_rows,
)
from spo.errors import ConfigError
from spo.families import family_class
from spo.judges import bind_judge, judge_text
from spo.models import DTYPES, DiffusionModel, describe_pipeline_folder
from spo.runs import atomic_write_bytes, made_by, require_base_model
from spo.stream import StreamedPairs, describe, stream_of_training_pairs
from spo.training.distributed import sum_over_ranks
from spo.training.loop import TrainLoop, check_precision, micro_batch_rows, seeded_generator

KIND = "spm_training"


def check_backbone(cfg: SPMTrainConfig) -> None:
    """The backbone's local files exist (and a safetensors file is whole), before any model is
    built; hub names and architecture names are checked by their loaders."""
    b = cfg.backbone
    files = [b.model] if b.model.endswith(".json") else []
    if b.pretrained and Path(b.pretrained).suffix in (".safetensors", ".bin", ".pt", ".pth"):
        files.append(b.pretrained)
    for name in files:
        if not Path(name).is_file():
            raise ConfigError(f"SPM backbone file not found: {name}")
        if name.endswith(".safetensors"):
            check_safetensors(Path(name))


def build_spm(cfg: SPMTrainConfig) -> StepAwarePreferenceModel:
    """The untrained SPM on the configured backbone (equal to the backbone at every t)."""
    b = cfg.backbone
    try:
        if b.family == "hf_clip":
            return StepAwarePreferenceModel.from_hf_clip(
                b.model, tokenizer=b.tokenizer, time_conditioning=cfg.time_conditioning
            )
        if b.model == "toy":
            return toy_spm(cfg.time_conditioning)
        model: str | Path = Path(b.model) if b.model.endswith(".json") else b.model
        return StepAwarePreferenceModel.from_open_clip(
            model, b.pretrained, time_conditioning=cfg.time_conditioning
        )
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot build the SPM backbone {b.model}: {e}") from e


Judge = StepAwarePreferenceModel | LatentJudge | TransformerJudge


def latent_judge(cfg: SPMTrainConfig, diffusion: DiffusionModel) -> LatentJudge | TransformerJudge:
    """The untrained latent judge of the base pipeline's kind of denoiser: the UNet's encoder
    and text encoder(s) (SD families), or the transformer's first blocks (flow families)."""
    s = cfg.latent
    if diffusion.family_module.denoiser == "transformer":
        return TransformerJudge.from_pipeline(
            diffusion.pipe, blocks=s.blocks, projection_dim=s.projection_dim
        )
    return LatentJudge.from_pipeline(
        diffusion.pipe, projection_dim=s.projection_dim, cfg_scale=s.cfg_scale
    )


def check_latent_settings(cfg: SPMTrainConfig) -> None:
    """One line, before any model loads, for latent-judge settings the base model's kind of
    denoiser has no use for (known for a local pipeline folder)."""
    facts = describe_pipeline_folder(cfg.base_model)
    if cfg.judge != "latent" or facts is None:
        return
    transformer = family_class(facts["family"]).denoiser == "transformer"
    if transformer and cfg.latent.cfg_scale is not None:
        raise ConfigError(
            f"latent.cfg_scale: {cfg.base_model} is a {facts['family']} model, whose latent "
            "judge (the transformer's first blocks) has no guidance on its features; set null"
        )
    if transformer and cfg.latent.blocks is not None:
        config = Path(cfg.base_model) / "transformer" / "config.json"
        layers = json.loads(config.read_text(encoding="utf-8")).get("num_layers")
        if layers is not None and cfg.latent.blocks > layers:
            raise ConfigError(
                f"invalid value {cfg.latent.blocks} in config key 'latent.blocks': the "
                f"transformer of {cfg.base_model} has {layers} blocks"
            )
    if not transformer and cfg.latent.blocks is not None:
        raise ConfigError(
            f"latent.blocks: {cfg.base_model} is a {facts['family']} model, whose latent judge "
            "is its UNet's encoder half; latent.blocks is for transformer families: set null"
        )


Maker = NoisyImageMaker | NoisyLatentMaker


def judge_inputs(
    judge: Judge, maker: Maker, batch: PairBatch, timesteps: torch.Tensor, generator, device
) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """What the judge scores for a batch of pairs at `timesteps`, both images of a pair in a
    row: decoded x0_hat pixels (the SPM) or noisy latents (the latent judge), and token ids."""
    made = maker(batch.pixels, batch.captions, timesteps, generator).flatten(0, 1).to(device)
    text = judge_text(judge, maker.model, batch.captions, repeats=2)
    if isinstance(judge, StepAwarePreferenceModel):
        return judge.preprocess(made, "-1-1"), text
    return made, text


@dataclass
class PairSplit:
    """A validated split: the table, its labels (N, 2) and the dataset that decodes it."""

    source: str
    table: object
    labels: np.ndarray
    dataset: PairDataset


def load_split(
    source: str,
    split: str,
    limit: int | None,
    streaming: bool = False,
    annotators: AnnotatorsConfig | None = None,
) -> PairSplit:
    """Load and check one split of pairs (columns, labels) before any compute is spent; its
    dataset gets the diffusion model's resolution later (`PairSplit.dataset.resolution`).
    With `streaming` only the first `limit` rows are read (into memory); with `annotators`,
    only their pairs (the count printed)."""
    keep = None
    if annotators is not None and annotators.active:
        selection = check_selection(annotators, source, split)
        announce(selection, annotators, f"pairs {source} ({split})")
        keep = keeps(annotators)
    table = read_pairs(source, split, made_by(source), streaming=streaming, limit=limit, keep=keep)
    labels = check_pair_table(table, source)
    return PairSplit(source, table, labels, PairDataset(table, 0, labels))


def oracle_ceiling(split: PairSplit) -> float | None:
    """Toy world only: accuracy of the oracle's own order against the annotator's labels on
    the non-tie pairs (the best any judge of these labels can do on average)."""
    if not {"reward_0", "reward_1"} <= set(split.table.column_names):
        return None
    r = np.stack([np.asarray(split.table[c], dtype=np.float64) for c in ("reward_0", "reward_1")])
    accuracy, _ = pairwise_accuracy(
        torch.from_numpy(r[0]), torch.from_numpy(r[1]), torch.from_numpy(split.labels)
    )
    return accuracy


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


@torch.no_grad()
def score_pairs(
    spm: Judge,
    maker: Maker,
    dataset: PairDataset,
    indices: list[int],
    *,
    timestep: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPM scores of both images of the given pairs at one timestep: (s0, s1, labels)."""
    s0, s1, labels = [], [], []
    for chunk in _batches(indices, batch_size):
        batch = PairDataset.collate([dataset[i] for i in chunk])
        if not batch.captions:
            continue
        t = torch.full((len(batch.captions),), timestep, dtype=torch.long)
        inputs, ids = judge_inputs(spm, maker, batch, t, generator, spm.device)
        scores = spm.logits(inputs, ids, t.repeat_interleave(2).to(spm.device)).float()
        s0.append(scores[0::2].cpu())
        s1.append(scores[1::2].cpu())
        labels.append(batch.labels)
    if not s0:
        return torch.empty(0), torch.empty(0), torch.empty(0, 2)
    return torch.cat(s0), torch.cat(s1), torch.cat(labels)


def validate(
    accelerator,
    spm: Judge,
    maker: Maker,
    split: PairSplit,
    *,
    timesteps: list[int],
    batch_size: int,
    seed: int,
    limit: int | None = None,
) -> dict[str, float]:
    """Pairwise accuracy on non-tie validation pairs at each timestep (fixed noise per t).

    Each process scores its own share of the pairs; the scores are gathered.
    """
    n = len(split.dataset) if limit is None else min(limit, len(split.dataset))
    mine = list(range(n))[accelerator.process_index :: accelerator.num_processes]
    was_training = spm.training
    spm.eval()
    result = {}
    for t in timesteps:
        gen = seeded_generator(seed, 7919, t, accelerator.process_index)
        s0, s1, labels = score_pairs(
            spm, maker, split.dataset, mine, timestep=t, batch_size=batch_size, generator=gen
        )
        if accelerator.num_processes > 1:  # shards differ in size: gather them as objects
            shards = gather_object([(s0.cpu(), s1.cpu(), labels.cpu())])
            s0, s1, labels = (torch.cat([shard[i] for shard in shards]) for i in range(3))
        result[str(t)] = pairwise_accuracy(s0, s1, labels)[0]
    spm.train(was_training)
    return result


def relabel_by_backbone(
    spm: StepAwarePreferenceModel, split: PairSplit, tie_gap: float, batch_size: int
) -> np.ndarray:
    """New labels from the clean backbone (the untrained SPM at t = 0, which equals it,
    resizing with antialiasing as PickScore's processor does) on each pair's original images:
    the higher-scored image wins when the 2-way softmax probabilities differ by more than
    `tie_gap`, else a tie (the SDXL SPM's recipe, method.md 2; the release relabels its
    training and its validation pairs so)."""
    labels = split.labels.copy()  # a pair whose images do not decode keeps its own labels
    table = split.dataset.table
    for chunk in tqdm(_batches(list(range(len(table))), batch_size), desc="relabel", leave=False):
        rows = table[chunk[0] : chunk[-1] + 1]
        kept, images, captions = [], [], []
        columns = (rows["caption"], rows["jpg_0"], rows["jpg_1"])
        for i, caption, *pair in zip(chunk, *columns, strict=True):
            try:
                images += [decode_image(image) for image in pair]
            except Exception:  # PIL raises many kinds; training skips and counts this pair
                continue
            kept.append(i)
            captions.append(str(caption))
        if not kept:
            continue
        with torch.no_grad():
            ids = spm.tokenize(captions).repeat_interleave(2, dim=0)
            scores = spm.logits(spm.preprocess(images), ids, 0).float().view(-1, 2)
        probs = scores.softmax(dim=-1).cpu().numpy()
        gap = probs[:, 0] - probs[:, 1]
        new = np.where(gap > tie_gap, 1.0, np.where(gap < -tie_gap, 0.0, 0.5))
        labels[kept] = np.stack([new, 1.0 - new], axis=1)
    return labels


def loss_over_processes(
    accelerator, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released criterion over the micro-batch of every process together.

    The release gathers every process's pairs with a differentiable all_gather, so each
    process computes the whole batch's loss L and the all_gather's backward sums the gradients
    of each process's pairs over the processes; after the mean over processes (DeepSpeed, DDP)
    the update follows dL/dtheta. A pair's loss needs only its own scores, so here only the
    weights' sums are gathered (accelerate's gather, no gradient, any batch sizes): process r
    computes its share L_r = sum_r(w l) / sum_all(w), sum_r L_r = L, and back-propagates
    P * L_r, which DDP's mean over the P processes turns into dL/dtheta.

    `scores` (B, 2); `weights` (B,), zero for a stand-in pair. Returns (what to back-propagate,
    L (the same on every process, logged), probability that image 0 is preferred).
    """
    total = accelerator.gather(weights.sum().reshape(1)).sum()
    share, p0 = preference_loss(scores[:, 0], scores[:, 1], labels, weights, weight_total=total)
    whole = accelerator.gather(share.detach().reshape(1)).sum()
    return share * accelerator.num_processes, whole, p0


def run(cfg: SPMTrainConfig) -> int:
    """`spo train-preference-model`: train, print the final evaluation."""
    result = train_preference_model(cfg)
    what = "latent judge" if cfg.judge == "latent" else "SPM"
    return report(result, f"{what} written to {cfg.out}/final (evaluation: {cfg.out}/eval.json)")


def train_preference_model(cfg: SPMTrainConfig) -> dict:
    """Run the recipe; returns the final evaluation written to OUT/eval.json."""
    # Everything that can fail cheaply fails here, before the run folder or any compute.
    check_precision(cfg)
    require_base_model(cfg)
    check_latent_settings(cfg)
    if cfg.judge == "pixel":
        check_backbone(cfg)
    p = cfg.pairs
    train = stream = None
    if p.streams(p.train) and p.max_train_pairs is None:
        sel = p.annotators
        announce(check_selection(sel, p.train, p.train_split), sel, f"training pairs {p.train}")
        stream = stream_of_training_pairs(p, cfg.seed)
        bad = BadImageCounter(p.max_bad_image_share, p.train, split_rows(stream.data))
        # PickScore's weights need every (kept) caption's count: those columns alone are read
        columns = ["caption", *([sel.column] if sel.active else [])]
        rows = load_columns(p.train, columns, p.train_split, made_by(p.train), "pairs")
        keep = keeps(sel) or (lambda row: True)
        per_prompt = Counter(
            caption
            for i, caption in enumerate(rows["caption"])
            if keep({c: rows[c][i] for c in columns})
        )
    else:
        train = load_split(
            p.train, p.train_split, p.max_train_pairs, p.streams(p.train), p.annotators
        )
        bad = BadImageCounter(p.max_bad_image_share, train.source, len(train.table))
        bad.probe(train.table)
    val = load_split(
        p.validation,
        p.validation_split,
        p.max_validation_pairs,
        p.streams(p.validation),
        p.annotators,
    )
    BadImageCounter(p.max_bad_image_share, val.source).probe(val.table)
    loop = TrainLoop(
        cfg, kind=KIND, name="spm", mode=cfg.judge, mode_key="judge", mode_default="pixel"
    )
    if loop.already_finished:
        return loop.previous_result("eval.json")
    set_seed(cfg.seed)  # the time-conditioning MLP (and a random backbone) start the same
    spm = build_spm(cfg) if cfg.judge == "pixel" else None
    with loop:
        accelerator = loop.make_accelerator()
        diffusion = DiffusionModel.from_pretrained(
            cfg.base_model, dtype=DTYPES[cfg.base_dtype], device=accelerator.device, vae=cfg.vae
        ).at_resolution(cfg.resolution)
        if spm is None:  # the latent judge starts from the base pipeline's denoiser
            spm = bind_judge(latent_judge(cfg, diffusion), diffusion)
        val.dataset.resolution = diffusion.resolution
        spm = spm.to(accelerator.device)

        pairs = None
        if stream is not None:
            stream.assign(accelerator.process_index, accelerator.num_processes)
            pairs = StreamedPairs(
                stream,
                diffusion.resolution,
                seed=cfg.seed,
                weight_of=lambda caption: 1.0 / per_prompt[caption],
            )
        else:
            train.dataset.resolution = diffusion.resolution
        if cfg.pairs.relabel_tie_gap is not None:  # a stream is refused with it (schemas)
            spm.eval()
            for split in (val,) if train is None else (train, val):
                split.labels = relabel_by_backbone(
                    spm, split, cfg.pairs.relabel_tie_gap, cfg.batch_size
                )
                split.dataset.labels = split.labels
            spm.train()
        if train is not None:
            train.dataset.weights = 1.0 / examples_per_prompt(list(train.table["caption"]))
        if cfg.judge == "latent":
            maker, t_max = NoisyLatentMaker(diffusion), cfg.latent.max_timestep + 1
            val_maker: Maker = maker
        else:
            spm.config.antialias = cfg.inputs.antialias  # after relabelling; saved with it
            inputs = {
                "guidance_scale": cfg.guidance_scale,
                "max_pairs": cfg.batch_size,
                "sample_posterior": cfg.inputs.vae_posterior == "sample",
            }
            maker = NoisyImageMaker(diffusion, **inputs, noise_t0=cfg.inputs.noise_t0)
            val_maker = NoisyImageMaker(diffusion, **inputs, noise_t0=False)
            t_max = diffusion.num_train_timesteps

        desc = "train latent judge" if cfg.judge == "latent" else "train SPM"
        model, resumed = loop.begin(spm, spm.parameters(), desc=desc)
        spm_unwrapped: Judge = accelerator.unwrap_model(model)
        bad.seen, bad.bad = resumed.get("seen_pairs", 0), resumed.get("bad_pairs", 0)
        if pairs is not None:
            pairs.restore(resumed.get("stream"), accelerator)
            if loop.main:
                print(describe(stream, p.train_split))

        def state() -> dict:
            kept = {"seen_pairs": bad.seen, "bad_pairs": bad.bad, "mode": cfg.judge}
            if pairs is not None:  # every process's position, in rank order
                kept["stream"] = pairs.gathered_state()
            return kept

        def accuracy(limit: int | None = None) -> dict[str, float]:
            return validate(
                accelerator,
                spm_unwrapped,
                val_maker,
                val,
                timesteps=cfg.validation_timesteps,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                limit=limit,
            )

        accum = cfg.gradient_accumulation_steps
        model.train()
        while loop.running():
            micro = loop.step * accum
            for _ in range(accum):
                if pairs is not None:
                    batch = pairs.next_batch(cfg.batch_size)
                    bad.count(cfg.batch_size, batch.bad)
                else:
                    _, rows = micro_batch_rows(
                        len(train.dataset), cfg.batch_size, micro, accelerator, cfg.seed
                    )
                    batch = PairDataset.collate([train.dataset[i] for i in rows])
                    bad.count(len(rows), batch.bad)
                weight = 1.0 if batch.captions else 0.0
                if not weight:  # all undecodable: a zero-weight stand-in (PairBatch.blank)
                    batch = PairBatch.blank(diffusion.resolution, batch.bad)
                gen = seeded_generator(cfg.seed, micro, accelerator.process_index)
                t = torch.randint(0, t_max, (len(batch.captions),), generator=gen)
                inputs, ids = judge_inputs(spm_unwrapped, maker, batch, t, gen, accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        scores = model(inputs, ids, t.repeat_interleave(2).to(accelerator.device))
                    step_loss, loss, p0 = loss_over_processes(
                        accelerator,
                        scores.float().view(-1, 2),
                        batch.labels.to(accelerator.device),
                        batch.weights.to(accelerator.device) * weight,
                    )
                    loop.optimizer_step(step_loss)
                micro += 1
                if not weight:
                    continue
                p0 = p0.detach().cpu()
                loop.logger.add(
                    **{
                        "train/loss": loss.item(),
                        "train/accuracy": pairwise_accuracy(p0, 1 - p0, batch.labels)[0],
                    }
                )
            bad.settle(lambda counts: sum_over_ranks(accelerator, counts))
            streamed_counts = pairs.metrics(accelerator) if pairs is not None else {}
            loop.end_step("train/loss", bad_pairs=bad.bad, **streamed_counts)
            if loop.due(cfg.validation_every):
                acc = accuracy(cfg.validation_pairs_periodic)
                loop.logger.log(loop.step, {f"val/accuracy_t{t}": a for t, a in acc.items()})
            if loop.due(cfg.checkpoint_every):
                loop.save_checkpoint(state())

        final_accuracy = accuracy()
        result: dict = {"accuracy_by_timestep": final_accuracy, "step": loop.step}
        ceiling = oracle_ceiling(val)
        if ceiling is not None:
            result["oracle_ceiling"] = ceiling
        result["validation_pairs"] = int((val.labels[:, 0] != 0.5).sum())
        result["judge"] = cfg.judge
        result["time_conditioning"] = cfg.time_conditioning

        def save(folder: Path) -> None:
            spm_unwrapped.config.trained_on = diffusion.describe()
            spm_unwrapped.save(folder)

        def write_evaluation() -> None:
            atomic_write_bytes(loop.run.root / "eval.json", json.dumps(result, indent=2).encode())
            loop.logger.log(loop.step, {f"val/accuracy_t{t}": a for t, a in final_accuracy.items()})

        loop.finish(save, after=write_evaluation, state=state())
    return result

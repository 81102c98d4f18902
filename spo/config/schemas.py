"""The config schema of every command: plain dataclasses, every field commented.

The defaults live here, YAML files only say what differs, and `validate()` rejects nonsensical
values with one line before any work starts. `COMMAND_CONFIGS` maps each command to its schema.
A command's defaults are its toy experiment (spo/configs/toy/, the demo's stages), so `spo
<command>` with no config runs what the docs describe; the sd15 / sdxl configs state every
value they change. The comments are shown by `spo <command> --print-config`.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from spo.errors import ConfigError
from spo.sources import is_local_path, offline_requested


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {value!r} for config key '{key}': {rule}")


def require_finite(cfg: Any, prefix: str = "") -> None:
    """No config number may be nan or inf (nan passes every `x > 0` check, and inf turns a
    budget or a clip off): one line naming the first such key."""
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        values = value if isinstance(value, list) else [value]
        for v in values:
            if is_dataclass(v):
                require_finite(v, f"{key}.")
            elif isinstance(v, float):
                _require(math.isfinite(v), key, v, "must be a finite number")


@dataclass
class ToyWorldConfig:
    """`spo toy-world`: build the toy world's preference pairs, prompts and sample grids."""

    out: str = "runs/toy/world"  # run folder (config.yaml, metrics.jsonl, data, grids)
    seed: int = 0  # master seed: the same seed and config give the same world
    train_pairs: int = 3000  # preference pairs in the training split
    validation_pairs: int = 500  # preference pairs in the validation split
    annotator_tau: float = 0.05  # Bradley-Terry temperature of the simulated annotator
    tie_delta: float = 0.03  # |R(a) - R(b)| below this is labelled a tie (0.5 / 0.5)
    grid_prompts: int = 8  # prompts in the base model's sample grid
    grid_images_per_prompt: int = 4  # images per prompt in that grid
    layouts_per_prompt: int = 2  # colour layouts of each eval prompt (edit/layouts/)
    # also sample the flow base model for its report (flow_base_samples.png, world.json's
    # flow_base_model); `spo demo` skips it unless it runs the flow arm
    flow_base_report: bool = True
    # the two-group world (pairs/groups_*.parquet): pairs, each labelled by both groups
    group_pairs: int = 1500
    group_validation_pairs: int = 250
    num_inference_steps: int = 20  # sampling steps of the base models (DDIM; flow: Euler)
    # CFG when sampling the base model; 2.0, not method.md's 5.0: at 5.0 the toy base model's
    # samples are nearly all clean, leaving no room to prefer (measured in docs/toy-world.md)
    guidance_scale: float = 2.0

    def validate(self) -> None:
        """Reject nonsensical values before any work starts (one-line ConfigError)."""
        _require(bool(str(self.out).strip()), "out", self.out, "must be a non-empty path")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        for key in (
            "train_pairs",
            "validation_pairs",
            "grid_prompts",
            "grid_images_per_prompt",
            "layouts_per_prompt",
            "group_pairs",
            "group_validation_pairs",
        ):
            value = getattr(self, key)
            _require(value > 0, key, value, "must be > 0")
        tau = self.annotator_tau
        _require(math.isfinite(tau) and tau > 0, "annotator_tau", tau, "must be > 0")
        delta = self.tie_delta
        _require(math.isfinite(delta) and delta >= 0, "tie_delta", delta, "must be >= 0")
        steps = self.num_inference_steps
        _require(steps >= 1, "num_inference_steps", steps, "must be >= 1")
        scale = self.guidance_scale
        _require(math.isfinite(scale) and scale >= 0, "guidance_scale", scale, "must be >= 0")


# The toy world samples at CFG 2.0, not method.md's 5.0: at 5.0 the toy base model's samples are
# nearly all clean, leaving no room to prefer (docs/toy-world.md).
TOY_GUIDANCE = 2.0
# What the trainers' validation grids draw in the toy world.
TOY_VALIDATION_PROMPTS = (
    "a red circle on a white background",
    "a blue cross on a black background",
)

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("none", "tensorboard", "wandb")
LR_SCHEDULES = ("constant_with_warmup", "linear", "cosine")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (shared by every trainer)."""

    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0, in optimiser steps
    lr_schedule: str = "constant_with_warmup"  # constant_with_warmup | linear | cosine
    max_grad_norm: float = 1.0  # gradient clipping (<= 0: off)

    def validate(self, prefix: str = "optim") -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _require(
            self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0"
        )
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"{prefix}.{key}", value, "must be in [0, 1)")
        _require(self.adam_epsilon > 0, f"{prefix}.adam_epsilon", self.adam_epsilon, "must be > 0")
        _require(
            self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0"
        )
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f"{prefix}.lr_schedule",
            self.lr_schedule,
            "must be one of " + ", ".join(LR_SCHEDULES),
        )


@dataclass
class BackboneConfig:
    """The CLIP the SPM is built on (method.md 2: PickScore_v1 for the real models)."""

    family: str = "open_clip"  # open_clip | hf_clip (transformers CLIPModel, e.g. PickScore_v1)
    # open_clip: an architecture name, a model-config JSON, or "toy" (the shipped toy CLIP);
    # hf_clip: a hub name or a local folder of a CLIPModel
    model: str = "toy"
    # open_clip only: a weights file or an open_clip pretrained tag (None: random weights;
    # ignored for "toy", whose weights ship with it)
    pretrained: str | None = None
    tokenizer: str | None = None  # hf_clip only: a folder with CLIPTokenizer files


@dataclass
class AnnotatorsConfig:
    """Group preferences: only the pairs (or prompts) of some annotators. Pick-a-Pic records
    who made each choice in `user_id`; another column makes this a column filter
    (`column: group`, `ids: [A]`)."""

    ids: list[str] | None = None  # the annotator ids to keep, compared as text; null: every row
    file: str | None = None  # or a file of ids, one a line
    column: str = "user_id"  # the column holding them

    @property
    def active(self) -> bool:
        return self.ids is not None or self.file is not None

    def validate(self, prefix: str) -> None:
        _require(
            self.ids is None or self.file is None,
            f"{prefix}.ids",
            self.ids,
            f"give ids or {prefix}.file, not both",
        )
        _require(self.ids is None or len(self.ids) > 0, f"{prefix}.ids", self.ids, "is empty")
        _require(bool(self.column.strip()), f"{prefix}.column", self.column, "is empty")


@dataclass
class TrainPairsConfig:
    """Where the training pairs come from (Pick-a-Pic schema; no validation split)."""

    # a parquet file / folder / glob, a save_to_disk folder, or a hub dataset name
    train: str = "runs/toy/world/pairs/train.parquet"
    train_split: str = "train"  # split name, used for hub datasets and DatasetDict folders
    max_train_pairs: int | None = None  # use only the first N training pairs (None: all)
    max_bad_image_share: float = 0.01  # undecodable pairs are skipped; fail past this share
    # Read the pairs as a stream (datasets streaming: rows are read as training takes them, the
    # split is never downloaded whole first) or whole. null: stream hub datasets (but read
    # datasets' cache whole when HF_HUB_OFFLINE is set), read local sources whole. A streamed
    # validation split, or max_*_pairs of a streamed one, is read into memory; relabelling
    # (relabel_with, relabel_tie_gap) and the latent cache need the whole split.
    # docs/data.md: the order, and what a resume reads again.
    streaming: bool | None = None
    # Streaming: rows shuffled together, held in memory on every process (Pick-a-Pic: about
    # 330 kB a pair, 330 MB for 1000)
    shuffle_buffer: int = 1000
    # Group preferences: train (and validate) on the pairs of these annotators only; the
    # pairs each split keeps are counted and printed before training
    annotators: AnnotatorsConfig = field(default_factory=AnnotatorsConfig)

    def streams(self, source: str) -> bool:
        """Whether `source` is read as a stream."""
        if self.streaming is not None:
            return self.streaming
        return not is_local_path(source) and not offline_requested()

    def validate(self) -> None:
        value = self.max_train_pairs
        _require(value is None or value > 0, "pairs.max_train_pairs", value, "must be > 0 or null")
        size = self.shuffle_buffer
        _require(size > 0, "pairs.shuffle_buffer", size, "must be > 0")
        share = self.max_bad_image_share
        _require(0 <= share < 1, "pairs.max_bad_image_share", share, "must be in [0, 1)")
        self.annotators.validate("pairs.annotators")


@dataclass
class PairsConfig(TrainPairsConfig):
    """Where the preference pairs come from (Pick-a-Pic schema): training and validation."""

    validation: str = "runs/toy/world/pairs/validation.parquet"  # the same forms as `train`
    validation_split: str = "validation"
    max_validation_pairs: int | None = None  # use only the first N validation pairs
    # Relabel every training and validation pair with the clean backbone's scores of the
    # original images (the SDXL SPM's recipe): a win / lose label if the gap of the 2-way
    # softmax probabilities exceeds this, else a tie. None keeps the pairs' own labels.
    relabel_tie_gap: float | None = None

    def validate(self) -> None:
        super().validate()
        n = self.max_validation_pairs
        _require(n is None or n > 0, "pairs.max_validation_pairs", n, "must be > 0 or null")
        gap = self.relabel_tie_gap
        _require(gap is None or 0 <= gap < 1, "pairs.relabel_tie_gap", gap, "must be in [0, 1)")


def _validate_loop(cfg: Any) -> None:
    """Checks shared by the trainers' loop settings."""
    _require(bool(str(cfg.out).strip()), "out", cfg.out, "must be a non-empty path")
    _require(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
        value = getattr(cfg, key)
        _require(value > 0, key, value, "must be > 0")
    _require(
        cfg.checkpoint_every >= 0,
        "checkpoint_every",
        cfg.checkpoint_every,
        "must be >= 0 (0: none)",
    )
    _require(
        cfg.mixed_precision is None or cfg.mixed_precision in MIXED_PRECISION,
        "mixed_precision",
        cfg.mixed_precision,
        "must be one of " + ", ".join(MIXED_PRECISION) + " or null (the launcher's)",
    )
    _require(
        cfg.tracker in TRACKERS, "tracker", cfg.tracker, "must be one of " + ", ".join(TRACKERS)
    )
    if cfg.tracker != "none" and importlib.util.find_spec(cfg.tracker) is None:
        raise ConfigError(
            f"tracker '{cfg.tracker}' needs the {cfg.tracker} package: pip install {cfg.tracker} "
            "(or tracker=none; metrics.jsonl is always written)"
        )
    _require(
        cfg.checkpoints_total_limit > 0,
        "checkpoints_total_limit",
        cfg.checkpoints_total_limit,
        "must be > 0",
    )
    cfg.optim.validate()
    minutes = getattr(cfg, "max_minutes", None)
    _require(minutes is None or minutes > 0, "max_minutes", minutes, "must be > 0 or null")
    if hasattr(cfg, "validation_images"):
        cfg.validation_images.validate()


@dataclass
class SPMInputsConfig:
    """How the pixel SPM's training images are made: the released SPM trainer's way by
    default (docs/preference-model.md lists each difference)."""

    # resize the decoded x0_hat to the backbone's input size with antialiasing (false: plain
    # bicubic interpolation, as the release does in training and in SPO); saved with the SPM
    antialias: bool = False
    vae_posterior: str = "sample"  # sample (the release) | mean: the latents of each image
    # a pair drawn at t = 0 is noised at alpha_bar_0 and predicted like any other (the
    # release); false: judged as the clean image. Validation at t = 0 always sees it clean.
    noise_t0: bool = True

    def validate(self) -> None:
        _require(
            self.vae_posterior in ("sample", "mean"),
            "inputs.vae_posterior",
            self.vae_posterior,
            "must be sample or mean",
        )


@dataclass
class LatentJudgeSettings:
    """The latent judge (method.md 6; `judge: latent`): LPO's released settings by default."""

    projection_dim: int = 768  # width of the shared image / text feature space
    cfg_scale: float | None = None  # CFG on the pooled mid-block features (LPO: 7.5; None: off)
    max_timestep: int = 951  # training timesteps are drawn from [0, max_timestep]
    # transformer (flow) families only: the judge is the base transformer's first N blocks;
    # null: half of them (method.md 6); UNet families take the UNet's encoder half
    blocks: int | None = None

    def validate(self) -> None:
        _require(
            self.blocks is None or self.blocks >= 1, "latent.blocks", self.blocks, "must be >= 1"
        )
        _require(
            self.projection_dim > 0, "latent.projection_dim", self.projection_dim, "must be > 0"
        )
        scale = self.cfg_scale
        _require(scale is None or math.isfinite(scale), "latent.cfg_scale", scale, "must be finite")
        t = self.max_timestep
        _require(0 <= t < 1000, "latent.max_timestep", t, "must be in [0, 1000)")


def _validate_resolution(r: int | None) -> None:
    _require(r is None or (r > 0 and r % 16 == 0), "resolution", r, "must be a multiple of 16")


def _validate_hub(cfg: Any) -> None:
    """push_to_hub needs a repository id the Hub accepts."""
    if not cfg.push_to_hub:
        return
    _require(
        cfg.hub_model_id is not None, "hub_model_id", None, "must be set when push_to_hub=true"
    )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(cfg.hub_model_id)
    except HFValidationError as e:
        rule = str(e).strip().splitlines()[0]
        _require(False, "hub_model_id", cfg.hub_model_id, f"not a Hub repository id ({rule})")


@dataclass
class SPMTrainConfig:
    """`spo train-preference-model`: train a step-aware preference model (method.md 2)."""

    out: str = "runs/toy/spm"  # run folder
    seed: int = 0  # data order, timesteps and noise all derive from it
    # the frozen diffusers pipeline (any family) whose x0_hat (or latents) the judge learns
    base_model: str = "runs/toy/world/base_model"
    # Size of the images the judge sees made (SPO's sampling size); null: the model's own
    resolution: int | None = None
    vae: str | None = None  # replace the pipeline's VAE (e.g. SDXL's fp16-safe one)
    base_dtype: str = "float32"  # dtype of the frozen pipeline: float32 | float16 | bfloat16
    # CFG of the base UNet's prediction (empty negative prompt): the toy sampler's 2.0 (method.md
    # and the released SPMs: 5.0); the latent judge does not use it
    guidance_scale: float = TOY_GUIDANCE
    # pixel: the SPM, a CLIP judging the decoded x0_hat (method.md 2); latent: the latent judge,
    # the base UNet's encoder judging the noisy latent itself (method.md 6; `latent` settings)
    judge: str = "pixel"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    time_conditioning: bool = True  # False: the paper's ablation, a plain CLIP on x0_hat
    # how the pixel SPM's training images are made (the released trainer's way by default)
    inputs: SPMInputsConfig = field(default_factory=SPMInputsConfig)
    latent: LatentJudgeSettings = field(default_factory=LatentJudgeSettings)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    # weight decay 0.3 as the released SD1.5 SPM
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(weight_decay=0.3, warmup_steps=20)
    )
    batch_size: int = 32  # pairs per process per micro-batch
    gradient_accumulation_steps: int = 1
    max_steps: int = 250  # optimiser steps
    mixed_precision: str | None = None  # no | fp16 | bf16; null: what accelerate launch says
    log_every: int = 10  # optimiser steps between metrics.jsonl lines
    tracker: str = "none"  # none | tensorboard | wandb (metrics.jsonl is always written)
    validation_every: int = 125  # optimiser steps between validations (0: only at the end)
    # pairs used by the periodic validations (the final one uses every validation pair)
    validation_pairs_periodic: int = 128
    validation_timesteps: list[int] = field(default_factory=lambda: [0, 251, 501, 701, 951])
    checkpoint_every: int = 125  # optimiser steps between resumable checkpoints (0: none)
    checkpoints_total_limit: int = 2  # older checkpoints are deleted
    resume: str = "latest"  # latest (if any) | none | a checkpoint folder

    def validate(self) -> None:
        """Reject nonsensical values before any work starts (one-line ConfigError)."""
        _validate_loop(self)
        self.pairs.validate()
        self.inputs.validate()
        self.latent.validate()
        _validate_resolution(self.resolution)
        _require(self.judge in ("pixel", "latent"), "judge", self.judge, "must be pixel or latent")
        if self.judge == "latent" and self.pairs.relabel_tie_gap is not None:
            raise ConfigError(
                "pairs.relabel_tie_gap relabels with the clean CLIP backbone, which the latent "
                "judge has not: relabel with the pixel judge's config, or set it to null"
            )
        if self.pairs.relabel_tie_gap is not None and self.pairs.streams(self.pairs.train):
            raise ConfigError(
                "pairs.relabel_tie_gap relabels every pair before training, which needs the whole "
                "split: set pairs.streaming=false (read it whole) or relabel_tie_gap=null"
            )
        _require(
            self.validation_every >= 0,
            "validation_every",
            self.validation_every,
            "must be >= 0 (0: only at the end)",
        )
        _require(
            self.backbone.family in ("open_clip", "hf_clip"),
            "backbone.family",
            self.backbone.family,
            "must be open_clip or hf_clip",
        )
        _require(
            self.base_dtype in ("float32", "float16", "bfloat16"),
            "base_dtype",
            self.base_dtype,
            "must be float32, float16 or bfloat16",
        )
        scale = self.guidance_scale
        _require(math.isfinite(scale) and scale >= 0, "guidance_scale", scale, "must be >= 0")
        _require(
            len(self.validation_timesteps) > 0
            and all(0 <= t < 1000 for t in self.validation_timesteps),
            "validation_timesteps",
            self.validation_timesteps,
            "must be a non-empty list of timesteps in [0, 1000)",
        )
        _require(
            self.validation_pairs_periodic > 0,
            "validation_pairs_periodic",
            self.validation_pairs_periodic,
            "must be > 0",
        )


@dataclass
class PolicyConfig:
    """What is trained: LoRA adapters on the UNet, or the whole UNet (method.md 1 and 3)."""

    mode: str = "lora"  # lora | full
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: equal to the rank
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_init: str = "gaussian"  # gaussian (as SPO's release) | default (peft's Kaiming/zero)
    # full mode: keep the frozen reference UNet in CPU memory, streamed to the device per call
    reference_offload: bool = False
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _require(self.mode in ("lora", "full"), "policy.mode", self.mode, "must be lora or full")
        _require(self.lora_rank > 0, "policy.lora_rank", self.lora_rank, "must be > 0")
        alpha = self.lora_alpha
        _require(alpha is None or alpha > 0, "policy.lora_alpha", alpha, "must be > 0 or null")
        _require(bool(self.lora_targets), "policy.lora_targets", self.lora_targets, "is empty")
        _require(
            self.lora_init in ("gaussian", "default"),
            "policy.lora_init",
            self.lora_init,
            "must be gaussian or default",
        )


@dataclass
class ValidationImagesConfig:
    """Fixed-seed samples of the policy during training (a PNG grid per validation)."""

    prompts: list[str] = field(default_factory=list)  # empty: no validation images
    prompts_file: str | None = None  # or the prompts of a txt / json / jsonl / parquet file
    images_per_prompt: int = 1
    every: int = 0  # optimiser steps between grids (0: only at the end)
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    # Score the validation images with each scorer and log the means as val/<name> (the name
    # before ':') with the training seconds: held-out scorers (toy_pickscore, pickscore:...,
    # hpsv2:...) against the training judge and, in the toy world, the oracle (the ground
    # truth: shown, never used for a decision). Empty: images only.
    scorers: list[str] = field(default_factory=list)
    # Keep best/ (the policy as final/ holds it, plus best.json) at the validation where this
    # scorer (a name in `scorers`, never the oracle) is highest so far, step 0 included.
    # null: no best/. Choose a scorer the run does not train on
    select_by: str | None = None
    # Stop training after this many validations in a row without a new best (needs
    # select_by); null: never stop early
    patience: int | None = None
    # Log val/chain_kl and val/chain_kl_total: the KL divergence of the policy's sampling
    # chain from the reference's on the validation prompts and seeds (DDIM eta 1, or the flow
    # SDE at noise level 0.7, num_inference_steps steps; method.md 3)
    chain_kl: bool = True

    def validate(self) -> None:
        for key in ("images_per_prompt", "num_inference_steps"):
            value = getattr(self, key)
            _require(value > 0, f"validation_images.{key}", value, "must be > 0")
        _require(self.every >= 0, "validation_images.every", self.every, "must be >= 0")
        scale = self.guidance_scale
        _require(scale >= 0, "validation_images.guidance_scale", scale, "must be >= 0")
        names = [scorer_name(s) for s in self.scorers]
        twice = sorted({n for n in names if names.count(n) > 1})
        _require(
            not twice,
            "validation_images.scorers",
            self.scorers,
            f"names {', '.join(twice)} more than once (one scorer per name)",
        )
        if self.select_by is not None:
            _require(
                not self.select_by.startswith("oracle"),  # the oracle, or a group's
                "validation_images.select_by",
                self.select_by,
                "is an oracle, the toy world's ground truth: it is reported, never used "
                "to choose (name a held-out scorer, e.g. toy_pickscore)",
            )
            _require(
                self.select_by in names,
                "validation_images.select_by",
                self.select_by,
                f"is not one of validation_images.scorers ({', '.join(names) or 'none'})",
            )
        if self.patience is not None:
            _require(self.patience > 0, "validation_images.patience", self.patience, "must be > 0")
            _require(
                self.select_by is not None,
                "validation_images.patience",
                self.patience,
                "needs validation_images.select_by (the scorer whose best it waits for)",
            )


def scorer_name(spec: str) -> str:
    """A scorer spec's name, `pickscore` of `pickscore:yuvalkirstain/PickScore_v1`: its
    metric is val/<name>."""
    return spec.partition(":")[0]


def _toy_validation() -> ValidationImagesConfig:
    """The trainers' default validation: two toy prompts at the toy world's CFG, scored by the
    held-out toy PickScore (which keeps best/) and the oracle (the ground truth, reported)."""
    return ValidationImagesConfig(
        prompts=list(TOY_VALIDATION_PROMPTS),
        guidance_scale=TOY_GUIDANCE,
        scorers=["toy_pickscore", "oracle"],
        select_by="toy_pickscore",
    )


COMPILE_MODES = ("none", "regional", "full")


@dataclass
class CompileConfig:
    """torch.compile of the trained denoiser (docs/benchmarks.md): the same math, float
    rounding aside (tests/test_compile.py bounds it), paid for by a compilation in the first
    steps (`spo benchmark` reports it apart). Off by default: on a CPU, and in short runs, the
    compilation costs more than it saves."""

    # none | regional: each repeated block (the family's `compile_blocks`: a UNet's attention
    # blocks, a transformer's blocks) compiled once for all its instances of one size,
    # seconds instead of minutes | full: the whole denoiser as one graph
    compile: str = "none"

    def validate(self) -> None:
        _require(
            self.compile in COMPILE_MODES,
            "speed.compile",
            self.compile,
            "must be " + ", ".join(COMPILE_MODES),
        )


@dataclass
class DPOTrainConfig:
    """`spo train-dpo`: the Diffusion-DPO baseline (method.md 1)."""

    # Keys of older versions that the command never read (and validation_images.scorer,
    # now `scorers`): dropped from a run folder's recorded config.yaml when it is resumed
    RETIRED: ClassVar[tuple[str, ...]] = (
        "pairs.validation",
        "pairs.validation_split",
        "pairs.max_validation_pairs",
        "pairs.relabel_tie_gap",
        "validation_images.scorer",
    )

    out: str = "runs/toy/dpo"  # run folder
    seed: int = 0
    base_model: str = "runs/toy/world/base_model"  # diffusers pipeline: SD1.5, SDXL, SD3, FLUX
    # The model family this config is written for (sd | sdxl | sd3 | flux): a base_model of
    # another family is refused before training; null: any
    model_family: str | None = None
    # Training image size; null: the model's own (its denoiser's sample size x the VAE factor;
    # FLUX, whose transformer has none: its pipeline's 1024)
    resolution: int | None = None
    vae: str | None = None  # replace the pipeline's VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    pairs: TrainPairsConfig = field(default_factory=TrainPairsConfig)
    # Relabel every pair with a scorer before training (the release's "choice model"):
    # none | oracle (toy world) | spm:<folder> (an SPM at t = 0) | pickscore:<model>
    relabel_with: str = "none"
    loss: str = "dpo"  # dpo | sft (plain MSE on the winners)
    beta: float = 2000.0  # the paper's SD1.5 value (SDXL: 5000, also the released code's default)
    beta_scale: float = 0.5  # inside = -beta_scale * beta * (...); 0.5 as released, 1.0 other
    prompt_dropout: float = 0.2  # probability of training a pair on the empty prompt
    random_crop: bool = False  # random (else centre) crop, the same for both images of a pair
    random_flip: bool = True  # horizontal flip, the same for both images of a pair
    # Encode every pair image once (both mirror images with random_flip) and train from the
    # cached VAE posteriors: the same latents as encoding each step, without the image
    # decoding and the VAE encoder in the loop. Off with random_crop. Without
    # latent_cache_dir: per run, in memory on every process, off past latent_cache_max_gb
    # (the size is printed first) and for streamed pairs.
    latent_cache: bool = True
    latent_cache_max_gb: float = 8.0
    # A folder for the cache on disk instead: any size, streamed pairs too, built once
    # (the size printed first; a killed build resumes) and reused by every later run with
    # the same VAE, resolution, mirroring and data (a subfolder per hash of those)
    latent_cache_dir: str | None = None
    # torch.compile of the trained denoiser (speed.compile: none | regional | full)
    speed: CompileConfig = field(default_factory=CompileConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    optimizer: str = "adamw"  # adamw | adafactor | adamw8bit (needs bitsandbytes)
    # How optim.lr becomes the learning rate, with E = batch_size x accumulation x processes:
    # none: optim.lr as it is; code: optim.lr x E (the released --scale_lr, 1e-8 -> 2.048e-5 at
    # E = 2048); paper: optim.lr x E x 2000 / beta (the paper's (2000 / beta) x 2.048e-8 at
    # E = 2048 when optim.lr = 1e-11).
    lr_scaling: str = "none"
    batch_size: int = 16  # pairs per process per micro-batch
    gradient_accumulation_steps: int = 1
    max_steps: int = 300  # optimiser steps
    max_minutes: float | None = None  # wall-clock budget of the training loop (None: no limit)
    mixed_precision: str | None = None  # no | fp16 | bf16; null: what accelerate launch says
    log_every: int = 10
    tracker: str = "none"
    validation_images: ValidationImagesConfig = field(default_factory=_toy_validation)
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2
    resume: str = "latest"  # latest (if any) | none | a checkpoint folder
    # Upload final/ (weights, model card, summary) once written to the Hub model repository
    # hub_model_id, with huggingface_hub's upload_folder (needs a token: `hf auth login`)
    push_to_hub: bool = False
    hub_model_id: str | None = None  # "namespace/name", or "name" in the token's namespace

    def validate(self) -> None:
        """Reject nonsensical values before any work starts (one-line ConfigError)."""
        _validate_loop(self)
        _validate_hub(self)
        self.pairs.validate()
        self.policy.validate()
        _require(self.loss in ("dpo", "sft"), "loss", self.loss, "must be dpo or sft")
        _validate_family(self.model_family)
        _validate_resolution(self.resolution)
        _require(math.isfinite(self.beta) and self.beta > 0, "beta", self.beta, "must be > 0")
        _require(self.beta_scale > 0, "beta_scale", self.beta_scale, "must be > 0")
        p = self.prompt_dropout
        _require(0 <= p < 1, "prompt_dropout", p, "must be in [0, 1)")
        gb = self.latent_cache_max_gb
        _require(math.isfinite(gb) and gb > 0, "latent_cache_max_gb", gb, "must be > 0")
        folder = self.latent_cache_dir
        _require(
            folder is None or bool(str(folder).strip()),
            "latent_cache_dir",
            folder,
            "must be a folder (or null: in memory)",
        )
        self.speed.validate()
        _require(
            self.optimizer in ("adamw", "adafactor", "adamw8bit"),
            "optimizer",
            self.optimizer,
            "must be adamw, adafactor or adamw8bit",
        )
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes")
        _require(
            self.lr_scaling in ("none", "code", "paper"),
            "lr_scaling",
            self.lr_scaling,
            "must be none, code or paper",
        )
        relabel = self.relabel_with
        _require(
            relabel in ("none", "oracle") or relabel.startswith(("spm:", "pickscore:")),
            "relabel_with",
            relabel,
            "must be none, oracle, spm:<folder> or pickscore:<model>",
        )
        if relabel != "none" and self.pairs.streams(self.pairs.train):
            raise ConfigError(
                f"relabel_with={relabel} relabels every pair before training, which needs the "
                "whole split: set pairs.streaming=false (read it whole) or relabel_with=none"
            )


def _validate_family(family: str | None) -> None:
    from spo.families import FAMILIES

    if family is not None and family not in FAMILIES:
        raise ConfigError(
            f"invalid value {family!r} in config key 'model_family': must be one of "
            f"{', '.join(FAMILIES)} (or null: any)"
        )


@dataclass
class SpeedConfig(CompileConfig):
    """SPO's speed-ups (docs/benchmarks.md measures each). The exact ones (the same math, float
    rounding aside) are on by default; the others change what is computed and are off."""

    # exact: a kept pair's win and lose transitions leave the same x_t, so the training step
    # makes ONE UNet call per network there instead of two (the released code makes two)
    share_start: bool = True
    # exact, GPU only: the VAE in channels_last memory format and cuDNN autotuning for decoding
    fast_decode: bool = True
    # exact, GPU only: torch.compile the VAE decoder (the first batches pay the compile time)
    compile_vae: bool = False
    # NOT exact: the SPM's dtype while judging candidates (float32 as released; bfloat16 /
    # float16 halve its cost and flip a few pair decisions, docs/benchmarks.md)
    judge_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        _require(
            self.judge_dtype in ("float32", "float16", "bfloat16"),
            "speed.judge_dtype",
            self.judge_dtype,
            "must be float32, float16 or bfloat16",
        )


@dataclass
class SamplerConfig:
    """SPO's step-wise pool sampler (method.md 3); defaults are the SD1.5 release."""

    num_steps: int = 20  # DDIM steps ("leading" spacing: 951, 901, ..., 1)
    eta: float = 1.0  # stochasticity: every step is a Gaussian policy (must be > 0)
    guidance_scale: float = 5.0
    k: int = 4  # candidates per trained step
    divert_step: int = 4  # ordinary steps before the first trained one (4: t <= 750 trained)
    threshold: float = 0.3  # keep a pair if softmax([s_w, s_l]) differ by more (SDXL: 0.4)
    # LPO's dynamic threshold (method.md 6): with a value, the required gap grows linearly with
    # the step's DDIM standard deviation from `threshold` (least noisy step) to this (most
    # noisy); None: `threshold` at every step
    threshold_max: float | None = None
    continuation: str = "random"  # random | win | lose (the paper's ablation)
    inner_steps: int = 0  # SDXL variant: 3 (each candidate takes 3 more steps before scoring)
    # flow models (SD3 / FLUX) only: the SDE step's noise level a (std_s = a sqrt(s / (1 - s)),
    # Flow-GRPO's 0.7; method.md 3); DDIM models use `eta` instead
    noise_level: float = 0.7

    def validate(self) -> None:
        _require(self.num_steps > 1, "sampler.num_steps", self.num_steps, "must be > 1")
        _require(
            0 < self.noise_level <= 1,
            "sampler.noise_level",
            self.noise_level,
            "must be in (0, 1] (the flow SDE's noise level)",
        )
        _require(self.eta > 0, "sampler.eta", self.eta, "must be > 0 (SPO needs a stochastic step)")
        _require(self.k >= 2, "sampler.k", self.k, "must be >= 2 (a pair needs two candidates)")
        _require(
            0 <= self.threshold < 1,
            "sampler.threshold",
            self.threshold,
            "must be in [0, 1) (a gap of softmax probabilities)",
        )
        top = self.threshold_max
        _require(
            top is None or self.threshold <= top < 1,
            "sampler.threshold_max",
            top,
            "must be in [sampler.threshold, 1) or null",
        )
        _require(
            self.continuation in ("random", "win", "lose"),
            "sampler.continuation",
            self.continuation,
            "must be random, win or lose",
        )
        _require(self.inner_steps >= 0, "sampler.inner_steps", self.inner_steps, "must be >= 0")
        trained = self.num_steps - self.divert_step
        _require(
            0 <= self.divert_step < self.num_steps,
            "sampler.divert_step",
            self.divert_step,
            f"must be in [0, {self.num_steps})",
        )
        _require(
            trained % (1 + self.inner_steps) == 0,
            "sampler.inner_steps",
            self.inner_steps,
            f"segments of {1 + self.inner_steps} steps must tile the {trained} trained steps",
        )


@dataclass
class SPOTrainConfig:
    """`spo train-spo`: step-aware preference optimisation (method.md 3)."""

    # A key of older versions (now validation_images.scorers): dropped from a run folder's
    # recorded config.yaml when it is resumed
    RETIRED: ClassVar[tuple[str, ...]] = ("validation_images.scorer",)

    out: str = "runs/toy/spo"  # run folder
    seed: int = 0
    base_model: str = "runs/toy/world/base_model"  # diffusers pipeline: SD1.5, SDXL, SD3, FLUX
    # The model family this config is written for (sd | sdxl | sd3 | flux): a base_model of
    # another family is refused before training; null: any
    model_family: str | None = None
    # Sampling size; null: the model's own (its denoiser's sample size x the VAE factor;
    # FLUX, whose transformer has none: its pipeline's 1024). The judge must be trained at it
    resolution: int | None = None
    vae: str | None = None
    spm: str = "runs/toy/spm/final"  # the step-aware judge's folder (same model family)
    # which judge `spm` holds: pixel (the SPM, judging decoded x0_hat) | latent (the latent
    # judge, judging each candidate latent with no decode, method.md 6)
    judge: str = "pixel"
    # prompts: a txt / json / jsonl / parquet file, a saved dataset or a hub dataset
    prompts: str = "runs/toy/world/prompts/train.txt"
    prompt_column: str = "caption"  # for json(l) objects, parquet and datasets
    prompt_split: str = "train"
    max_prompts: int | None = None  # only the first N prompts (None: all)
    # Group preferences: with `prompts` a pair table, only the prompts of these annotators'
    # pairs (each once); the group's own judge comes with `spm`
    prompt_annotators: AnnotatorsConfig = field(default_factory=AnnotatorsConfig)
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(lora_rank=4))
    # the release's sampler (k 4, t <= 750 trained, threshold 0.3) at the toy world's CFG 2.0
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(guidance_scale=TOY_GUIDANCE)
    )
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    beta: float = 10.0
    ratio_clip: float | None = 0.1  # clamp of the policy/reference ratio (None: the paper's form)
    # with sampler.inner_steps > 0: transitions (the release: each of a segment's transitions
    # its own pair with its own clamp) | chain (a segment's log-probabilities summed, one clamp)
    segment_pairs: str = "transitions"
    # prompts per process per sampling batch; the kept pairs of each sampling batch (all
    # processes) are trained on before the next one is sampled, as in the release
    sample_batch_size: int = 40
    max_epochs: int = 4  # sampling epochs over the prompts (the run also stops at max_steps)
    # lr 5e-4 (the SD1.5 release: 6e-5): 1e-3 peaks sooner, then over-optimises the toy SPM
    # (docs/benchmarks.md); no gradient clipping, which is what the released code does (its
    # clip is a no-op, method.md 3); optim.max_grad_norm=1.0 clips
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=1e-4, max_grad_norm=0.0)
    )
    # kept pairs per process per micro-batch; a sampling batch's last one may be smaller
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimiser steps
    max_minutes: float | None = None  # wall-clock budget, checked after every step
    mixed_precision: str | None = None  # no | fp16 | bf16; null: what accelerate launch says
    log_every: int = 5
    tracker: str = "none"
    validation_images: ValidationImagesConfig = field(default_factory=_toy_validation)
    checkpoint_every: int = 1  # epochs between resumable checkpoints (0: none)
    checkpoints_total_limit: int = 2
    resume: str = "latest"
    # Upload final/ (weights, model card, summary) once written to the Hub model repository
    # hub_model_id, with huggingface_hub's upload_folder (needs a token: `hf auth login`)
    push_to_hub: bool = False
    hub_model_id: str | None = None  # "namespace/name", or "name" in the token's namespace

    def validate(self) -> None:
        """Reject nonsensical values before any work starts (one-line ConfigError)."""
        _validate_loop(self)
        _validate_hub(self)
        self.policy.validate()
        self.sampler.validate()
        self.speed.validate()
        _validate_family(self.model_family)
        _validate_resolution(self.resolution)
        _require(self.judge in ("pixel", "latent"), "judge", self.judge, "must be pixel or latent")
        _require(
            self.segment_pairs in ("transitions", "chain"),
            "segment_pairs",
            self.segment_pairs,
            "must be transitions or chain",
        )
        _require(math.isfinite(self.beta) and self.beta > 0, "beta", self.beta, "must be > 0")
        clip = self.ratio_clip
        _require(clip is None or 0 < clip < 1, "ratio_clip", clip, "must be in (0, 1) or null")
        for key in ("sample_batch_size", "max_epochs"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        n = self.max_prompts
        _require(n is None or n > 0, "max_prompts", n, "must be > 0 or null (all)")
        self.prompt_annotators.validate("prompt_annotators")


@dataclass
class ModelSpec:
    """One model of a comparison: a pipeline, optionally with a LoRA or a replacement UNet."""

    name: str = "base"
    pipeline: str = "runs/toy/world/base_model"  # diffusers pipeline folder or hub name
    lora: str | None = None  # folder with pytorch_lora_weights.safetensors (or the file)
    unet: str | None = None  # a full fine-tune's unet/ folder


@dataclass
class EditConfig:
    """`spo compare task=edit`: SDEdit of source images (the Diffusion-DPO paper's editing
    experiment): each source is noised to `strength` and denoised by every model with its
    edit prompt, the same seeds for every model."""

    # a folder of images (png / jpg / webp, in name order) with a prompts file, or a parquet
    # file / saved or hub dataset with `image_column` and the comparison's `prompt_column`
    sources: str | None = "runs/toy/world/edit/layouts"
    # the folder's prompts, one line per image in name order; null: <sources>/prompts.txt
    prompts_file: str | None = None
    image_column: str = "image"
    strength: float = 0.6  # SDEdit's noise strength (the paper's 0.6): 1 is generation
    # fidelity to the source: 1 - the mean absolute difference of the two images' colours
    # averaged over `fidelity_blocks` x `fidelity_blocks` blocks (docs/evaluation.md)
    fidelity_blocks: int = 8

    def validate(self) -> None:
        s = self.strength
        _require(math.isfinite(s) and 0 < s <= 1, "edit.strength", s, "must be in (0, 1]")
        _require(self.sources is not None, "edit.sources", None, "is needed by task=edit")
        n = self.fidelity_blocks
        _require(n > 0, "edit.fidelity_blocks", n, "must be > 0")


@dataclass
class CompareConfig:
    """`spo compare`: generate with several models on the same prompts and seeds, score, report."""

    out: str = "runs/toy/compare"
    seed: int = 0  # image j of prompt i uses the seed derived from (seed, i, j) for every model
    # the toy demo's three: the base model, and it with the DPO and with the SPO LoRA
    models: list[ModelSpec] = field(
        default_factory=lambda: [
            ModelSpec(),
            ModelSpec(name="dpo", lora="runs/toy/dpo/final"),
            ModelSpec(name="spo", lora="runs/toy/spo/final"),
        ]
    )
    # the model every other is paired against (differences on the same prompt and seed);
    # null: the first of `models`
    base: str | None = None
    # a txt / json / jsonl / parquet file, a saved dataset or a hub dataset
    prompts: str = "runs/toy/world/prompts/eval.txt"
    prompt_column: str = "caption"
    prompt_split: str = "train"
    category_column: str | None = "category"  # per-category tables when the prompts have one
    max_prompts: int | None = None  # only the first N prompts
    images_per_prompt: int = 4
    num_inference_steps: int = 20  # method.md 4: DDIM, 20 steps (and CFG 5.0)
    guidance_scale: float = TOY_GUIDANCE  # the toy world's CFG (method.md 4: 5.0)
    batch_size: int = 32  # images per generation call
    dtype: str = "float32"  # float32 | float16 | bfloat16 for generation
    # the oracle (the toy world's ground truth) and the toy SPM at t = 0; see spo.evaluation.scorers
    scorers: list[str] = field(default_factory=lambda: ["oracle", "spm:runs/toy/spm/final"])
    bootstrap: int = 1000  # resamples of the prompts for the 95% intervals
    grid_prompts: int = 8  # prompts shown in the report's image grid
    # generate (from noise, with `prompts`) | edit (SDEdit of `edit.sources` with their own
    # prompts; `prompts` is not read)
    task: str = "generate"
    edit: EditConfig = field(default_factory=EditConfig)

    def validate(self) -> None:
        _require(bool(self.models), "models", self.models, "needs at least one model")
        _require(self.task in ("generate", "edit"), "task", self.task, "must be generate or edit")
        if self.task == "edit":
            self.edit.validate()
        names = [m.name for m in self.models]
        _require(len(set(names)) == len(names), "models", names, "names must be unique")
        for m in self.models:
            _require(
                bool(m.name) and "/" not in m.name and " vs " not in m.name,
                "models.name",
                m.name,
                "must be non-empty, without '/' or ' vs '",
            )
            _require(
                m.lora is None or m.unet is None, "models.lora", m.lora, "give a LoRA or a unet"
            )
        _require(
            self.base is None or self.base in names, "base", self.base, f"must be one of {names}"
        )
        for key in ("images_per_prompt", "num_inference_steps", "batch_size", "bootstrap"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        n = self.grid_prompts
        _require(n >= 0, "grid_prompts", n, "must be >= 0 (0: no image grid)")
        n = self.max_prompts
        _require(n is None or n > 0, "max_prompts", n, "must be > 0 or null (all)")
        _require(bool(self.scorers), "scorers", self.scorers, "needs at least one scorer")
        _require(
            self.dtype in ("float32", "float16", "bfloat16"),
            "dtype",
            self.dtype,
            "must be float32, float16 or bfloat16",
        )

    @property
    def base_model(self) -> str:
        """The name of the model the others are paired against."""
        return self.base if self.base is not None else self.models[0].name


@dataclass
class DemoConfig:
    """`spo demo`: the toy world end to end (world, SPM, DPO, SPO, comparison) on a CPU."""

    out: str = "runs/toy"  # root of the stage folders world/, spm/, dpo/, spo/, compare/
    quick: bool = False  # a minutes-long smoke run of every stage (`spo demo --quick`)
    # The compute budget given to DPO and to SPO alike: wall-clock minutes of training each
    # (validation sampling excluded), so the comparison is at equal compute.
    budget_minutes: float = 1.5
    # also the flow arm: a judge, DPO and SPO on the toy flow base model (a tiny SD3) at the
    # same budget, compared in compare_flow/ (about 9 minutes more)
    flow: bool = False
    # The SPM stage's precision: its frozen pipeline (which makes the judge's x0_hat inputs)
    # and its training autocast. auto: bfloat16 where the processor computes it natively
    # (AVX-512 BF16 / AMX, or a GPU with bf16), several times faster there, else float32;
    # float32: the toy spm config as shipped. NOT exact: the judge then learns from
    # bfloat16-rounded x0_hat (docs/benchmarks.md, the demo's stage times).
    spm_precision: str = "auto"
    # The SPM stage's optimiser steps (the toy spm config trains 250; 200 keeps the demo
    # within 10 minutes on 2 cores, docs/benchmarks.md says what it changes)
    spm_max_steps: int = 200

    def validate(self) -> None:
        _require(bool(str(self.out).strip()), "out", self.out, "must be a non-empty path")
        b = self.budget_minutes
        _require(math.isfinite(b) and b > 0, "budget_minutes", b, "must be > 0")
        _require(self.spm_max_steps >= 1, "spm_max_steps", self.spm_max_steps, "must be >= 1")
        choices = ("auto", "float32", "bfloat16")
        _require(
            self.spm_precision in choices,
            "spm_precision",
            self.spm_precision,
            "must be one of " + ", ".join(choices),
        )


@dataclass
class BenchmarkConfig:
    """`spo benchmark`: SPO's and DPO's pieces timed on randomly initialised models of a named
    architecture (nothing downloaded), optionally against the released code's structure."""

    out: str = "runs/benchmark"  # benchmark.json and benchmark.md
    # tiny (the toy world's architecture) | sd15 | sdxl (method.md 5) | tiny_flow (the toy flow
    # model's) | sd35m | flux (SPEC 8; their pass is the pipeline's Euler sampler, see
    # docs/benchmarks.md)
    preset: str = "tiny"
    # released: also run the released code's structure in the same process (the UNet twice per
    # network on a pair's shared x_t, fp32 judge, eager, no decode tuning); none: ours only
    baseline: str = "none"
    prompts: int = 10  # prompts of the sampling pass (its pairs are the training batches)
    num_steps: int = 20  # DDIM steps of the sampling pass
    repeats: int = 3  # timed repeats of each piece after one warm-up; the median is reported
    seed: int = 0
    dpo_modes: list[str] = field(default_factory=lambda: ["lora", "full"])  # DPO steps timed
    dpo_lora_batch: int = 8  # pairs per DPO LoRA step
    dpo_full_batch: int = 4  # pairs per DPO full fine-tune step
    # dense fp16/bf16 peak of the accelerator in TFLOP/s for the MFU (None: from the device
    # name, H100 / H200 989, A100 312; no MFU on a CPU)
    peak_tflops: float | None = None
    # trained models instead of random ones (e.g. the toy world's base model and SPM, to
    # measure how many pair decisions a half-precision judge flips on real candidates)
    pipeline: str | None = None  # a diffusers folder of the preset's family
    spm: str | None = None  # an SPM folder trained on that family
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # what "ours" runs with

    def validate(self) -> None:
        _require(bool(str(self.out).strip()), "out", self.out, "must be a non-empty path")
        presets = ("tiny", "sd15", "sdxl", "tiny_flow", "sd35m", "flux")  # spo.architectures
        _require(self.preset in presets, "preset", self.preset, "must be " + ", ".join(presets))
        _require(
            self.baseline in ("none", "released"),
            "baseline",
            self.baseline,
            "must be none or released",
        )
        for key in ("prompts", "repeats", "dpo_lora_batch", "dpo_full_batch"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        _require(self.num_steps > 1, "num_steps", self.num_steps, "must be > 1")
        _require(
            set(self.dpo_modes) <= {"lora", "full"},
            "dpo_modes",
            self.dpo_modes,
            "must be a list of lora and full",
        )
        peak = self.peak_tflops
        _require(
            peak is None or (math.isfinite(peak) and peak > 0), "peak_tflops", peak, "must be > 0"
        )
        self.speed.validate()


@dataclass
class PreparePromptsConfig:
    """`spo prepare-prompts`: draw unique training prompts from a dataset's captions."""

    # the text file written, one prompt a line (the SPO configs read data/pickapic_4k_prompts.txt)
    out: str = "data/pickapic_4k_prompts.txt"
    seed: int = 0  # the same seed and captions give the same prompts in the same order
    # where the captions come from: a hub dataset, parquet files (a file, a folder, a glob), a
    # save_to_disk folder, or a txt / json / jsonl prompt file; a dataset's images are never read
    source: str = "yuvalkirstain/pickapic_v1"
    split: str = "train"  # for hub datasets and folders with splits
    column: str = "caption"
    num_prompts: int = 4000  # the SPO paper drew 4000 from Pick-a-Pic v1 train

    def validate(self) -> None:
        """Reject nonsensical values before any work starts (one-line ConfigError)."""
        _require(bool(str(self.out).strip()), "out", self.out, "must be a non-empty path")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _require(bool(self.source.strip()), "source", self.source, "must name a dataset or file")
        _require(self.num_prompts > 0, "num_prompts", self.num_prompts, "must be > 0")


# Command name -> config schema. The CLI loads `--config`/overrides into this type.
COMMAND_CONFIGS: dict[str, type] = {
    "toy-world": ToyWorldConfig,
    "train-preference-model": SPMTrainConfig,
    "train-dpo": DPOTrainConfig,
    "train-spo": SPOTrainConfig,
    "compare": CompareConfig,
    "demo": DemoConfig,
    "benchmark": BenchmarkConfig,
    "prepare-prompts": PreparePromptsConfig,
}

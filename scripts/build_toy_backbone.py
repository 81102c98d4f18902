"""Build the toy world's stand-in for PickScore: a tiny open_clip CLIP ViT, trained on CPU.

The real SPM starts from PickScore_v1, a CLIP fine-tuned on human preferences. The toy world
needs the same kind of starting point, so this script makes one in two stages:

1. contrastive pretraining on (render, caption) pairs of the TRAIN prompts, with a multi-positive
   CLIP loss (only 80 captions, so a batch repeats them);
2. PickScore's fine-tuning on annotator-labelled pairs of the TRAIN prompts: the two scores of a
   pair form a 2-way softmax, cross-entropy against the soft labels (ties kept), each example
   weighted 1 / examples-per-prompt; plus 0.1 x stage 1's loss on the same images, without
   which the backbone forgets what the prompts mean (see `stage2_preference`).

Both stages run for a wall-clock budget (the learning-rate schedule follows the elapsed fraction
of it), so the result depends slightly on the machine's speed. The report compares pairwise
accuracy on held-out EVAL-prompt pairs with the oracle ceiling and measures zero-shot recognition.

Writes preference_model/toy_backbone/{open_clip_config.json, open_clip_model.safetensors,
build_report.json}. Usage: python scripts/build_toy_backbone.py [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from preference_model.model import StepAwarePreferenceModel
from preference_model.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from spo.toy.annotator import labelled_pairs
from spo.toy.render import Prompt, all_prompts, render, split_prompts

OUT_DIR = Path(__file__).resolve().parents[1] / "preference_model" / "toy_backbone"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
REPORT_NAME = "build_report.json"
CONTEXT_LENGTH = 16
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
    },
}
ANNOTATOR_TAU, ANNOTATOR_DELTA = 0.05, 0.03


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------- inputs


_MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def to_pixels(images: np.ndarray | Tensor, flip: Tensor | None = None) -> Tensor:
    """uint8 (N, H, W, 3) -> normalised (N, 3, H, W), as `StepAwarePreferenceModel.preprocess`.

    `flip` (bool, (N,)) mirrors those images left-right: every toy shape is mirror-symmetric
    and the oracle's terms do not care about left and right, so it is a label-free augmentation.
    """
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return (x - _MEAN) / _STD


class TextCache:
    """Token ids of each caption, computed once (the tokenizer is the slow part for 16 tokens)."""

    def __init__(self) -> None:
        self.tokenizer = open_clip.SimpleTokenizer(context_length=CONTEXT_LENGTH)
        self.ids: dict[str, Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if missing:
            self.ids.update(zip(missing, self.tokenizer(missing), strict=True))
        return torch.stack([self.ids[c] for c in captions])


def build_model(seed: int) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**MODEL_CFG)


def text_features_for(model: open_clip.CLIP, tokens: TextCache, captions: list[str]) -> Tensor:
    """Normalised text features of `captions`, each distinct caption encoded once."""
    unique = list(dict.fromkeys(captions))
    feats = F.normalize(model.encode_text(tokens(unique)), dim=-1)
    index = {c: i for i, c in enumerate(unique)}
    return feats[torch.tensor([index[c] for c in captions])]


def pair_scores(model: open_clip.CLIP, pixels: Tensor, text: Tensor) -> Tensor:
    """exp(logit_scale) * cos(image_i, text_i), (N,): the score the SPM gives at t = 0."""
    image = F.normalize(model.encode_image(pixels), dim=-1)
    return model.logit_scale.exp() * (image * text).sum(dim=-1)


# --------------------------------------------------------------------------------- training


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with open_clip's split: no decay on gains, biases and the logit scale."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(progress: float, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first `warmup` of the budget, then cosine decay to 0."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def run_budgeted(
    name: str,
    model: open_clip.CLIP,
    step: Callable[[int], dict[str, Tensor | float]],
    minutes: float,
    lr: float,
    weight_decay: float,
) -> dict[str, float]:
    """Call `step(i)` (forward, returns {'loss': tensor, ...}) until the budget is spent.

    The learning rate follows the elapsed fraction of the budget, so a slower machine does
    fewer steps of the same schedule instead of running over time.
    """
    optimizer = make_optimizer(model, lr, weight_decay)
    budget = minutes * 60.0
    start = last_print = time.monotonic()
    i, running = 0, Counter[str]()
    model.train()
    while (elapsed := time.monotonic() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(elapsed / budget, lr)
        stats = step(i)
        optimizer.zero_grad(set_to_none=True)
        stats["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running.update(
            {k: float(v.detach() if isinstance(v, Tensor) else v) for k, v in stats.items()}
        )
        running["n"] += 1
        i += 1
        if time.monotonic() - last_print > 30:
            last_print = time.monotonic()
            means = " ".join(f"{k} {v / running['n']:.4f}" for k, v in running.items() if k != "n")
            log(
                f"[{name}] step {i} {elapsed / 60:.1f}/{minutes:g} min "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {means} "
                f"logit_scale {model.logit_scale.exp().item():.1f}"
            )
            running = Counter()
    model.eval()
    return {"steps": i, "seconds": round(time.monotonic() - start, 1)}


def multi_positive_clip_loss(
    image: Tensor, text: Tensor, scale: Tensor, caption_ids: Tensor
) -> Tensor:
    """Symmetric CLIP loss whose target is uniform over the items sharing the caption."""
    logits = scale * image @ text.T
    same = (caption_ids[:, None] == caption_ids[None]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    i2t = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2


def stage1_contrastive(
    model: open_clip.CLIP,
    prompts: list[Prompt],
    tokens: TextCache,
    minutes: float,
    lr: float,
    batch: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Contrastive pretraining on fresh renders (quality ~ U(0, 1)) of `prompts`."""

    def step(_: int) -> dict[str, Tensor | float]:
        chosen = rng.integers(len(prompts), size=batch)
        images = np.stack([render(prompts[k], rng.uniform(), rng) for k in chosen])
        pixels = to_pixels(images, torch.from_numpy(rng.random(batch) < 0.5))
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = text_features_for(model, tokens, [prompts[k].text for k in chosen])
        ids = torch.from_numpy(chosen)
        loss = multi_positive_clip_loss(image, text, model.logit_scale.exp(), ids)
        return {"loss": loss}

    return run_budgeted("stage 1", model, step, minutes, lr, weight_decay=0.1)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def make_pairs(prompts: list[Prompt], n: int, rng: np.random.Generator) -> dict[str, Any]:
    """n annotator-labelled pairs as arrays: images uint8 (n, H, W, 3) x 2, labels, rewards."""
    rows = list(labelled_pairs(prompts, n, ANNOTATOR_TAU, ANNOTATOR_DELTA, rng))
    return {
        "caption": [r["caption"] for r in rows],
        "image_0": torch.from_numpy(np.stack([decode_png(r["jpg_0"]) for r in rows])),
        "image_1": torch.from_numpy(np.stack([decode_png(r["jpg_1"]) for r in rows])),
        "label_0": torch.tensor([r["label_0"] for r in rows]),
        "reward_0": np.array([r["reward_0"] for r in rows]),
        "reward_1": np.array([r["reward_1"] for r in rows]),
    }


def stage2_preference(
    model: open_clip.CLIP,
    pairs: dict[str, Any],
    tokens: TextCache,
    minutes: float,
    lr: float,
    batch: int,
    clip_weight: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """PickScore's fine-tuning: 2-way softmax over the pair's scores vs the soft labels.

    Both images of a toy pair always show the prompted colour, shape and background, so these
    pairs say nothing about alignment and the fine-tuning alone forgets it (measured: colour
    recognition 100% -> 56%). `clip_weight` > 0 adds stage 1's contrastive loss on the same
    batch, which keeps the backbone a text-image matcher, as PickScore (fine-tuned on pairs of
    different pictures, from a large CLIP) is.
    """
    counts = Counter(pairs["caption"])
    weights = torch.tensor([1.0 / counts[c] for c in pairs["caption"]])
    labels = torch.stack([pairs["label_0"], 1 - pairs["label_0"]], dim=1)
    n = len(pairs["caption"])
    caption_ids = torch.tensor([sorted(counts).index(c) for c in pairs["caption"]])

    def epochs() -> Iterator[Tensor]:
        while True:
            order = torch.from_numpy(rng.permutation(n))
            yield from order[: n - n % batch].split(batch)

    batches = epochs()

    def step(_: int) -> dict[str, Tensor | float]:
        idx = next(batches)
        images = torch.cat([pairs["image_0"][idx], pairs["image_1"][idx]])
        pixels = to_pixels(images, torch.from_numpy(rng.random(2 * len(idx)) < 0.5))
        captions = [pairs["caption"][k] for k in idx.tolist()]
        text = text_features_for(model, tokens, captions)
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text2, scale = torch.cat([text, text]), model.logit_scale.exp()
        scores = (scale * (image * text2).sum(dim=-1)).view(2, -1).T
        ce = -(labels[idx] * scores.log_softmax(dim=1)).sum(dim=1)
        w = weights[idx]
        preference = (w * ce).sum() / w.sum()
        stats = {"preference": preference}
        loss = preference
        if clip_weight > 0:
            ids = caption_ids[idx].repeat(2)
            stats["clip"] = multi_positive_clip_loss(image, text2, scale, ids)
            loss = loss + clip_weight * stats["clip"]
        decided = labels[idx, 0] != 0.5
        right = ((scores[:, 0] > scores[:, 1]) == (labels[idx, 0] == 1))[decided]
        return {"loss": loss, **stats, "acc": right.float().mean() if right.numel() else 0.0}

    return run_budgeted("stage 2", model, step, minutes, lr, weight_decay=0.1)


# --------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def score_pairs(
    score: Callable[[Tensor, list[str]], Tensor], pairs: dict[str, Any], chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """Scores of both images of every pair, by `score(uint8 images, captions)`."""
    s0, s1 = [], []
    for k in range(0, len(pairs["caption"]), chunk):
        captions = pairs["caption"][k : k + chunk]
        s0.append(score(pairs["image_0"][k : k + chunk], captions))
        s1.append(score(pairs["image_1"][k : k + chunk], captions))
    return torch.cat(s0), torch.cat(s1)


def pairwise_report(s0: Tensor, s1: Tensor, pairs: dict[str, Any]) -> dict[str, float]:
    """Accuracy on non-tie pairs of the scores and of the oracle reward (the ceiling)."""
    label = pairs["label_0"].numpy()
    decided = label != 0.5
    model_pick = (s0 > s1).numpy()
    oracle_pick = pairs["reward_0"] > pairs["reward_1"]
    return {
        "pairs": len(label),
        "non_tie_pairs": int(decided.sum()),
        "accuracy": float(np.mean(model_pick[decided] == (label[decided] == 1))),
        "oracle_ceiling": float(np.mean(oracle_pick[decided] == (label[decided] == 1))),
    }


@torch.no_grad()
def recognition_report(
    model: open_clip.CLIP, tokens: TextCache, prompts: list[Prompt], n: int, seed: int
) -> dict[str, float]:
    """Zero-shot recognition on clean renders (q ~ U(0.7, 1)) of `prompts`.

    Each render is matched against all 96 toy prompts; the argmax prompt's colour, shape and
    background are checked one by one (and all together).
    """
    rng = np.random.default_rng(seed)
    candidates = all_prompts()
    text = text_features_for(model, tokens, [p.text for p in candidates])
    truth = [prompts[k] for k in rng.integers(len(prompts), size=n)]
    images = np.stack([render(p, rng.uniform(0.7, 1.0), rng) for p in truth])
    image = F.normalize(model.encode_image(to_pixels(images)), dim=-1)
    guess = [candidates[k] for k in (image @ text.T).argmax(dim=1).tolist()]
    pairs = list(zip(guess, truth, strict=True))
    return {
        "renders": n,
        "colour_right": float(np.mean([g.colour == t.colour for g, t in pairs])),
        "shape_right": float(np.mean([g.shape == t.shape for g, t in pairs])),
        "background_right": float(np.mean([g.background == t.background for g, t in pairs])),
        "prompt_right": float(np.mean([g == t for g, t in pairs])),
    }


# --------------------------------------------------------------------------------- saving


def save_backbone(model: open_clip.CLIP, folder: Path) -> None:
    """open_clip config JSON + fp16 state dict with open_clip's key names."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": MODEL_CFG,
        "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / WEIGHTS_NAME).chmod(0o644)  # save_file leaves it owner-only; it ships in the wheel


def check_saved(folder: Path, model_score: Tensor, pairs: dict[str, Any]) -> float:
    """Reload through the SPM loader; return the largest score difference at t = 0."""
    spm = StepAwarePreferenceModel.from_open_clip(folder / CONFIG_NAME, folder / WEIGHTS_NAME)
    spm.eval()
    images = pairs["image_0"].permute(0, 3, 1, 2).float() / 255.0
    spm_score = spm.score(images, pairs["caption"], 0)
    return float((spm_score - model_score).abs().max())


# --------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage1-minutes", type=float, default=6.0)
    ap.add_argument("--stage2-minutes", type=float, default=5.5)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-lr", type=float, default=5e-4)
    ap.add_argument("--stage1-batch", type=int, default=128, help="renders per step")
    ap.add_argument("--stage2-batch", type=int, default=64, help="pairs per step")
    ap.add_argument(
        "--stage2-clip-weight",
        type=float,
        default=0.1,
        help="weight of the contrastive loss kept in stage 2 (0: PickScore's loss alone)",
    )
    ap.add_argument("--train-pairs", type=int, default=12000)
    ap.add_argument("--eval-pairs", type=int, default=500)
    ap.add_argument("--recognition-renders", type=int, default=480)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.monotonic()
    train_prompts, eval_prompts = split_prompts()
    tokens = TextCache()
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}

    model = build_model(args.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    report["stage1"] = stage1_contrastive(
        model,
        train_prompts,
        tokens,
        args.stage1_minutes,
        args.stage1_lr,
        args.stage1_batch,
        np.random.default_rng([args.seed, 1]),
    )
    log(f"stage 1 done: {report['stage1']}")

    rng = np.random.default_rng([args.seed, 2])
    start = time.monotonic()
    train_pairs = make_pairs(train_prompts, args.train_pairs, rng)
    eval_pairs = make_pairs(eval_prompts, args.eval_pairs, np.random.default_rng([args.seed, 3]))
    pair_seconds = time.monotonic() - start
    report["pair_generation_seconds"] = round(pair_seconds, 1)
    log(f"pairs: {args.train_pairs} train, {args.eval_pairs} eval in {pair_seconds:.0f}s")

    def score(images: Tensor, captions: list[str]) -> Tensor:
        text = text_features_for(model, tokens, captions)
        return pair_scores(model, to_pixels(images), text)

    recognition_seed = args.seed + 1000
    after1 = pairwise_report(*score_pairs(score, eval_pairs), eval_pairs)
    after1["recognition"] = recognition_report(
        model, tokens, eval_prompts, args.recognition_renders, recognition_seed
    )
    report["after_stage1"] = after1
    log(f"after stage 1: {json.dumps(after1)}")

    report["stage2"] = stage2_preference(
        model,
        train_pairs,
        tokens,
        args.stage2_minutes,
        args.stage2_lr,
        args.stage2_batch,
        args.stage2_clip_weight,
        np.random.default_rng([args.seed, 4]),
    )
    log(f"stage 2 done: {report['stage2']}")
    s0, s1 = score_pairs(score, eval_pairs)
    final = pairwise_report(s0, s1, eval_pairs)
    seen = {k: v[:1000] for k, v in train_pairs.items()}  # a sample: scoring all takes minutes
    final["train_pairs_first_1000"] = pairwise_report(*score_pairs(score, seen), seen)
    final["recognition"] = recognition_report(
        model, tokens, eval_prompts, args.recognition_renders, recognition_seed
    )
    report["final"] = final

    save_backbone(model, args.out)
    report["reload_max_abs_score_diff"] = check_saved(args.out, s0, eval_pairs)
    report["files_bytes"] = {n: (args.out / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)}
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    (args.out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

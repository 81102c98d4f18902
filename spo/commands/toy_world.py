"""`spo toy-world`: write the toy world that every toy config reads.

OUT/base_model/               the shipped tiny StableDiffusionPipeline, in float32
OUT/flow_base_model/          the shipped tiny StableDiffusion3Pipeline (rectified flow), float32
OUT/prompts/{train,eval}.txt  eval holds colour/shape/background combinations never in train
OUT/pairs/{train,validation}.parquet  Pick-a-Pic schema; validation pairs use the eval prompts
OUT/pairs/groups_{train,validation}.parquet  the two-group world: pairs of renders at random
                              object scales, each labelled by both annotator groups (the group
                              in `user_id`): one likes large objects, the other small ones
OUT/edit/layouts/             colour layouts of the eval prompts (PNGs + prompts.txt): the
                              sources of the editing comparison (SDEdit)
OUT/base_samples.png          a grid of base samples on eval prompts with their oracle rewards
OUT/flow_base_samples.png     the same for the flow base model
OUT/world.json                pair statistics and both base models' reports (recognition rates,
                              aesthetic quartiles next to those of renders)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from spo.config import ToyWorldConfig
from spo.families import family_of
from spo.runs import RunDir, atomic_dir, atomic_write_bytes, prepare_run_dir
from spo.toy.annotator import group_labelled_pairs, labelled_pairs
from spo.toy.base_model import BASE_MODEL_DIR, load_base_pipeline
from spo.toy.flow_base_model import FLOW_BASE_MODEL_DIR
from spo.toy.oracle import GROUPS, WEIGHTS, OracleReport, evaluate, recognition_rates
from spo.toy.render import Prompt, colour_layout, render, split_prompts

AESTHETIC_TERMS = ("sharpness", "clean", "framing", "contrast")


def aesthetic_score(report: OracleReport) -> float:
    """The aesthetic part of R rescaled to [0, 1] (alignment terms left out)."""
    return report.aesthetic / sum(WEIGHTS[k] for k in AESTHETIC_TERMS)


@torch.no_grad()
def generate(
    pipe, texts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int = 64
) -> np.ndarray:
    """uint8 images (N, H, W, 3); image i depends only on (texts[i], seeds[i]). The pipeline
    is called as the toolkit samples it (its family's `pipeline_kwargs`: the flow base's T5
    length)."""
    extra = family_of(pipe).pipeline_kwargs()
    out = []
    for i in range(0, len(texts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        imgs = pipe(
            texts[i : i + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
            **extra,
        ).images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def _write_pairs(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _pair_stats(rows: list[dict]) -> dict[str, float]:
    labels = np.array([r["label_0"] for r in rows])
    diff = np.array([r["reward_0"] - r["reward_1"] for r in rows])
    decided = labels != 0.5
    agree = (labels[decided] == 1.0) == (diff[decided] > 0)
    return {
        "pairs": len(rows),
        "tie_share": float(1 - decided.mean()),
        "label_agrees_with_oracle": float(agree.mean()),
    }


def base_model_report(
    pipe, cfg: ToyWorldConfig, images_per_prompt: int = 4
) -> tuple[dict, np.ndarray, list[str]]:
    """Recognition rates and aesthetic quartiles of base samples on every eval prompt, next to the
    aesthetic quartiles of renders at quality 0.2 and 0.8 (the spread the base should cover)."""
    _, eval_prompts = split_prompts()
    texts = [p.text for p in eval_prompts for _ in range(images_per_prompt)]
    seeds = [cfg.seed * 100_000 + i for i in range(len(texts))]
    imgs = generate(pipe, texts, seeds, cfg.num_inference_steps, cfg.guidance_scale)
    reps = [evaluate(im, t) for im, t in zip(imgs, texts, strict=True)]
    prompts = [Prompt.parse(t) for t in texts]
    rng = np.random.default_rng(cfg.seed + 7)
    render_aes = {
        str(q): np.percentile(
            [
                aesthetic_score(evaluate(render(p, q, rng), p))
                for p in eval_prompts
                for _ in range(8)
            ],
            [25, 50, 75],
        ).tolist()
        for q in (0.2, 0.8)
    }
    report = {
        "samples": len(texts),
        **recognition_rates(reps, prompts),
        "mean_reward": float(np.mean([r.reward for r in reps])),
        "aesthetic_quartiles": np.percentile(
            [aesthetic_score(r) for r in reps], [25, 50, 75]
        ).tolist(),
        "render_aesthetic_quartiles": render_aes,
    }
    return report, imgs, texts


def save_grid(path: Path, images: np.ndarray, texts: list[str], cols: int) -> None:
    """A PNG grid, one prompt a row, each image titled with its oracle reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(images) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 2.6, 1.7 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"R={evaluate(images[i], texts[i]).reward:.2f}", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel(texts[i].removeprefix("a ").replace(" on a ", "\non "), fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run(cfg: ToyWorldConfig) -> int:
    """`spo toy-world`: the run folder first (fails fast), then the world."""
    build_world(cfg, prepare_run_dir(cfg.out, cfg, metrics=True))
    return 0


def base_model_in_float32():
    """The shipped base model with every component in float32: its files are stored in fp16 to
    keep the repository small, and a plain `from_pretrained` without a dtype would load the
    text encoder in its stored fp16 beside a float32 UNet, which fails at the first prompt."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(BASE_MODEL_DIR), dtype=torch.float32)


def flow_base_model_in_float32():
    """The shipped flow base model in float32 (stored in fp16, like the UNet base)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(FLOW_BASE_MODEL_DIR), dtype=torch.float32)


def write_group_pairs(root: Path, cfg: ToyWorldConfig) -> None:
    """pairs/groups_{train,validation}.parquet: the two-group world's pairs (train prompts,
    and the eval prompts for validation), each labelled by every annotator group."""
    train_prompts, eval_prompts = split_prompts()
    for split, prompts, n, offset in (
        ("train", train_prompts, cfg.group_pairs, 3),
        ("validation", eval_prompts, cfg.group_validation_pairs, 4),
    ):
        rng = np.random.default_rng([cfg.seed, offset])
        pairs = group_labelled_pairs(prompts, n, cfg.annotator_tau, cfg.tie_delta, rng)
        rows = list(tqdm(pairs, total=len(GROUPS) * n, desc=f"pairs/groups_{split}"))
        _write_pairs(root / "pairs" / f"groups_{split}.parquet", rows)


def write_layouts(root: Path, prompts: list, seed: int, per_prompt: int) -> Path:
    """edit/layouts/: `per_prompt` colour layouts of each eval prompt as PNGs (name order is
    prompt order) with prompts.txt, one line per image: the sources of the editing
    comparison (`spo compare --config toy/compare_edit`)."""
    rng = np.random.default_rng([seed, 2])
    with atomic_dir(root / "edit" / "layouts") as tmp:
        lines = []
        for i, prompt in enumerate(p for p in prompts for _ in range(per_prompt)):
            Image.fromarray(colour_layout(prompt, rng)).save(tmp / f"{i:03d}.png")
            lines.append(prompt.text + "\n")
        (tmp / "prompts.txt").write_text("".join(lines))
    return root / "edit" / "layouts"


def build_world(cfg: ToyWorldConfig, run: RunDir) -> None:
    """Write every part of the toy world into run.root (see the module docstring)."""
    for folder, script in (
        (BASE_MODEL_DIR, "build_toy_base_model.py"),
        (FLOW_BASE_MODEL_DIR, "build_toy_flow_model.py"),
    ):
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"the shipped toy base model is missing from {folder}; "
                f"rebuild it with `python scripts/{script}`"
            )
    root = run.root
    with atomic_dir(root / "base_model") as tmp:  # float32 throughout (shipped: fp16)
        base_model_in_float32().save_pretrained(tmp)
    with atomic_dir(root / "flow_base_model") as tmp:
        flow_base_model_in_float32().save_pretrained(tmp)

    train_prompts, eval_prompts = split_prompts()
    (root / "prompts").mkdir(exist_ok=True)
    for name, prompts in (("train", train_prompts), ("eval", eval_prompts)):
        atomic_write_bytes(
            root / "prompts" / f"{name}.txt", "".join(p.text + "\n" for p in prompts).encode()
        )

    (root / "pairs").mkdir(exist_ok=True)
    stats = {}
    for split, prompts, n, offset in (
        ("train", train_prompts, cfg.train_pairs, 0),
        ("validation", eval_prompts, cfg.validation_pairs, 1),
    ):
        rng = np.random.default_rng([cfg.seed, offset])
        rows = list(
            tqdm(
                labelled_pairs(prompts, n, cfg.annotator_tau, cfg.tie_delta, rng),
                total=n,
                desc=f"pairs/{split}",
            )
        )
        _write_pairs(root / "pairs" / f"{split}.parquet", rows)
        stats[split] = _pair_stats(rows)
        run.log_metrics(0, **{f"{split}/{k}": v for k, v in stats[split].items()})

    write_group_pairs(root, cfg)
    write_layouts(root, eval_prompts, cfg.seed, cfg.layouts_per_prompt)
    pipe = load_base_pipeline(root / "base_model")
    report, imgs, texts = base_model_report(pipe, cfg, cfg.grid_images_per_prompt)
    run.log_metrics(0, **{f"base/{k}": v for k, v in report.items() if isinstance(v, float)})
    per = cfg.grid_images_per_prompt
    shown = min(cfg.grid_prompts, len(eval_prompts)) * per
    save_grid(root / "base_samples.png", imgs[:shown], texts[:shown], per)
    summary = {"pairs": stats, "base_model": report}
    if cfg.flow_base_report:
        flow = flow_base_model_in_float32()
        flow.set_progress_bar_config(disable=True)
        flow_report, imgs, texts = base_model_report(flow, cfg, cfg.grid_images_per_prompt)
        run.log_metrics(
            0, **{f"flow_base/{k}": v for k, v in flow_report.items() if isinstance(v, float)}
        )
        save_grid(root / "flow_base_samples.png", imgs[:shown], texts[:shown], per)
        summary["flow_base_model"] = flow_report
    atomic_write_bytes(root / "world.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    print(f"toy world written to {root}")

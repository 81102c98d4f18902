"""`spo compare`: the same prompts and seeds through several models, scored by several scorers;
with `task=edit`, the same source images edited (SDEdit) by every model, scored by the scorers
and by their fidelity to the source.

Every model, LoRA, UNet folder, prompt file and scorer is loaded and checked before the first
image is generated, so a wrong path fails in seconds with one line. Images are written to
OUT/images/<model>/ as PNGs and reused, so an interrupted run resumes where it stopped and
re-scoring never regenerates. Image j of prompt i gets the same seed for every model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from spo.config import CompareConfig, ModelSpec
from spo.data import load_prompts
from spo.errors import ConfigError
from spo.evaluation import provenance
from spo.evaluation.editing import EditSources, block_colour_fidelity, load_edit_sources
from spo.evaluation.report import SOURCE, write_report
from spo.evaluation.scorers import build_scorer, check_scorer
from spo.evaluation.stats import format_ci, mean_ci, paired_difference_ci, win_rate_ci
from spo.families import family_class
from spo.models import DTYPES, DiffusionModel, describe_pipeline_folder
from spo.runs import (
    RunLock,
    atomic_write_bytes,
    check_writable,
    made_by,
    prepare_run_dir,
    require_model,
)

_UNET_KEYS = ("in_channels", "out_channels", "sample_size", "cross_attention_dim")


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image j of prompt i: the same for every compared model."""
    return seed * 1_000_003 + prompt_index * 1000 + image_index


def check_models(cfg: CompareConfig) -> None:
    """The cheap checks of every compared model, before any is loaded: its pipeline folder,
    LoRA and UNet exist."""
    for spec in cfg.models:
        require_model(spec.pipeline, f"model '{spec.name}' pipeline")
        if spec.lora is not None and not Path(spec.lora).exists():
            path = Path(spec.lora)
            raise ConfigError(f"model '{spec.name}': LoRA not found: {path}" + _hint(path))
        if spec.lora is not None:
            _check_lora_family(spec)
        if spec.unet is not None and not (Path(spec.unet) / "config.json").is_file():
            path = Path(spec.unet)
            raise ConfigError(f"model '{spec.name}': no UNet folder at {path}" + _hint(path))


def load_model(spec: ModelSpec, dtype: torch.dtype, device: str) -> DiffusionModel:
    """The pipeline of `spec` with its LoRA or UNet in place; one line if they do not fit.
    That they exist is `check_models`'s, run first."""
    from diffusers import UNet2DConditionModel

    model = DiffusionModel.from_pretrained(
        spec.pipeline, dtype=dtype, device=device, what=f"model '{spec.name}' pipeline"
    )
    if spec.lora is not None:
        path = Path(spec.lora)
        try:
            with _diffusers_errors_only():  # its "No LoRA keys ... CLIPTextModel" notice
                model.pipe.load_lora_weights(str(path))
        except Exception as e:  # diffusers / peft raise many kinds on a mismatch
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"model '{spec.name}': LoRA {path} does not fit pipeline {spec.pipeline}: {first}"
            ) from e
        _check_lora_fits(spec, path, model)
    if spec.unet is not None:
        path = Path(spec.unet)
        unet = UNet2DConditionModel.from_pretrained(str(path), dtype=dtype)
        for key in _UNET_KEYS:
            if unet.config.get(key) != model.unet.config.get(key):
                raise ConfigError(
                    f"model '{spec.name}': UNet {path} has {key}={unet.config.get(key)}, "
                    f"pipeline {spec.pipeline} has {model.unet.config.get(key)}"
                )
        model.pipe.unet = model.unet = unet.to(device).eval()
    return model


@contextlib.contextmanager
def _diffusers_errors_only() -> Iterator[None]:
    """diffusers' warnings silenced: a UNet-only LoRA loads with a notice that it has no text
    encoder weights, once per load (twice per model: checked, then generating). Whether the
    LoRA fits is `_check_lora_fits`'s to say."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _lora_file(path: Path) -> Path:
    return path if path.is_file() else path / "pytorch_lora_weights.safetensors"


def _trained_family(folder: Path) -> str | None:
    """The model family recorded in the `policy.json` this toolkit writes beside its LoRA
    (SD3 and FLUX adapters are both `transformer.` weights; only the record tells them apart)."""
    try:
        return json.loads((folder / "policy.json").read_text(encoding="utf-8")).get("family")
    except (OSError, ValueError, AttributeError):
        return None


def _check_lora_family(spec: ModelSpec) -> None:
    """One line, before any model loads, for a LoRA of another model family than its pipeline
    (a flow transformer's adapters on a UNet pipeline, or the reverse): the component its
    weights are named after (`unet.`, `transformer.`) against the pipeline family's denoiser,
    and the family in the LoRA's `policy.json` where there is one."""
    from safetensors import safe_open

    facts = describe_pipeline_folder(spec.pipeline)
    file = _lora_file(Path(spec.lora))
    if facts is None or not file.is_file():
        return
    with safe_open(str(file), framework="pt") as f:
        components = {key.split(".")[0] for key in f.keys()}
    trained = _trained_family(file.parent)
    if trained is not None and trained != facts["family"]:
        raise ConfigError(
            f"model '{spec.name}': LoRA {spec.lora} was trained on a {trained} model, but "
            f"pipeline {spec.pipeline} is a {facts['family']} model: a LoRA of another family"
        )
    denoiser = family_class(facts["family"]).denoiser
    if components and denoiser not in components:
        raise ConfigError(
            f"model '{spec.name}': LoRA {spec.lora} adapts a {'/'.join(sorted(components))}, "
            f"but pipeline {spec.pipeline} is a {facts['family']} model whose denoiser is its "
            f"{denoiser}: a LoRA of another model family"
        )


def _check_lora_fits(spec: ModelSpec, path: Path, model: DiffusionModel) -> None:
    """diffusers loads a LoRA whose layers are partly absent with a warning only: count the
    adapter tensors that arrived against those in the file."""
    from safetensors import safe_open

    file = _lora_file(path)
    with safe_open(str(file), framework="pt") as f:
        prefix = f"{model.family_module.denoiser}."
        expected = sum(1 for k in f.keys() if k.startswith(prefix) and "lora" in k)
    loaded = sum(1 for name, _ in model.unet.named_parameters() if "lora_" in name)
    if loaded < expected or expected == 0:
        raise ConfigError(
            f"model '{spec.name}': LoRA {path} does not fit pipeline {spec.pipeline} "
            f"({loaded} of its {expected} adapter weights found a layer)"
        )


def _hint(path: Path) -> str:
    command = made_by(path)
    return f" (`{command}` writes it)" if command else ""


FIDELITY = "fidelity"  # the editing task's extra column: block-colour fidelity to the source


@dataclass
class Prompts:
    texts: list[str]
    categories: list[str] | None
    sources: EditSources | None = None  # task=edit: the images the prompts edit


def load_prompt_set(cfg: CompareConfig) -> Prompts:
    """The prompts and, when the source has `category_column`, their categories; for
    task=edit, the edit sources (every image decoded) and their prompts."""
    if cfg.task == "edit":
        sources = load_edit_sources(cfg.edit, cfg.prompt_column, cfg.prompt_split)
        if cfg.max_prompts is not None:
            n = cfg.max_prompts
            sources = EditSources(sources.images[:n], sources.prompts[:n], sources.names[:n])
        return Prompts(sources.prompts, None, sources)
    texts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.prompt_split, made_by(cfg.prompts))
    categories = None
    if cfg.category_column:
        try:
            categories = load_prompts(
                cfg.prompts,
                cfg.category_column,
                cfg.prompt_split,
                made_by(cfg.prompts),
                strict_column=True,
            )
        except ConfigError:
            categories = None  # no such column / key: no per-category tables
        if categories is not None and len(categories) != len(texts):
            categories = None
    if cfg.max_prompts is not None:
        texts = texts[: cfg.max_prompts]
        categories = categories[: cfg.max_prompts] if categories else None
    return Prompts(texts, categories)


def _image_path(out: Path, model: str, i: int, j: int) -> Path:
    return out / "images" / model / f"p{i:05d}_s{j}.png"


def _file_digest(path: Path) -> str:
    """sha256 of a small file (a LoRA), size and mtime of a large one (a UNet)."""
    if path.stat().st_size <= 512 * 2**20:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def fingerprint(cfg: CompareConfig, spec: ModelSpec, prompts: Prompts) -> dict:
    """What a model's cached images depend on: when it changes, they are generated again."""
    weights = {}
    for key in ("lora", "unet"):
        value = getattr(spec, key)
        if value is not None:
            files = [Path(value)] if Path(value).is_file() else sorted(Path(value).rglob("*"))
            weights[key] = {str(f): _file_digest(f) for f in files if f.is_file()}
    stamp = {
        "pipeline": spec.pipeline,
        "weights": weights,
        "prompts": hashlib.sha256("\n".join(prompts.texts).encode()).hexdigest(),
        "seed": cfg.seed,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "dtype": cfg.dtype,
    }
    if prompts.sources is not None:
        digest = hashlib.sha256()
        for image in prompts.sources.images:
            digest.update(image.tobytes())
        stamp |= {"task": "edit", "strength": cfg.edit.strength, "sources": digest.hexdigest()}
    return stamp


def generate_all(cfg: CompareConfig, prompts: Prompts, device: str) -> None:
    """Generate every missing image of every model (models one at a time, in batches).
    A model whose weights or generation settings changed since its images were made has
    them made again."""
    out = Path(cfg.out)
    jobs = [(i, j) for i in range(len(prompts.texts)) for j in range(cfg.images_per_prompt)]
    for spec in cfg.models:
        folder = out / "images" / spec.name
        stamp = folder / "fingerprint.json"
        current = fingerprint(cfg, spec, prompts)
        if folder.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != current):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stamp, json.dumps(current, indent=2).encode())
        todo = [(i, j) for i, j in jobs if not _image_path(out, spec.name, i, j).is_file()]
        if not todo:
            continue
        model = load_model(spec, DTYPES[cfg.dtype], device)
        sources = prompts.sources.pixels(model.resolution) if prompts.sources else None
        verb = "edit" if sources is not None else "generate"
        bar = tqdm(total=len(todo), desc=f"{verb} {spec.name}")
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            texts = [prompts.texts[i] for i, _ in chunk]
            seeds = [image_seed(cfg.seed, i, j) for i, j in chunk]
            if sources is None:
                images = model.generate(
                    texts, seeds, cfg.num_inference_steps, cfg.guidance_scale, cfg.batch_size
                )
            else:
                images = model.edit(
                    texts,
                    sources[[i for i, _ in chunk]],
                    seeds,
                    cfg.edit.strength,
                    cfg.num_inference_steps,
                    cfg.guidance_scale,
                    cfg.batch_size,
                )
            for (i, j), image in zip(chunk, images, strict=True):
                _save_png(_image_path(out, spec.name, i, j), image)
            bar.update(len(chunk))
        bar.close()
        del model


def _save_png(path: Path, image: torch.Tensor) -> None:
    """An image (3, H, W) in [0, 1] as an 8-bit PNG, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def write_sources(cfg: CompareConfig, prompts: Prompts, size: int) -> torch.Tensor:
    """The edit sources at the edited images' size, (N, 3, size, size), also written where
    the report's samples read them (a row beside the models'; one per image column)."""
    pixels = prompts.sources.pixels(size)
    for i in range(len(prompts.texts)):
        for j in range(cfg.images_per_prompt):
            _save_png(_image_path(Path(cfg.out), SOURCE, i, j), pixels[i])
    return pixels


def _load_images(out: Path, model: str, n_prompts: int, per_prompt: int) -> torch.Tensor:
    arrays = [
        np.asarray(Image.open(_image_path(out, model, i, j)).convert("RGB"))
        for i in range(n_prompts)
        for j in range(per_prompt)
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def score_all(cfg: CompareConfig, prompts: Prompts, scorers: dict, batch: int = 64) -> dict:
    """scores[scorer][model] = array (prompts, images per prompt); task=edit adds
    scores["fidelity"], each edit's block-colour fidelity to its source."""
    out, n, per = Path(cfg.out), len(prompts.texts), cfg.images_per_prompt
    texts = [t for t in prompts.texts for _ in range(per)]
    result: dict[str, dict[str, np.ndarray]] = {name: {} for name in scorers}
    source = None  # task=edit: the sources at the edited images' size, one row per image
    if prompts.sources is not None:
        result[FIDELITY] = {}
    for spec in cfg.models:
        images = _load_images(out, spec.name, n, per)
        for name, scorer in scorers.items():
            values = [
                scorer(images[s : s + batch], texts[s : s + batch]).float().numpy()
                for s in tqdm(range(0, len(texts), batch), desc=f"score {spec.name} {name}")
            ]
            result[name][spec.name] = np.concatenate(values).astype(np.float64).reshape(n, per)
        if prompts.sources is not None:
            if source is None:
                source = write_sources(cfg, prompts, images.shape[-1]).repeat_interleave(per, 0)
            fidelity = block_colour_fidelity(images, source, cfg.edit.fidelity_blocks)
            result[FIDELITY][spec.name] = fidelity.double().numpy().reshape(n, per)
    return result


def statistics(cfg: CompareConfig, prompts: Prompts, scores: dict) -> dict:
    """results.json's content: means with intervals, each model's paired difference to the
    base, pairwise win rates, per-category means."""
    names = [m.name for m in cfg.models]
    base = cfg.base_model
    results: dict = {"scores": {m: {} for m in names}, "paired_differences": {}, "win_rates": {}}
    for scorer, by_model in scores.items():
        for m in names:
            results["scores"][m][scorer] = mean_ci(by_model[m], cfg.bootstrap, seed=cfg.seed)
        results["paired_differences"][scorer] = {
            m: paired_difference_ci(by_model[m], by_model[base]) for m in names if m != base
        }
        results["win_rates"][scorer] = {
            f"{a} vs {b}": win_rate_ci(by_model[a], by_model[b], cfg.bootstrap, seed=cfg.seed)
            for a in names
            for b in names
            if a != b
        }
    if prompts.categories:
        cats = np.array(prompts.categories)
        results["by_category"] = {
            str(c): {
                m: {
                    scorer: mean_ci(by_model[m][cats == c], cfg.bootstrap, seed=cfg.seed)
                    for scorer, by_model in scores.items()
                }
                for m in names
            }
            for c in sorted(set(prompts.categories))
        }
    results["settings"] = {
        "prompts": len(prompts.texts),
        "images_per_prompt": cfg.images_per_prompt,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scorers": list(scores),
        "seed": cfg.seed,
        "base": base,
        "task": cfg.task,
    }
    if prompts.sources is not None:
        results["settings"] |= {
            "strength": cfg.edit.strength,
            "fidelity_blocks": cfg.edit.fidelity_blocks,
            "sources": cfg.edit.sources,
        }
    return results


def run(cfg: CompareConfig) -> int:
    """`spo compare`: compare, print each model's means."""
    results = run_compare(cfg)
    for model, by_scorer in results["scores"].items():
        cells = ", ".join(f"{s} {format_ci(v)}" for s, v in by_scorer.items())
        print(f"{model}: {cells}")
    print(f"report: {cfg.out}/report.html (and report.md, results.json, provenance.json)")
    return 0


def run_compare(cfg: CompareConfig) -> dict:
    """Check everything, generate what is missing, score, and write the report."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = load_prompt_set(cfg)
    for spec in cfg.scorers:
        check_scorer(spec, prompts.texts)
    check_models(cfg)
    check_writable(cfg.out)
    scorers = {spec: build_scorer(spec, device=device) for spec in cfg.scorers}
    for spec in cfg.models:  # every model must load (and its LoRA / UNet fit) before generating
        load_model(spec, DTYPES[cfg.dtype], "cpu")
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {cfg.out}: {e.strerror}") from e
    lock = RunLock(cfg.out)
    lock.acquire()
    try:
        return _compare(cfg, prompts, scorers, device)
    finally:
        lock.release()


def _compare(cfg: CompareConfig, prompts: Prompts, scorers: dict, device: str) -> dict:
    """Generate what is missing, score, write the results and the report (the run folder
    locked)."""
    run = prepare_run_dir(cfg.out, cfg)
    generate_all(cfg, prompts, device)
    scores = score_all(cfg, prompts, scorers)
    results = statistics(cfg, prompts, scores)
    atomic_write_bytes(run.root / "results.json", json.dumps(results, indent=2).encode())
    per_image = {"prompts": prompts.texts, "images_per_prompt": cfg.images_per_prompt}
    per_image["scores"] = {s: {m: a.tolist() for m, a in by.items()} for s, by in scores.items()}
    atomic_write_bytes(run.root / "scores.json", json.dumps(per_image).encode())
    origin = provenance.collect(cfg, device)
    atomic_write_bytes(run.root / "provenance.json", json.dumps(origin, indent=2).encode())
    write_report(cfg, prompts.texts, results, origin)
    return results

"""`spo toy-world` end to end (small counts) and the shipped base model in stock diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from spo.cli import main
from spo.toy.base_model import BASE_MODEL_DIR, vae_round_trip
from spo.toy.flow_base_model import FLOW_BASE_MODEL_DIR
from spo.toy.oracle import evaluate

pytestmark = pytest.mark.skipif(
    not (BASE_MODEL_DIR / "model_index.json").exists(), reason="toy base model not built"
)


def test_stock_diffusers_loads_base_model_and_samples_64px(tmp_path):
    """No import of this project: plain diffusers, DDIM, 20 steps, on CPU."""
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(BASE_MODEL_DIR)!r},
                                                       dtype=torch.float32)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        out = pipe(["a red circle on a white background"] * 2, num_inference_steps=20,
                   guidance_scale=5.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert "spo" not in sys.modules
        print(out.shape, float(out.std()))
    """)
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    shape, std = res.stdout.strip().rsplit(" ", 1)
    assert shape == "(2, 64, 64, 3)"
    assert float(std) > 0.05  # an image, not a flat colour


def test_toy_world_writes_every_part(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "world"
    code = main(
        [
            "toy-world",
            "--out",
            str(out),
            "train_pairs=40",
            "validation_pairs=12",
            "grid_prompts=2",
            "grid_images_per_prompt=2",
            "group_pairs=6",
            "group_validation_pairs=4",
        ]
    )
    assert code == 0
    for rel in (
        "base_model/model_index.json",
        "flow_base_model/model_index.json",
        "flow_base_samples.png",
        "prompts/train.txt",
        "prompts/eval.txt",
        "pairs/train.parquet",
        "pairs/validation.parquet",
        "base_samples.png",
        "world.json",
        "config.yaml",
        "metrics.jsonl",
    ):
        assert (out / rel).is_file(), rel
    train = (out / "prompts/train.txt").read_text().splitlines()
    held_out = (out / "prompts/eval.txt").read_text().splitlines()
    # the two-group world: every pair labelled by both groups, the group in user_id
    groups = pq.read_table(out / "pairs/groups_train.parquet").to_pylist()
    assert [r["user_id"] for r in groups] == ["large", "small"] * 6
    assert all(
        a["jpg_0"] == b["jpg_0"] and a["pair"] == b["pair"]
        for a, b in zip(groups[::2], groups[1::2], strict=True)
    )
    assert pq.read_table(out / "pairs/groups_validation.parquet").num_rows == 8
    # the editing sources: two colour layouts of each eval prompt, prompts in name order
    layouts = out / "edit/layouts"
    assert len(list(layouts.glob("*.png"))) == 2 * len(held_out) == 32
    edit_prompts = (layouts / "prompts.txt").read_text().splitlines()
    assert edit_prompts == [p for p in held_out for _ in range(2)]
    assert len(held_out) == 16 and not set(train) & set(held_out)

    ds = datasets.load_dataset(
        "parquet",
        data_files={
            "train": str(out / "pairs/train.parquet"),
            "validation": str(out / "pairs/validation.parquet"),
        },
    )
    assert ds["train"].num_rows == 40 and ds["validation"].num_rows == 12
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(ds["train"].column_names)
    for split, prompts in (("train", train), ("validation", held_out)):
        rows = ds[split]
        assert set(rows["label_0"]) <= {0.0, 0.5, 1.0}
        assert np.allclose(np.array(rows["label_0"]) + np.array(rows["label_1"]), 1.0)
        assert set(rows["caption"]) <= set(prompts)
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(ds["train"][0]["jpg_0"])).size == (64, 64)
    # plain diffusers, no dtype: every component in one dtype, so it samples (issue: the text
    # encoder came in its stored fp16 beside a float32 UNet, "mat1 and mat2 ... Half and Float")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "base_model"))
    dtypes = {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}
    assert dtypes == {torch.float32}
    image = pipe("a red circle on a white background", num_inference_steps=2, output_type="np")
    assert image.images.shape == (1, 64, 64, 3)
    summary = json.loads((out / "world.json").read_text())
    base = summary["base_model"]
    assert base["samples"] == 16 * 2
    assert 0.0 <= base["colour_right"] <= 1.0 and 0.0 <= base["mean_reward"] <= 1.0
    flow = summary["flow_base_model"]
    assert flow["samples"] == 16 * 2 and 0.0 <= flow["shape_right"] <= 1.0
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(out / "flow_base_model"))
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}


def test_stock_diffusers_loads_the_flow_base_model_and_samples_64px(tmp_path):
    """The shipped flow base (issue 22): plain StableDiffusion3Pipeline, its own Euler
    scheduler and default T5 length, no import of this project; the images are the oracle's
    objects (colour recognised in most)."""
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline.from_pretrained({str(FLOW_BASE_MODEL_DIR)!r},
                                                        dtype=torch.float32)
        out = pipe(["a red circle on a white background"] * 4, num_inference_steps=20,
                   guidance_scale=2.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert "spo" not in sys.modules
        import numpy as np
        np.save("images.npy", (out * 255).round().astype(np.uint8))
    """)
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (4, 64, 64, 3)
    seen = [evaluate(im, "a red circle on a white background").seen_colour for im in images]
    assert seen.count("red") >= 3


def test_oracle_survives_the_shipped_vae_round_trip():
    """R still orders renders by hidden quality after encode/decode, and the VAE keeps colour
    and background of clean renders."""
    import torch
    from diffusers import AutoencoderKL
    from scipy.stats import spearmanr

    from spo.toy.oracle import evaluate, recognition_rates
    from spo.toy.render import all_prompts, render

    vae = AutoencoderKL.from_pretrained(BASE_MODEL_DIR / "vae", dtype=torch.float32)
    rng = np.random.default_rng(11)
    prompts = [all_prompts()[i] for i in rng.integers(96, size=200)]
    qs = rng.uniform(size=200)
    imgs = np.stack([render(p, q, rng) for p, q in zip(prompts, qs, strict=True)])
    rec = vae_round_trip(vae, imgs)
    reports = [evaluate(im, p) for im, p in zip(rec, prompts, strict=True)]
    assert spearmanr(qs, [r.reward for r in reports]).correlation >= 0.8
    clean = qs >= 0.5
    rates = recognition_rates(
        [r for r, c in zip(reports, clean, strict=True) if c],
        [p for p, c in zip(prompts, clean, strict=True) if c],
    )
    assert rates["colour_right"] >= 0.95 and rates["background_right"] >= 0.95, rates

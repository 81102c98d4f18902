"""Diffusion-DPO: the loss against hand values, the recipe on SD and SDXL families, outputs
that stock diffusers loads, exact resume, and one-line failures on bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_resume_is_exact, one_error_line, stock_lora_change
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_sdxl

from spo.cli import main
from spo.data import load_pair_table
from spo.losses import dpo_loss, per_sample_mse, sft_loss, spo_loss
from spo.toy.base_model import BASE_MODEL_DIR

ROOT = Path(__file__).parents[1]


def _args(world: Path, out: Path, *extra: str, base: Path | None = None) -> list[str]:
    return [
        "train-dpo",
        "--config",
        str(ROOT / "configs/toy/dpo.yaml"),
        "--out",
        str(out),
        f"base_model={base or world / 'base_model'}",
        f"pairs.train={world / 'pairs/train.parquet'}",
        "batch_size=2",
        "max_steps=4",
        "log_every=2",
        "checkpoint_every=2",
        "optim.warmup_steps=0",
        "validation_images.prompts=[]",
        *extra,
    ]


# ------------------------------------------------------------------------------ math


def test_dpo_loss_hand_value_and_ln2_at_init():
    target = torch.zeros(4, 1, 1, 2)
    # winners (rows 0, 1) then losers (rows 2, 3); per-sample MSE = mean of squares
    model = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0], [1.0, 1.0]]).view(4, 1, 1, 2)
    ref = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]).view(4, 1, 1, 2)
    # m = [1, 2, 2, 1], r = [1, 1, 1, 1]: model_diff = [-1, 1], ref_diff = [0, 0]
    out = dpo_loss(model, ref, target, beta=2.0, beta_scale=0.5)
    inside = torch.tensor([1.0, -1.0])  # -0.5 * 2 * (model_diff - ref_diff)
    expected = -torch.nn.functional.logsigmoid(inside).mean()
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-6)
    assert torch.equal(out.inside, inside)
    assert out.implicit_acc.item() == 0.5
    assert out.model_mse.item() == 1.5 and out.ref_mse.item() == 1.0
    full = dpo_loss(model, ref, target, beta=2.0, beta_scale=1.0)
    assert torch.equal(full.inside, 2 * inside)

    same = dpo_loss(ref * 0.3, ref * 0.3, target, beta=5000.0)
    assert math.isclose(same.loss.item(), math.log(2), rel_tol=1e-7)
    assert same.implicit_acc.item() == 0.5  # inside == 0 counts one half

    assert sft_loss(model, target).item() == pytest.approx(1.5)
    assert torch.equal(per_sample_mse(model, target), torch.tensor([1.0, 2.0, 2.0, 1.0]))


def test_spo_loss_ln2_at_init_and_clamp():
    logp = torch.tensor([-1.2, 0.3])
    loss, rw, rl, clipped = spo_loss(logp, logp, logp - 1, logp - 1, beta=10.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-7)
    assert torch.equal(rw, torch.ones(2)) and torch.equal(rl, torch.ones(2))
    assert clipped.item() == 0
    # ratio_w = e^0.5 -> clamped to 1.1, ratio_l = e^-0.05 stays
    loss, rw, rl, clipped = spo_loss(
        torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([-0.05]), torch.tensor([0.0])
    )
    assert rw.item() == pytest.approx(1.1) and rl.item() == pytest.approx(math.exp(-0.05))
    assert clipped.item() == 0.5
    expected = -torch.nn.functional.logsigmoid(torch.tensor(10 * math.log(1.1) + 10 * 0.05))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain, *_ = spo_loss(
        torch.tensor([0.5]),
        torch.tensor([0.0]),
        torch.tensor([-0.05]),
        torch.tensor([0.0]),
        clip=None,
    )
    assert plain.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(5.5)).item())


# ------------------------------------------------------------------------------ recipe


def test_lora_result_loads_in_stock_diffusers_and_changes_images(mini_world, tmp_path):
    out = tmp_path / "dpo"
    args = _args(mini_world, out, "max_steps=3", base=BASE_MODEL_DIR)
    assert main([*args, "optim.lr=0.05"]) == 0
    lora = out / "final/pytorch_lora_weights.safetensors"
    assert lora.is_file() and json.loads((out / "final/policy.json").read_text())["mode"] == "lora"
    change = stock_lora_change(
        BASE_MODEL_DIR, out / "final", "a red circle on a white background", 5
    )
    assert change > 1e-3


def test_full_fine_tune_unet_loads_with_from_pretrained(mini_world, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "full"
    assert main(_args(mini_world, out, "policy.mode=full", "max_steps=2", "optim.lr=1e-3")) == 0
    unet = UNet2DConditionModel.from_pretrained(out / "final/unet")
    base = UNet2DConditionModel.from_pretrained(mini_world / "base_model/unet")
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed  # trained, and saved in diffusers' own layout
    card = (out / "final/README.md").read_text()
    assert f'UNet2DConditionModel.from_pretrained("{out / "final"}", subfolder="unet")' in card
    assert "# Diffusion-DPO UNet for" in card and "LoRA" not in card


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sdxl_family_trains(mini_world, tmp_path, mode):
    base = build_tiny_sdxl(tmp_path / "sdxl")
    out = tmp_path / mode
    assert main(_args(mini_world, out, f"policy.mode={mode}", "max_steps=2", base=base)) == 0
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["family"] == "sdxl" and summary["step"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)


def test_killed_run_resumes_to_the_same_weights(mini_world, tmp_path):
    def run(out):
        return main(_args(mini_world, out))

    assert_resume_is_exact(
        run, tmp_path / "straight", tmp_path / "killed", "pytorch_lora_weights.safetensors"
    )


def test_bad_input_fails_with_one_line(mini_world, tmp_path, capsys, monkeypatch):
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    ties = tmp_path / "ties.parquet"
    table.map(lambda r: {"label_0": 0.5, "label_1": 0.5}).to_parquet(str(ties))
    capsys.readouterr()
    assert main(_args(mini_world, tmp_path / "a", f"pairs.train={ties}")) == 2
    assert "no usable pair (48 pairs, all ties" in one_error_line(capsys)

    no_jpg = tmp_path / "no_jpg.parquet"
    table.remove_columns("jpg_1").to_parquet(str(no_jpg))
    capsys.readouterr()
    assert main(_args(mini_world, tmp_path / "b", f"pairs.train={no_jpg}")) == 2
    assert "missing column 'jpg_1'" in one_error_line(capsys)

    full = tmp_path / "full_run"
    assert main(_args(mini_world, full, "policy.mode=full", "max_steps=3")) == 0
    capsys.readouterr()
    resume = full / "checkpoints/step-2"
    assert main(_args(mini_world, tmp_path / "c", f"resume={resume}")) == 2
    assert "cannot resume a lora run" in one_error_line(capsys)

    from spo.commands import train_dpo as dpo

    real = dpo.dpo_loss

    def nan_at_step_3(*args, **kwargs):
        out = real(*args, **kwargs)
        nan_at_step_3.calls += 1
        if nan_at_step_3.calls >= 3:
            out.loss = out.loss * float("nan")
        return out

    nan_at_step_3.calls = 0
    monkeypatch.setattr(dpo, "dpo_loss", nan_at_step_3)
    bad = tmp_path / "nan"
    assert main(_args(mini_world, bad, "checkpoint_every=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the error
    assert [x for x in err if "error" in x] == err[-1:]
    assert "non-finite DPO loss at step 2" in err[-1]
    assert "last good checkpoint is" in err[-1] and "(step 2)" in err[-1]
    assert not (bad / "final/pytorch_lora_weights.safetensors").exists()
    written = sorted(p.name for p in (bad / "checkpoints").glob("step-*"))
    assert written == ["step-1", "step-2"]  # nothing saved by the stop itself
    monkeypatch.setattr(dpo, "dpo_loss", real)
    assert main(_args(mini_world, bad, "checkpoint_every=1")) == 0  # resumes from step 2
    assert "resumed from" in capsys.readouterr().out


def test_ai_feedback_relabelling_with_the_oracle(mini_world, tmp_path):
    """relabel_with=oracle: every pair labelled by the oracle's order (the toy's "choice
    model"), so the ties the annotator drew disappear."""
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    ties = sum(1 for x in table["label_0"] if x == 0.5)
    assert ties > 0
    out = tmp_path / "relabelled"
    assert main(_args(mini_world, out, "relabel_with=oracle", "max_steps=1")) == 0
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["ties_dropped"] == 0 and summary["pairs"] == 48


def test_latent_cache_draws_the_latents_of_the_uncached_step(mini_world):
    """The cached posterior moments give, with the same generator, the latents that encoding
    the step's pixels gives (equal up to the VAE's float rounding), mirror images and the
    winner-first swap included."""
    from spo.data import PairDataset
    from spo.latent_cache import LatentCache
    from spo.models import DiffusionModel

    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    labels = np.array([[1.0, 0.0] if i % 2 else [0.0, 1.0] for i in range(len(table))])
    dataset = PairDataset(
        table, model.resolution, labels, winner_first=True, random_flip=True, seed=3
    )
    cache = LatentCache(model, dataset, batch_size=5)
    rows = [0, 3, 4, 7, 10, 11]
    (mean, std), captions, skipped = cache.batch(dataset, rows)
    batch = PairDataset.collate([dataset[i] for i in rows])
    assert skipped == 0 and captions == batch.captions
    assert {dataset.augmentation(i)[1] for i in rows} == {False, True}  # both mirrors used
    pixels = torch.cat([batch.pixels[:, 0], batch.pixels[:, 1]])
    uncached = model.encode_images(pixels, generator=torch.Generator().manual_seed(5))
    cached = model.sample_latents(
        torch.cat([mean[:, 0], mean[:, 1]]),
        torch.cat([std[:, 0], std[:, 1]]),
        torch.Generator().manual_seed(5),
    )
    assert torch.allclose(cached, uncached, atol=1e-5, rtol=0)


def test_latent_cache_trains_what_the_uncached_run_trains(mini_world, tmp_path, capsys):
    runs = {}
    for on in (True, False):
        out = tmp_path / f"cache_{on}"
        assert main(_args(mini_world, out, f"latent_cache={str(on).lower()}")) == 0
        runs[on] = load_file(out / "final/pytorch_lora_weights.safetensors")
    said = capsys.readouterr().out
    assert re.search(r"latent cache: \d+ pairs \(2 images x 2 mirror\(s\) per pair", said)
    for key, value in runs[True].items():
        assert torch.allclose(value, runs[False][key], atol=1e-5, rtol=1e-3), key
    assert main(_args(mini_world, tmp_path / "tight", "latent_cache_max_gb=1e-9")) == 0
    assert "latent cache: off" in capsys.readouterr().out

"""SPO: the pool sampler's batching, the loss at initialisation, the recipe on SD and SDXL
families, outputs that stock diffusers loads, exact resume and one-line failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_resume_is_exact, one_error_line, spo_args, stock_lora_change
from tiny_pipelines import build_tiny_sdxl

import preference_model
import spo.commands.train_spo
from spo.cli import main
from spo.config import PolicyConfig, SamplerConfig
from spo.losses import spo_loss
from spo.models import DiffusionModel
from spo.policy import Policy
from spo.pool_sampler import PoolSampler, chain_log_probs

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_spm(mini_world, tmp_path_factory) -> Path:
    """An SPM trained for two steps on the mini world (its family: the tiny SD pipeline)."""
    out = tmp_path_factory.mktemp("spm")
    args = [
        "train-preference-model",
        "--config",
        str(ROOT / "configs/toy/spm.yaml"),
        "--out",
        str(out),
        f"base_model={mini_world / 'base_model'}",
        f"pairs.train={mini_world / 'pairs/train.parquet'}",
        f"pairs.validation={mini_world / 'pairs/validation.parquet'}",
        f"backbone.model={mini_world / 'clip.json'}",
        "batch_size=4",
        "max_steps=2",
        "validation_timesteps=[0]",
    ]
    assert main(args) == 0
    return out / "final"


_args = spo_args


def _judge(images, prompts, t):
    # A stand-in SPM: brighter is better (no model needed to exercise the sampler).
    return images.mean(dim=(1, 2, 3))


def test_one_unet_call_per_step_for_all_candidates(mini_world):
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    calls = []
    model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    settings = SamplerConfig(num_steps=20, k=4, divert_step=4, threshold=0.0)
    sampler = PoolSampler(model, _judge, settings)
    pairs, stats = sampler.sample(model.unet, ["a red circle"], torch.Generator().manual_seed(0))
    # 20 steps, 20 UNet calls: 4 ordinary + 1 for x_751 (each 2 rows: cond + uncond), then
    # one call per trained step for all 4 candidates (8 rows); the last step's candidates are
    # clean samples, judged at t = 0 without a UNet call.
    assert len(calls) == 20
    assert calls == [2] * 5 + [8] * 15
    assert len(pairs) == 16  # threshold 0: one pair per trained step
    assert pairs.timesteps[:, 0].tolist() == list(range(751, 0, -50))
    assert pairs.timesteps[-1, 1].item() == -1  # the final clean sample
    assert stats["kept_share"] == 1.0


def test_fresh_lora_gives_ln2_and_unit_ratios(mini_world):
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    policy = Policy(model, PolicyConfig(mode="lora", lora_rank=4))
    settings = SamplerConfig(num_steps=6, k=2, divert_step=2, threshold=0.0)
    sampler = PoolSampler(model, _judge, settings)
    pairs, _ = sampler.sample(
        model.unet, ["a red circle", "a cat"], torch.Generator().manual_seed(1)
    )
    assert len(pairs) > 0
    args = {"schedule": sampler.schedule}
    with torch.no_grad():
        logp_w, logp_l = chain_log_probs(model, policy.unet, pairs, **args)
        with policy.reference() as ref:
            ref_w, ref_l = chain_log_probs(model, ref, pairs, **args)
    loss, ratio_w, ratio_l, clipped = spo_loss(logp_w, ref_w, logp_l, ref_l)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.allclose(ratio_w, torch.ones_like(ratio_w))
    assert torch.allclose(ratio_l, torch.ones_like(ratio_l))
    assert clipped.item() == 0


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_shared_start_gives_the_released_log_probs_and_gradients(mini_world, inner_steps):
    """One UNet call on a pair's shared x_t (speed.share_start) against the released two:
    equal log-probabilities and gradients, and half the UNet rows in the first transition."""
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    policy = Policy(model, PolicyConfig(mode="lora", lora_rank=4))
    with torch.no_grad():  # move the adapters off zero so that gradients are not trivial
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    settings = SamplerConfig(
        num_steps=6, k=2, divert_step=2, threshold=0.0, inner_steps=inner_steps
    )
    sampler = PoolSampler(model, _judge, settings)
    pairs, _ = sampler.sample(
        model.unet, ["a red circle", "a cat", "a blue cross"], torch.Generator().manual_seed(2)
    )
    m, length = pairs.win.shape[:2]
    assert m > 0 and length == 1 + inner_steps
    rows = []
    model.unet.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    results = {}
    for share in (False, True):
        rows.clear()
        policy.unet.zero_grad()
        logp_w, logp_l = chain_log_probs(
            model,
            policy.unet,
            pairs,
            schedule=sampler.schedule,
            share_start=share,
        )
        (logp_w.sum() - 2 * logp_l.sum()).backward()
        grads = [p.grad.clone() for p in policy.trainable_parameters()]
        results[share] = (logp_w.detach(), logp_l.detach(), grads, list(rows))
    (w0, l0, g0, rows0), (w1, l1, g1, rows1) = results[False], results[True]
    assert torch.allclose(w0, w1, atol=1e-6, rtol=0) and torch.allclose(l0, l1, atol=1e-6, rtol=0)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert rows0 == [4 * m] * length  # cond + uncond of win and lose chains
    assert rows1 == [2 * m] + [4 * m] * inner_steps  # the shared x_t once


def test_result_loads_in_stock_diffusers(mini_world, tiny_spm, tmp_path):
    out = tmp_path / "spo"
    assert main(_args(mini_world, tiny_spm, out, "optim.lr=0.05")) == 0
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["step"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "ratio_win", "ratio_lose", "clamp_share", "lr", "kept_share"):
        assert any(f"train/{key}" in x for x in lines), key
    assert stock_lora_change(mini_world / "base_model", out / "final", "a red circle", 4) > 1e-4
    card = (out / "final/README.md").read_text()  # the model card: method, settings, metrics
    assert "# SPO LoRA for" in card and "| beta | 10 |" in card and "| LoRA alpha | 4 |" in card
    assert f"| train/loss | {summary['final_metrics']['train/loss']:.4g} |" in card
    peft = json.loads((out / "final/adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"]) == (4, 4)


def test_sdxl_multi_step_variant_runs(mini_world, tiny_spm, tmp_path):
    base = build_tiny_sdxl(tmp_path / "sdxl")
    spm = preference_model.load(tiny_spm)
    spm.config.trained_on = None  # the tiny SPM stands in for an SDXL one here
    spm.save(tmp_path / "spm_xl")
    out = tmp_path / "spo_xl"
    args = _args(
        mini_world,
        tmp_path / "spm_xl",
        out,
        "sampler.k=2",
        "sampler.inner_steps=1",  # segments of 2 steps tile the 4 trained ones
        "max_epochs=1",
        base=base,
    )
    assert main(args) == 0
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["family"] == "sdxl" and summary["step"] > 0


def test_killed_run_resumes_to_the_same_weights(mini_world, tiny_spm, tmp_path):
    def run(out):
        return main(_args(mini_world, tiny_spm, out))

    assert_resume_is_exact(
        run, tmp_path / "straight", tmp_path / "killed", "pytorch_lora_weights.safetensors"
    )


def test_bad_input_fails_with_one_line(mini_world, tiny_spm, tmp_path, capsys):
    for override, message in (
        ("sampler.k=1", "sampler.k': must be >= 2"),
        ("sampler.threshold=1.0", "must be in [0, 1)"),
        ("sampler.threshold=-0.1", "must be in [0, 1)"),
    ):
        assert main(_args(mini_world, tiny_spm, tmp_path / "a", override)) == 2
        assert message in one_error_line(capsys)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(_args(mini_world, tiny_spm, tmp_path / "b", f"prompts={empty}")) == 2
    assert "no prompts" in one_error_line(capsys)

    other = tmp_path / "spm_other"
    spm = preference_model.load(tiny_spm)
    spm.config.trained_on = {"family": "sdxl", "resolution": 1024, "latent_channels": 4}
    spm.save(other)
    assert main(_args(mini_world, other, tmp_path / "c")) == 2
    assert "was trained on a sdxl model" in one_error_line(capsys)

    assert main(_args(mini_world, mini_world / "base_model", tmp_path / "d")) == 2
    assert "is not a step-aware judge checkpoint" in one_error_line(capsys)


def test_a_run_that_kept_no_pair_writes_no_result(mini_world, tiny_spm, tmp_path, capsys):
    """No pair passes the threshold: no optimiser step, so no `final/` and one line saying why
    (it used to report a result: the untouched base model)."""
    out = tmp_path / "none"
    assert main(_args(mini_world, tiny_spm, out, "sampler.threshold=0.999")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bars, then the error
    line = err[-1]
    assert [x for x in err if "error" in x] == [line]
    assert "SPO made no optimiser step (0 pairs kept in 2 epochs" in line
    assert "lower sampler.threshold" in line
    assert not any((out / "final").iterdir())


def test_every_sampling_batch_is_trained_on_before_the_next_is_drawn(
    mini_world,
    tiny_spm,
    tmp_path,
    monkeypatch,
):
    """Items 7 and the release's loop: 2 prompts, one per sampling batch, 4 kept pairs each
    (threshold 0, 4 trained steps), batch_size 3: micro-batches of 3 and 1, both trained
    (2 optimiser steps per sampling batch), and the second batch is sampled by the updated
    policy."""
    seen = []
    sample = PoolSampler.sample

    def recording(self, unet, prompts, generator):
        lora = [p for n, p in unet.named_parameters() if "lora" in n]
        seen.append(float(sum(p.detach().abs().sum() for p in lora)))
        return sample(self, unet, prompts, generator)

    monkeypatch.setattr(spo.commands.train_spo.PoolSampler, "sample", recording)
    out = tmp_path / "spo"
    args = spo_args(mini_world, tiny_spm, out, "sample_batch_size=1", "batch_size=3")
    assert main(args) == 0
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["step"] == 2 * 2 * 2  # 2 epochs x 2 sampling batches x 2 micro-batches
    assert len(seen) == 4 and len(set(seen)) == 4  # every sampling batch saw new weights


@pytest.mark.parametrize("segment_pairs, pairs_per_batch", [("transitions", 4), ("chain", 2)])
def test_sdxl_style_segments_are_split_unless_asked(
    mini_world,
    tiny_spm,
    tmp_path,
    segment_pairs,
    pairs_per_batch,
):
    """Item 1 in the trainer: 2 trained steps as one segment of 2 transitions (inner_steps 1)
    give 2 pairs per prompt by default, 1 with segment_pairs=chain."""
    out = tmp_path / segment_pairs
    args = spo_args(
        mini_world,
        tiny_spm,
        out,
        "sampler.num_steps=4",
        "sampler.inner_steps=1",
        "max_epochs=1",
        f"segment_pairs={segment_pairs}",
        "batch_size=100",
    )
    assert main(args) == 0
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kept = [m["train/kept_pairs"] for m in logged if "train/kept_pairs" in m]
    assert kept == [pairs_per_batch]

"""The latent judge (preference_model/latent.py): the UNet encoder's pooled features against
the text encoder's, for SD and SDXL families, saved and loaded like the SPM; its training
(`train-preference-model judge=latent`) and SPO with it (no decode, LPO's dynamic threshold)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_resume_is_exact, judge_training_args, one_error_line, spo_args
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

import preference_model
from preference_model import CheckpointError, LatentJudge
from spo.cli import main
from spo.config import SamplerConfig
from spo.models import DiffusionModel
from spo.pool_sampler import PoolSampler


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def tiny_pipe(request, tmp_path_factory):
    build = build_tiny_sd if request.param == "sd" else build_tiny_sdxl
    folder = build(tmp_path_factory.mktemp(request.param) / "pipe")
    return DiffusionModel.from_pretrained(str(folder)).pipe


def test_judge_scores_noisy_latents_and_reloads(tiny_pipe, tmp_path):
    torch.manual_seed(0)
    judge = LatentJudge.from_pipeline(tiny_pipe, projection_dim=16)
    assert not hasattr(judge.unet, "up_blocks")  # the encoder half only
    latents = torch.randn(3, 4, 16, 16)
    prompts = ["a red circle", "a blue cross", "a cat"]
    scores = judge.score(latents, prompts, torch.tensor([951, 501, 0]))
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # the score moves with the latent, the prompt and the timestep
    assert not torch.allclose(scores, judge.score(latents.flip(0), prompts, [951, 501, 0]))
    assert not torch.allclose(scores, judge.score(latents, prompts, 0))
    judge.save(tmp_path / "judge")
    loaded = preference_model.load(tmp_path / "judge")
    assert isinstance(loaded, LatentJudge) and not loaded.training
    assert torch.equal(loaded.score(latents, prompts, torch.tensor([951, 501, 0])), scores)


def test_mid_block_guidance_changes_the_score(tiny_pipe):
    torch.manual_seed(0)
    plain = LatentJudge.from_pipeline(tiny_pipe, projection_dim=16)
    guided = LatentJudge.from_pipeline(tiny_pipe, projection_dim=16, cfg_scale=7.5)
    guided.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 16, 16)
    a, b = plain.score(x, ["a", "b"], 301), guided.score(x, ["a", "b"], 301)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_a_judge_folder_of_another_kind_is_one_line(tiny_pipe, tmp_path):
    LatentJudge.from_pipeline(tiny_pipe, projection_dim=16).save(tmp_path / "j")
    config = tmp_path / "j/latent_judge_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps(data | {"kind": "step_aware_preference_model"}))
    with pytest.raises(CheckpointError, match="kind is 'step_aware_preference_model'"):
        preference_model.load(tmp_path / "j")


# ------------------------------------------------------------------------------ training


def _judge_args(world: Path, out: Path, *extra: str) -> list[str]:
    return judge_training_args(
        world,
        out,
        "latent.projection_dim=16",
        "validation_every=2",
        "validation_pairs_periodic=8",
        "validation_timesteps=[0, 501, 951]",
        *extra,
        config="latent_judge.yaml",
    )


@pytest.fixture(scope="module")
def tiny_latent_judge(mini_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latent_judge")
    assert main(_judge_args(mini_world, out)) == 0
    return out / "final"


def test_latent_judge_trains_and_reports_accuracy_by_timestep(tiny_latent_judge):
    run = tiny_latent_judge.parent
    result = json.loads((run / "eval.json").read_text())
    assert result["judge"] == "latent" and result["step"] == 4
    assert set(result["accuracy_by_timestep"]) == {"0", "501", "951"}
    judge = preference_model.load(tiny_latent_judge)
    assert isinstance(judge, LatentJudge) and judge.config.trained_on["family"] == "sd"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/accuracy_t951" in m for m in metrics)


def test_latent_judge_resumes_exactly_and_refuses_a_pixel_checkpoint(mini_world, tmp_path, capsys):
    def run(out):
        return main(_judge_args(mini_world, out, "validation_every=0"))

    assert_resume_is_exact(run, tmp_path / "straight", tmp_path / "killed", "model.safetensors")
    pixel = tmp_path / "pixel"
    pixel_args = [*_judge_args(mini_world, pixel, "validation_every=0"), "judge=pixel"]
    assert main([*pixel_args, f"backbone.model={mini_world / 'clip.json'}"]) == 0
    capsys.readouterr()
    resume = f"resume={pixel / 'checkpoints/step-2'}"
    assert main(_judge_args(mini_world, tmp_path / "mixed", resume)) == 2
    assert "cannot resume a latent run" in one_error_line(capsys)


# ------------------------------------------------------------------------------ SPO


def _spo_args(world: Path, judge: Path, out: Path, *extra: str) -> list[str]:
    return spo_args(world, judge, out, *extra, config="spo_latent.yaml")


def test_latent_sampler_decodes_nothing(mini_world, tiny_latent_judge):
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    judge = preference_model.load(tiny_latent_judge)
    decoded = []
    decode = model.decode_latents
    model.decode_latents = lambda x: decoded.append(len(x)) or decode(x)
    settings = SamplerConfig(num_steps=6, k=2, divert_step=0, threshold=0.0)
    sampler = PoolSampler(model, judge.score, settings, latent=True)
    pairs, stats = sampler.sample(model.unet, ["a red circle", "a cat"], torch.Generator())
    assert decoded == [] and len(pairs) == 2 * 6  # every step judged, none decoded
    pixel = PoolSampler(model, lambda x, p, t: x.mean(dim=(1, 2, 3)), settings)
    pixel.sample(model.unet, ["a red circle", "a cat"], torch.Generator())
    assert decoded == [2 * 2] * 6  # the pixel path decodes every step's candidates


def test_dynamic_threshold_follows_the_step_noise(mini_world):
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    settings = SamplerConfig(num_steps=20, threshold=0.35, threshold_max=0.5)
    sampler = PoolSampler(model, lambda *a: None, settings)
    sch = sampler.schedule

    def sigma(t):  # eta = 1 DDIM standard deviation, by hand
        a = float(model.alphas_cumprod[t])
        prev = float(model.alphas_cumprod[max(t - 50, 0)])  # the last step reaches alpha_bar[0]
        return math.sqrt((1 - prev) / (1 - a) * (1 - a / prev))

    sigmas = {t: sigma(t) for t in sch.timesteps}
    low, high = min(sigmas.values()), max(sigmas.values())
    for t in (951, 501, 51, 1):
        expected = 0.35 + (sigmas[t] - low) / (high - low) * 0.15
        assert math.isclose(sampler.threshold(t), expected, rel_tol=1e-6)
    assert {round(sampler.threshold(t), 6) for t in sch.timesteps} >= {0.35, 0.5}
    fixed = PoolSampler(model, lambda *a: None, SamplerConfig(threshold=0.3))
    assert all(fixed.threshold(t) == 0.3 for t in sch.timesteps)


def test_spo_trains_with_the_latent_judge_and_refuses_the_other_kind(
    mini_world, tiny_latent_judge, tmp_path, capsys
):
    out = tmp_path / "spo"
    assert main(_spo_args(mini_world, tiny_latent_judge, out)) == 0
    assert (out / "final/pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "final/train_summary.json").read_text())["step"] > 0
    capsys.readouterr()
    assert main(_spo_args(mini_world, tiny_latent_judge, tmp_path / "a", "judge=pixel")) == 2
    assert "is a latent judge, but judge=pixel" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()  # refused before the run folder or any model
    pixel = tmp_path / "pixel_spm"
    preference_model.toy_spm().save(pixel)
    assert main(_spo_args(mini_world, pixel, tmp_path / "b")) == 2
    assert "is a pixel judge, but judge=latent" in one_error_line(capsys)
    other = tmp_path / "judge_other"
    judge = preference_model.load(tiny_latent_judge)
    judge.config.trained_on = {"family": "sdxl", "resolution": 1024, "latent_channels": 4}
    judge.save(other)
    assert main(_spo_args(mini_world, other, tmp_path / "c")) == 2
    assert "was trained on a sdxl model" in one_error_line(capsys)

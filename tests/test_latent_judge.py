"""The latent judge (preference_model/latent.py): the UNet encoder's pooled features against
the text encoder's, for SD and SDXL families; saved and loaded like the SPM."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

import preference_model
from preference_model import CheckpointError, LatentJudge
from spo.models import DiffusionModel


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

"""The step-aware preference model: identity at init, time dependence, real layouts, save/load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

import preference_model
from preference_model import (
    CheckpointError,
    CheckpointNotFoundError,
    StepAwarePreferenceModel,
    pickscore_clip_config,
    timestep_embedding,
)

OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# Every optional piece our own forward must reproduce: layer scale, no pre-LN, average pooling
# with the final LN after it, open_clip's custom attention block (qk-norm).
OPEN_CLIP_VARIANT = {
    **OPEN_CLIP_TINY,
    "vision_cfg": {
        **OPEN_CLIP_TINY["vision_cfg"],
        "ls_init_value": 0.1,
        "no_ln_pre": True,
        "pool_type": "avg",
        "final_ln_after_pool": True,
        "qk_norm": True,
    },
}
HF_TINY = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 16,
        "vocab_size": 49408,
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": 16,
}
BACKBONES = {"open_clip": OPEN_CLIP_TINY, "open_clip_variant": OPEN_CLIP_VARIANT, "hf": HF_TINY}
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle"]
TIMESTEPS = [0, 1, 251, 501, 999]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy machine extra threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, time_conditioning: bool = True) -> StepAwarePreferenceModel:
    torch.manual_seed(0)
    config = BACKBONES[name]
    if name == "hf":
        spm = StepAwarePreferenceModel.from_hf_clip(config, time_conditioning=time_conditioning)
    else:
        spm = StepAwarePreferenceModel.from_open_clip(config, time_conditioning=time_conditioning)
    return spm.eval()


def perturb(spm: StepAwarePreferenceModel) -> None:
    """Move the time conditioning away from its identity initialisation."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in spm.named_parameters():
            if not name.startswith("backbone."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def images(n: int = 3, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def backbone_scores(spm: StepAwarePreferenceModel, pixels: torch.Tensor, prompts: list[str]):
    """CLIP scores from the backbone library's own forward, not ours."""
    backbone, ids = spm.backbone, spm.tokenize(prompts)
    if isinstance(backbone, CLIPModel):
        image = backbone.get_image_features(pixel_values=pixels)
        text = backbone.get_text_features(input_ids=ids)
        image = getattr(image, "pooler_output", image)  # transformers 5 returns an output object
        text = getattr(text, "pooler_output", text)
    else:
        image, text = backbone.encode_image(pixels), backbone.encode_text(ids)
    cosine = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(dim=-1)
    return backbone.logit_scale.exp() * cosine


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# 1. identity at initialisation ----------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_identity_at_initialisation(name: str) -> None:
    spm = tiny(name)
    x = images()
    expected = backbone_scores(spm, spm.preprocess(x), PROMPTS)
    for t in TIMESTEPS:
        assert (spm.score(x, PROMPTS, t) - expected).abs().max() < 1e-5, t


# 2. time dependence ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["open_clip", "hf"])
def test_scores_depend_on_t_only_with_time_conditioning(name: str) -> None:
    spm, x = tiny(name), images()
    perturb(spm)
    scores = torch.stack([spm.score(x, PROMPTS, t) for t in TIMESTEPS])
    assert (scores - scores[0]).abs()[1:].min() > 1e-3
    per_pair = spm.score(x, PROMPTS, [0, 501, 999])
    assert torch.allclose(per_pair, torch.stack([scores[0, 0], scores[3, 1], scores[4, 2]]))

    plain = tiny(name, time_conditioning=False)
    assert all(k.startswith("backbone.") for k in plain.state_dict())
    expected = backbone_scores(plain, plain.preprocess(x), PROMPTS)
    for t in TIMESTEPS:
        assert torch.equal(plain.score(x, PROMPTS, t), plain.score(x, PROMPTS, 0))
        assert (plain.score(x, PROMPTS, t) - expected).abs().max() < 1e-5


def test_modulation_learns_from_identity() -> None:
    """Zero-initialised modulations still get gradients, so training can leave the identity."""
    spm = tiny("open_clip").train()
    logits = spm.logits(spm.preprocess(images()), spm.tokenize(PROMPTS), [0, 500, 999])
    logits.sum().backward()
    assert spm.block_modulations[0][1].weight.grad.abs().sum() > 0
    assert spm.final_modulation[1].weight.grad.abs().sum() > 0


# 3. real checkpoint layouts on the meta device ------------------------------------------------


def time_keys(spm: StepAwarePreferenceModel) -> set[str]:
    return {k for k in spm.state_dict() if not k.startswith("backbone.")}


def test_open_clip_vit_h_14_layout_loads() -> None:
    with torch.device("meta"):
        reference = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
        spm = StepAwarePreferenceModel.from_open_clip("ViT-H-14")
    state = reference.state_dict()
    assert set(spm.state_dict()) - time_keys(spm) == {f"backbone.{k}" for k in state}
    assert time_keys(spm) == {
        *(f"time_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
        *(f"block_modulations.{i}.1.{p}" for i in range(32) for p in ("weight", "bias")),
        "final_modulation.1.weight",
        "final_modulation.1.bias",
    }
    assert spm.state_dict()["block_modulations.31.1.weight"].shape == (6 * 1280, 1280)
    spm.load_backbone_state_dict({f"module.{k}": v for k, v in state.items()}, assign=True)

    with torch.device("meta"):
        vit_l = open_clip.CLIP(**open_clip.get_model_config("ViT-L-14")).state_dict()
    with pytest.raises(CheckpointError) as err:
        spm.load_backbone_state_dict(vit_l, assign=True)
    assert "missing weight 'visual.transformer.resblocks.24." in one_line(err)


def test_pickscore_layout_loads() -> None:
    with torch.device("meta"):
        reference = CLIPModel(pickscore_clip_config())
        spm = StepAwarePreferenceModel.from_hf_clip(pickscore_clip_config())
    state = reference.state_dict()
    assert set(spm.state_dict()) - time_keys(spm) == {f"backbone.{k}" for k in state}
    assert len(time_keys(spm)) == 4 + 2 * 32 + 2
    # Checkpoints saved by transformers < 4.31 (PickScore_v1's era) carry position_ids.
    with torch.device("meta"):
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    spm.load_backbone_state_dict(state, assign=True)

    state["visual_projection.weight"] = torch.empty(768, 1280, device="meta")
    with pytest.raises(CheckpointError) as err:
        spm.load_backbone_state_dict(state, assign=True)
    assert "'visual_projection.weight' has shape (768, 1280)" in one_line(err)
    assert "(1024, 1280)" in str(err.value)


# 4. save, load in a fresh process, score ------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers CLIP folder with its own tokenizer files, like a real checkpoint."""
    from spo.toy.text import build_tokenizer

    folder = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig.from_dict(HF_TINY)).save_pretrained(folder)
    build_tokenizer(model_max_length=16).save_pretrained(folder)
    return folder


def test_save_and_load_in_a_fresh_process(tmp_path: Path, hf_checkpoint: Path) -> None:
    models = {
        "open_clip": tiny("open_clip_variant"),
        "hf": StepAwarePreferenceModel.from_hf_clip(hf_checkpoint).eval(),
    }
    x = images()
    torch.save(x, tmp_path / "images.pt")
    expected = {}
    for name, spm in models.items():
        perturb(spm)
        expected[name] = spm.score(x, PROMPTS, [0, 501, 999])
        spm.save(tmp_path / name)
    config = json.loads((tmp_path / "hf" / "spm_config.json").read_text())
    assert config["kind"] == "step_aware_preference_model" and config["version"] == 1
    assert config["backbone_family"] == "hf_clip" and config["timestep_embed_dim"] == 256
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    script = textwrap.dedent(
        f"""
        import json, torch, preference_model
        x = torch.load({str(tmp_path / "images.pt")!r})
        prompts = {PROMPTS!r}
        out = {{}}
        for name in ("open_clip", "hf"):
            spm = preference_model.load({str(tmp_path)!r} + "/" + name)
            out[name] = spm.score(x, prompts, [0, 501, 999]).tolist()
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, scores in expected.items():
        assert torch.equal(torch.tensor(loaded[name]), scores), name


# 5. bad checkpoints ---------------------------------------------------------------------------


def test_bad_checkpoints_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as err:
        preference_model.load(tmp_path / "nowhere")
    assert "no such" in one_line(err)

    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        preference_model.load(pipeline)
    assert "not a step-aware preference model" in one_line(err) and "diffusers" in str(err.value)

    other = tmp_path / "other"
    other.mkdir()
    (other / "spm_config.json").write_text(json.dumps({"kind": "lora", "version": 1}))
    with pytest.raises(CheckpointError) as err:
        preference_model.load(other)
    assert "kind is 'lora'" in one_line(err)

    saved = tmp_path / "saved"
    tiny("open_clip").save(saved)
    weights = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError) as err:
        preference_model.load(saved)
    assert "model.safetensors is missing" in one_line(err)

    weights["backbone.visual.proj"] = torch.zeros(64, 8)
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        preference_model.load(saved)
    message = one_line(err)
    assert "'backbone.visual.proj' has shape (64, 8)" in message and "(64, 16)" in message


# 6. timestep embedding ------------------------------------------------------------------------


def test_timestep_embedding_hand_computed() -> None:
    # dim 6: frequencies 10000 ** (-i / 3) for i = 0, 1, 2; cosines first, then sines.
    freqs = [1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)]
    got = timestep_embedding(torch.tensor([0, 1]), dim=6, max_period=10000)
    expected = torch.tensor(
        [
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            [*(math.cos(f) for f in freqs), *(math.sin(f) for f in freqs)],
        ]
    )
    assert torch.allclose(got, expected, atol=1e-7)
    assert torch.allclose(
        timestep_embedding(torch.tensor([1.0]), dim=5),
        torch.tensor([[math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01), 0.0]]),
        atol=1e-7,
    )
    assert timestep_embedding(torch.arange(3)).shape == (3, 256)


# 7. image inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_pil_and_tensor_inputs_agree(size: tuple[int, int]) -> None:
    spm = tiny("open_clip")
    perturb(spm)
    pixels = np.random.default_rng(3).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    pil = [Image.fromarray(p) for p in pixels]
    zero_one = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    scores = spm.score(pil, PROMPTS, 251)
    assert torch.equal(spm.score(zero_one, PROMPTS, 251), scores)
    minus_one_one = spm.score(zero_one * 2 - 1, PROMPTS, 251, value_range="-1-1")
    torch.testing.assert_close(minus_one_one, scores, rtol=1e-5, atol=1e-5)  # rounding only
    with pytest.raises(ValueError, match="value_range"):
        spm.score(zero_one * 2 - 1, PROMPTS, 251)


def test_antialias_is_a_saved_setting(tmp_path: Path) -> None:
    """With `antialias` off (the released SPM's resizing), images are resized by plain bicubic
    interpolation; the setting is saved with the model, and a file from before it existed
    loads with antialiasing on, as its model was trained."""
    spm = tiny("open_clip")
    x = images(3, 64, 64)
    smooth = spm.preprocess(x)
    spm.config.antialias = False
    plain = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(spm.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spm.config.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(spm.preprocess(x), (plain - mean) / std)
    assert not torch.allclose(spm.preprocess(x), smooth, atol=0.1)

    spm.save(tmp_path / "plain")
    assert preference_model.load(tmp_path / "plain").config.antialias is False
    config = json.loads((tmp_path / "plain" / "spm_config.json").read_text())
    del config["antialias"]
    (tmp_path / "plain" / "spm_config.json").write_text(json.dumps(config))
    assert preference_model.load(tmp_path / "plain").config.antialias is True

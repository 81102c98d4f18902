"""The evaluation scorers (spo/evaluation/scorers/): key layouts of the real checkpoints,
score formulas on hand-made cases, and one-line errors. Random tiny models only, no network."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from preference_model.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    preprocess_images,
)
from spo.errors import ConfigError
from spo.evaluation.scorers import aesthetic, build_scorer, imagereward
from spo.evaluation.scorers import clip as clip_family
from spo.evaluation.scorers.aesthetic import AestheticMLP, AestheticScorer
from spo.evaluation.scorers.base import check_state_dict, unwrap_state_dict
from spo.evaluation.scorers.clip import CLIPCosineScorer

PROMPTS = ["a red cube", "a blue ball on grass", "two cats", "an empty street at night"]


def tiny_clip_config(embed_dim: int = 16) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }


def tiny_clip(tmp_path, embed_dim: int = 16, quick_gelu: bool = False):
    """A tiny open_clip config (.json) and a random model of it."""
    config = tmp_path / f"tiny_clip_{embed_dim}.json"
    config.write_text(json.dumps({"model_cfg": tiny_clip_config(embed_dim)}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_config(embed_dim), quick_gelu=quick_gelu).eval()
    return config, model


def images(n: int = 4, height: int = 48, width: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(1))


def meta_open_clip(arch: str, quick_gelu: bool = False) -> nn.Module:
    """The real architecture, with no memory behind its weights (keys and shapes only)."""
    return clip_family.open_clip_model(arch, "meta", quick_gelu=quick_gelu).model


class StubClip(nn.Module):
    """encode_image / encode_text hand out fixed features, batch after batch (for hand-made
    formula checks)."""

    def __init__(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.features = {"image": image_features, "text": text_features}
        self.cursor = {"image": 0, "text": 0}

    def _next(self, kind: str, n: int) -> torch.Tensor:
        start = self.cursor[kind]
        self.cursor[kind] += n
        return self.features[kind][start : start + n]

    def encode_image(self, pixels):
        return self._next("image", len(pixels))

    def encode_text(self, tokens):
        return self._next("text", len(tokens))


# ----------------------------------------------------------------------------- real key layouts


def test_hps_checkpoint_layout_matches_open_clip_vit_h14():
    model = meta_open_clip("ViT-H-14")
    expected = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) > 9.8e8  # the real ViT-H-14
    # HPS_v2.1_compressed.pt: {"state_dict": {...}} as saved by (DDP) training.
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in expected.items()}}
    state = unwrap_state_dict(checkpoint)
    check_state_dict(expected, state, "HPS_v2.1_compressed.pt")  # no missing / unexpected key
    assert unwrap_state_dict(dict(expected)).keys() == expected.keys()  # a plain state dict
    state.pop("visual.proj")
    with pytest.raises(ConfigError, match="missing weight 'visual.proj'"):
        check_state_dict(expected, state, "HPS_v2.1_compressed.pt")
    clip = clip_family.open_clip_model("ViT-H-14", "meta")
    assert clip.transform == ImageTransform(224)  # OpenAI mean / std, bicubic
    assert clip.tokenizer(["a cat"]).shape == (1, 77)


def test_aesthetic_layouts_match_the_real_files():
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }
    # CLIP ViT-L/14 as the predictor used it: OpenAI weights, so QuickGELU, 768-d embedding.
    model = meta_open_clip("ViT-L-14", quick_gelu=True)
    assert model.visual.proj.shape == (1024, 768)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_crop_and_pad():
    white = torch.ones(2, 3, 40, 80)
    crop = preprocess_images(white, ImageTransform(20))
    pad = preprocess_images(white, ImageTransform(20, resize_mode="longest"))
    assert crop.shape == pad.shape == (2, 3, 20, 20)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(crop, ((1 - mean) / std).expand_as(crop))
    # 40x80 -> 10x20, padded with 5 black rows above and below.
    torch.testing.assert_close(pad[:, :, 5:15], ((1 - mean) / std).expand(2, 3, 10, 20))
    torch.testing.assert_close(pad[:, :, :5], ((0 - mean) / std).expand(2, 3, 5, 20))
    torch.testing.assert_close(pad[:, :, 15:], ((0 - mean) / std).expand(2, 3, 5, 20))


# ----------------------------------------------------------------------------- HPSv2


@pytest.mark.parametrize("layout", ["hps_checkpoint", "plain"])
def test_hpsv2_scores_are_100_cosines_as_the_tables_print(tmp_path, monkeypatch, layout):
    config, model = tiny_clip(tmp_path)
    monkeypatch.setattr(clip_family, "HPS_ARCH", str(config))
    state = {k: v.half() for k, v in model.state_dict().items()}  # "compressed": fp16
    if layout == "hps_checkpoint":
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "HPS_v2.1_compressed.pt")
    scorer = build_scorer(f"hpsv2:{tmp_path / 'HPS_v2.1_compressed.pt'}")
    x = images()
    scores = scorer(x, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and scores.abs().max() <= 100
    # By hand: the fp16-rounded weights, pad-to-square preprocessing, cos.
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    pixels = preprocess_images(x, ImageTransform(32, resize_mode="longest"))
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(
            model.encode_text(open_clip.SimpleTokenizer(context_length=16)(PROMPTS)), dim=-1
        )
    torch.testing.assert_close(scores, 100 * (image * text).sum(-1), rtol=1e-4, atol=1e-3)
    # A folder holding the file works too.
    torch.testing.assert_close(build_scorer(f"hpsv2:{tmp_path}")(x, PROMPTS), scores)


def test_hpsv2_rejects_a_wrong_checkpoint(tmp_path, monkeypatch):
    config, model = tiny_clip(tmp_path)
    monkeypatch.setattr(clip_family, "HPS_ARCH", str(config))
    state = model.state_dict()
    state["visual.extra"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    with pytest.raises(ConfigError, match="unexpected weight 'visual.extra'"):
        build_scorer(f"hpsv2:{tmp_path / 'hps.pt'}")


# ----------------------------------------------------------------------------- CLIP score


def test_clip_score_formula_on_hand_made_features():
    e0, e1 = torch.eye(2)
    image = torch.stack([3 * e0, e0, e0, e0, e0])
    text = torch.stack([e0, e1, -e0, math.cos(math.pi / 3) * e0 + math.sin(math.pi / 3) * e1, e0])
    text[4] = 7 * e0 + 1e-9  # length does not matter
    prompts = ["same", "orthogonal", "opposite", "60 degrees", "same"]

    def scorer(**kwargs):
        tokenize = lambda prompts: torch.zeros(len(prompts), 3, dtype=torch.long)  # noqa: E731
        stub = StubClip(image, text)
        return CLIPCosineScorer(stub, tokenize, ImageTransform(8), batch_size=2, **kwargs)

    x = torch.rand(5, 3, 8, 8)
    # CLIP score: identical direction -> 100, orthogonal -> 0, opposite -> 0 (clamped), 60° -> 50.
    clip_scores = scorer(scale=100.0, clamp_negative=True)(x, prompts)
    torch.testing.assert_close(clip_scores, torch.tensor([100.0, 0.0, 0.0, 50.0, 100.0]))
    # HPSv2's score is the plain cosine.
    torch.testing.assert_close(scorer()(x, prompts), torch.tensor([1.0, 0.0, -1.0, 0.5, 1.0]))


def test_clip_scorer_on_a_tiny_open_clip_model(tmp_path):
    config, model = tiny_clip(tmp_path)
    weights = tmp_path / "tiny_clip.safetensors"
    save_file(model.state_dict(), weights)
    scorer = build_scorer(f"clip:{config}@{weights}")
    x = images(n=3)
    scores = scorer(x, PROMPTS[:3])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()
    pixels = preprocess_images(x, ImageTransform(32))
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(
            model.encode_text(open_clip.SimpleTokenizer(context_length=16)(PROMPTS[:3])), dim=-1
        )
    torch.testing.assert_close(scores, 100 * (image * text).sum(-1).clamp(min=0), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- aesthetic


def fixed_mlp() -> AestheticMLP:
    mlp = AestheticMLP()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
    return mlp.eval()


def test_aesthetic_mlp_equals_hand_computation():
    mlp = fixed_mlp()
    embedding = torch.zeros(1, 768, dtype=torch.float64)
    embedding[0, 0], embedding[0, 5] = 3.0, 4.0  # |e| = 5
    scorer = AestheticScorer(StubClip(embedding.float(), embedding), mlp, ImageTransform(8))
    score = scorer(torch.rand(1, 3, 8, 8), ["prompt ignored"])
    h = np.zeros(768)
    h[0], h[5] = 0.6, 0.8  # e / |e|
    for i in (0, 2, 4, 6, 7):  # dropout is off: five affine layers
        w = mlp.layers[i].weight.detach().double().numpy()
        b = mlp.layers[i].bias.detach().double().numpy()
        h = w @ h + b
    assert score.shape == (1,)
    assert score.item() == pytest.approx(h.item(), rel=1e-5, abs=1e-5)


def test_aesthetic_scorer_loads_real_layout(tmp_path, monkeypatch):
    config, model = tiny_clip(tmp_path, embed_dim=768, quick_gelu=True)
    monkeypatch.setattr(aesthetic, "AESTHETIC_ARCH", str(config))
    mlp = fixed_mlp()
    torch.save(mlp.state_dict(), tmp_path / aesthetic.AESTHETIC_FILENAME)
    torch.save(model.state_dict(), tmp_path / "clip_l14.pt")
    scorer = build_scorer(
        f"aesthetic:{tmp_path / aesthetic.AESTHETIC_FILENAME},{tmp_path}/clip_l14.pt"
    )
    x = images()
    scores = scorer(x, PROMPTS)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    with torch.no_grad():
        embedding = F.normalize(
            model.encode_image(preprocess_images(x, ImageTransform(32))), dim=-1
        )
        expected = mlp(embedding).squeeze(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # The CLIP tower was built with QuickGELU (OpenAI weights), as the predictor's was.
    gelu = scorer.model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(gelu, open_clip.model.QuickGELU)


# ----------------------------------------------------------------------------- errors


def _no_model_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the weights were checked")

    for family in (clip_family, aesthetic):
        monkeypatch.setattr(family, "open_clip_model", refuse)
    monkeypatch.setattr(imagereward, "import_imagereward", refuse)


@pytest.mark.parametrize(
    "spec, named",
    [
        ("hpsv2:{tmp}/nothing/HPS_v2.1_compressed.pt", "nothing/HPS_v2.1_compressed.pt"),
        ("hpsv2:{tmp}/empty_folder", f"empty_folder/{clip_family.HPS_FILENAME}"),
        ("aesthetic:{tmp}/missing_mlp.pth", "missing_mlp.pth"),
        ("aesthetic:{tmp}/mlp.pth,{tmp}/missing_clip.pt", "missing_clip.pt"),
        ("clip:ViT-B-32@{tmp}/missing_clip.pt", "missing_clip.pt"),
        ("clip:{tmp}/missing_config.json@{tmp}/mlp.pth", "missing_config.json"),
        ("imagereward:{tmp}/missing_ir.pt", "missing_ir.pt"),
    ],
)
def test_missing_weights_is_one_line_config_error(tmp_path, monkeypatch, spec, named):
    (tmp_path / "empty_folder").mkdir()
    torch.save(AestheticMLP().state_dict(), tmp_path / "mlp.pth")
    if "missing_config" not in spec:
        _no_model_building(monkeypatch)
    with pytest.raises(ConfigError) as err:
        build_scorer(spec.format(tmp=tmp_path))
    message = str(err.value)
    assert named in message and "\n" not in message


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        build_scorer("nope:x")
    message = str(err.value)
    for name in ("aesthetic", "clip", "hpsv2", "imagereward", "oracle", "pickscore", "spm"):
        assert name in message
    assert "\n" not in message


def test_imagereward_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="imagereward' is unavailable") as err:
        build_scorer("imagereward:ImageReward-v1.0")
    assert "\n" not in str(err.value)


def test_imagereward_import_failure_gives_first_line(monkeypatch):
    def broken(name):
        raise ImportError("cannot import name 'apply_chunking_to_forward'\nlong traceback")

    monkeypatch.setattr(imagereward.importlib, "import_module", broken)
    with pytest.raises(ConfigError) as err:
        build_scorer("imagereward:ImageReward-v1.0")
    message = str(err.value)
    assert "unavailable" in message and "apply_chunking_to_forward" in message
    assert "long traceback" not in message


class _FakeTokens:
    def __init__(self, n: int) -> None:
        self.input_ids = torch.arange(n)[:, None].repeat(1, 35)
        self.attention_mask = torch.ones(n, 35, dtype=torch.long)

    def to(self, device):
        return self


class _FakeTextEncoder(nn.Module):
    def forward(
        self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict
    ):
        cls = encoder_hidden_states.mean(1) + input_ids[:, :1].float()
        return types.SimpleNamespace(last_hidden_state=cls[:, None].expand(-1, 2, -1))


class _FakeImageReward(nn.Module):
    """The parts of ImageReward's model the scorer uses (BLIP tokenizer / towers, mlp)."""

    def __init__(self) -> None:
        super().__init__()
        self.blip = nn.Module()
        self.blip.tokenizer = lambda prompts, **kwargs: _FakeTokens(len(prompts))
        self.blip.visual_encoder = nn.Sequential(nn.Flatten(2), nn.Linear(224 * 224, 4))
        self.blip.text_encoder = _FakeTextEncoder()
        self.mlp = nn.Linear(4, 1)
        self.mean, self.std = 0.5, 2.0


def test_imagereward_scorer_with_the_package_present(tmp_path, monkeypatch):
    model = _FakeImageReward()
    calls = []

    def load(name, device, download_root=None):
        calls.append((name, download_root))
        return model

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    scorer = build_scorer(f"imagereward:{tmp_path}")
    assert calls == [(str(tmp_path / "ImageReward.pt"), str(tmp_path))]
    x = images(n=3)
    scores = scorer(x, PROMPTS[:3])
    with torch.no_grad():
        embeds = model.blip.visual_encoder(preprocess_images(x, ImageTransform(224)))
        cls = embeds.mean(1) + torch.arange(3)[:, None]
        expected = (model.mlp(cls).squeeze(-1) - 0.5) / 2.0
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected)

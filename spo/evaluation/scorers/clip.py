"""CLIP-family scorers: PickScore and the SPM at t = 0 (exp(logit_scale) * cos), HPSv2.1 and
the CLIP score (cos of open_clip models), and the toy world's PickScore stand-in.

- `pickscore:<folder or hub name>`: exp(logit_scale) * cos (PickScore_v1).
- `spm:<folder>`: an SPM at t = 0.
- `hpsv2:<weights file, folder or hub repo>`: HPSv2.1, cos of open_clip ViT-H-14 features.
- `clip:<open_clip model name or config .json>[@<weights file or open_clip tag>]`: CLIP score,
  100 * max(cos, 0).
- `toy_pickscore`: the shipped toy CLIP without time conditioning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import preference_model
from preference_model.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from spo.errors import ConfigError
from spo.evaluation.scorers.base import (
    BatchedScorer,
    Scorer,
    load_weights,
    model_dtype,
    weights_file,
)

# The real architecture and file name (tests point the architecture at tiny configs).
HPS_ARCH = "ViT-H-14"
HPS_FILENAME = "HPS_v2.1_compressed.pt"


class CLIPPreferenceScorer:
    """exp(logit_scale) * cos of a CLIP-style preference model at t = 0: an SPM folder, or
    PickScore (a transformers CLIPModel; our SPM wrapper without time conditioning computes
    exactly PickScore's score)."""

    def __init__(self, model, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = images[i : i + self.batch_size].to(self.model.device)
            out.append(self.model.score(chunk, list(prompts[i : i + self.batch_size]), 0).cpu())
        return torch.cat(out)


class CLIPCosineScorer(BatchedScorer):
    """`scale * cos(image, prompt)` of an open_clip model (`max(cos, 0)` with `clamp_negative`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        transform: ImageTransform,
        *,
        scale: float = 1.0,
        clamp_negative: bool = False,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        super().__init__(device, batch_size)
        self.model, self.tokenizer, self.transform = model.eval(), tokenizer, transform
        self.scale, self.clamp_negative = scale, clamp_negative

    def score_batch(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        image = self.model.encode_image(pixels.to(model_dtype(self.model)))
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        cos = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
        return self.scale * (cos.clamp(min=0) if self.clamp_negative else cos)


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """open_clip warns "initialized randomly" for a model whose weights we load next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@dataclasses.dataclass
class OpenClip:
    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    transform: ImageTransform


def open_clip_model(
    arch: str,
    device: str | torch.device = "cpu",
    pretrained: str | None = None,
    quick_gelu: bool = False,
) -> OpenClip:
    """An open_clip model (eval mode) with its tokenizer and image transform.

    `arch`: a name open_clip knows ("ViT-H-14"), an `hf-hub:` / `local-dir:` source, or a
    model-config `.json` file (`{"model_cfg": ...}` or the bare config, random weights).
    `pretrained`: an open_clip tag (downloaded by open_clip) or None (random weights, to load
    a file into next). The model is built directly on `device`.
    """
    import open_clip

    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ConfigError(f"open_clip model config not found: {path}")
        data = json.loads(path.read_text())
        cfg = dict(data.get("model_cfg", data))
        cfg["quick_gelu"] = quick_gelu or cfg.get("quick_gelu", False)
        custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
        with torch.device(device):
            model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
        pp = {"size": cfg["vision_cfg"].get("image_size", 224), **data.get("preprocess_cfg", {})}
        text_cfg = cfg.get("text_cfg", {})
        tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    else:
        if open_clip.get_model_config(arch) is None and not arch.startswith(
            ("hf-hub:", "local-dir:")
        ):
            raise ConfigError(f"open_clip does not know the model {arch!r}")
        quiet = _no_random_init_warning() if pretrained is None else contextlib.nullcontext()
        with quiet, torch.device(device):
            model = open_clip.create_model(
                arch, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu
            )
        pp = open_clip.get_model_preprocess_cfg(model)
        tokenizer = open_clip.get_tokenizer(arch)
    size = pp.get("size", 224)
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ConfigError(f"{arch}: non-square image size {tuple(size)} is not supported")
        size = size[0]
    transform = ImageTransform(
        size=size,
        mean=tuple(pp.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(pp.get("std", OPENAI_CLIP_STD)),
        resize_mode=pp.get("resize_mode", "shortest"),
        interpolation=pp.get("interpolation", "bicubic"),
    )
    return OpenClip(model.eval(), tokenizer, transform)


def open_clip_tag(arch: str, value: str) -> dict[str, Any]:
    """The open_clip pretrained config of `value` as a tag of `arch`, {} if it is none."""
    import open_clip

    if arch.endswith(".json") or not value:
        return {}
    return open_clip.get_pretrained_cfg(arch, value) or {}


def spm_scorer(path: str, device: str) -> Scorer:
    return CLIPPreferenceScorer(preference_model.load(path, device=device))


def pickscore_scorer(source: str, device: str) -> Scorer:
    try:
        model = preference_model.StepAwarePreferenceModel.from_hf_clip(
            source, time_conditioning=False
        )
    except OSError as e:
        raise ConfigError(f"cannot load PickScore model {source}: {e}") from e
    return CLIPPreferenceScorer(model.to(device))


def hpsv2_scorer(source: str, device: str) -> Scorer:
    """HPSv2.1: 100 * cos(image, prompt) of open_clip ViT-H-14 with the HPS weights, in
    [-100, 100]: the scale of the published tables (method.md), which print 100 x what
    `hpsv2.score` returns (the diagonal of normalised image @ text features).

    Preprocessing is HPSv2's eval transform: longer side to 224 (bicubic), centred black
    padding, OpenAI CLIP mean / std (for square images: a plain resize to 224). Tokens:
    open_clip's ViT-H-14 tokenizer (77). `source`: the weights file (`HPS_v2.1_compressed.pt`,
    a `{"state_dict": ...}` checkpoint or a plain state dict, a `module.` prefix allowed), a
    folder holding it, or a hub repo (`xswu/HPSv2`).
    """
    weights = weights_file(source, HPS_FILENAME, "HPSv2")
    clip = open_clip_model(HPS_ARCH, device)
    load_weights(clip.model, weights)
    transform = dataclasses.replace(clip.transform, resize_mode="longest")
    return CLIPCosineScorer(clip.model, clip.tokenizer, transform, scale=100.0, device=device)


def clip_scorer(arg: str, device: str) -> Scorer:
    """CLIP score: 100 * max(cos(image, prompt), 0), the usual CLIPScore convention (as in
    torchmetrics), in [0, 100].

    `arg`: `<model>[@<weights>]`. The model: an open_clip name (`ViT-L-14`), an `hf-hub:` /
    `local-dir:` source (weights included), or a model-config `.json` file. The weights: a file
    or an open_clip tag (its mean / std and QuickGELU setting are used); default for a named
    model: its first open_clip tag (`openai` for ViT-B-32 / ViT-L-14). OpenAI weights in a file
    need the `-quickgelu` name (`ViT-L-14-quickgelu@ViT-L-14.pt`). Preprocessing: the model's
    open_clip eval transform (for OpenAI models: shorter side bicubic, centre crop, mean / std).
    """
    import open_clip

    arch, _, weights = arg.partition("@")
    bundled = arch.startswith(("hf-hub:", "local-dir:"))
    if not weights and not bundled:
        tags = [] if arch.endswith(".json") else open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            raise ConfigError(
                f"scorer 'clip' needs weights for {arch}: clip:{arch}@<weights file or tag>"
            )
        weights = tags[0]
    tag = open_clip_tag(arch, weights)
    if weights and not tag and not Path(weights).expanduser().is_file():
        raise ConfigError(f"CLIP weights file not found: {weights} (nor an open_clip tag)")
    pretrained = weights if tag else None
    clip = open_clip_model(arch, device, pretrained, quick_gelu=tag.get("quick_gelu", False))
    if weights and not tag:
        load_weights(clip.model, Path(weights).expanduser())
    return CLIPCosineScorer(
        clip.model, clip.tokenizer, clip.transform, scale=100.0, clamp_negative=True, device=device
    )


def toy_pickscore_scorer(arg: str, device: str) -> Scorer:
    """The toy world's clean preference model: the shipped toy CLIP (the stand-in for
    PickScore_v1 that the toy SPM starts from), without time conditioning."""
    return CLIPPreferenceScorer(preference_model.toy_spm(time_conditioning=False).to(device))

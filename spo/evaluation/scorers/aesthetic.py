"""LAION aesthetic predictor v2: an affine MLP on the CLIP ViT-L/14 image embedding (prompts
are ignored).

- `aesthetic:<MLP weights>[,<CLIP ViT-L/14 weights file or open_clip tag>]`, about 1..10.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preference_model.transforms import ImageTransform
from spo.errors import ConfigError
from spo.evaluation.scorers.base import (
    BatchedScorer,
    Scorer,
    load_weights,
    model_dtype,
    weights_file,
)
from spo.evaluation.scorers.clip import open_clip_model, open_clip_tag

# The real architecture and file name (tests point the architecture at tiny configs).
AESTHETIC_ARCH = "ViT-L-14"
AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_EMBED_DIM = 768


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor MLP (no activations: it is affine), with the state-dict
    keys of `sac+logos+ava1-l14-linearMSE.pth` (`layers.{0,2,4,6,7}.{weight,bias}`)."""

    def __init__(self, input_size: int = AESTHETIC_EMBED_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding)


class AestheticScorer(BatchedScorer):
    """MLP(image_embedding / |image_embedding|) of a CLIP image tower; prompts are ignored."""

    def __init__(
        self,
        clip_model: nn.Module,
        mlp: nn.Module,
        transform: ImageTransform,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        super().__init__(device, batch_size)
        self.model, self.mlp, self.transform = clip_model.eval(), mlp.eval(), transform

    def score_batch(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        embedding = self.model.encode_image(pixels.to(model_dtype(self.model)))
        embedding = F.normalize(embedding.float(), dim=-1)
        return self.mlp(embedding.to(model_dtype(self.mlp))).squeeze(-1)


def aesthetic_scorer(arg: str, device: str) -> Scorer:
    """LAION aesthetic predictor v2 (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE`).

    score = MLP(e / |e|), e = the projected CLIP ViT-L/14 (OpenAI) image embedding (768), the MLP
    being 5 affine layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout off); about 1..10, not
    squashed. Prompts are ignored. Preprocessing: OpenAI CLIP's (shorter side to 224 bicubic,
    centre crop, CLIP mean / std).
    `arg`: `<MLP weights file, folder or hub repo>[,<CLIP weights file or open_clip tag>]`; the
    CLIP part defaults to open_clip's `openai` tag (downloaded when built). A CLIP weights file
    is taken to hold OpenAI's weights (QuickGELU), as open_clip or as a TorchScript file.
    """
    mlp_source, _, clip_source = arg.partition(",")
    clip_source = clip_source.strip() or "openai"
    mlp_file = weights_file(mlp_source.strip(), AESTHETIC_FILENAME, "aesthetic MLP")
    tag = open_clip_tag(AESTHETIC_ARCH, clip_source)
    if not tag and not Path(clip_source).expanduser().is_file():
        raise ConfigError(
            f"CLIP ViT-L/14 weights file not found: {clip_source} "
            f"(nor an open_clip tag of {AESTHETIC_ARCH})"
        )
    mlp = load_weights(AestheticMLP(), mlp_file).to(device)
    clip = open_clip_model(
        AESTHETIC_ARCH,
        device,
        pretrained=clip_source if tag else None,
        quick_gelu=tag.get("quick_gelu", False) if tag else True,
    )
    if not tag:
        load_weights(clip.model, Path(clip_source).expanduser())
    return AestheticScorer(clip.model, mlp, clip.transform, device=device)

"""ImageReward (needs the `image-reward` package), batched on tensors.

- `imagereward:<ImageReward-v1.0, weights file or folder>`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import Tensor, nn

from preference_model.transforms import ImageTransform
from spo.errors import ConfigError
from spo.evaluation.scorers.base import BatchedScorer, Scorer, first_line, model_dtype

IMAGEREWARD_NAMES = ("ImageReward-v1.0",)
IMAGEREWARD_FILENAME = "ImageReward.pt"


class ImageRewardScorer(BatchedScorer):
    """ImageReward's `score`, batched on tensors: BLIP ViT-L image embeddings, prompt tokens
    (BERT, padded / truncated to 35) cross-attending to them, the MLP on the [CLS] feature,
    then `(reward - model.mean) / model.std`. Preprocessing is the package's: shorter side to
    224 bicubic, centre crop, OpenAI CLIP mean / std."""

    transform = ImageTransform(224)

    def __init__(
        self, model: nn.Module, *, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> None:
        super().__init__(device, batch_size)
        self.model = model.eval()

    def score_batch(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        blip = self.model.blip
        text = blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(self.device)
        image_embeds = blip.visual_encoder(pixels.to(model_dtype(blip.visual_encoder)))
        attention = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = blip.text_encoder(
            text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=attention,
            return_dict=True,
        ).last_hidden_state
        reward = self.model.mlp(hidden[:, 0, :].float()).squeeze(-1)
        return (reward - self.model.mean) / self.model.std


def import_imagereward():
    """The `ImageReward` module, or a one-line ConfigError saying why it is unavailable."""
    try:
        return importlib.import_module("ImageReward")
    except Exception as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "ImageReward":
            reason = "the image-reward package is not installed"
        else:
            reason = f"importing ImageReward fails ({first_line(err)})"
        raise ConfigError(f"scorer 'imagereward' is unavailable: {reason}") from None


def imagereward_scorer(source: str, device: str) -> Scorer:
    """ImageReward (see ImageRewardScorer). `source`: `ImageReward-v1.0` (fetched by the
    package), a weights file, or a folder holding `ImageReward.pt` (the package reads its
    `med_config.json` from the same folder, or fetches it there)."""
    download_root = None
    if source not in IMAGEREWARD_NAMES:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / IMAGEREWARD_FILENAME
        if not path.is_file():
            raise ConfigError(f"ImageReward weights file not found: {path}")
        source, download_root = str(path), str(path.parent)
    module = import_imagereward()
    try:
        model = module.load(source, device=device, download_root=download_root)
    except Exception as err:
        raise ConfigError(f"cannot load ImageReward model {source}: {first_line(err)}") from None
    return ImageRewardScorer(model, device=device)

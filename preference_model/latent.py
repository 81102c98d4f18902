"""The latent judge: a step-aware preference model that scores the noisy latent itself.

method.md 6 (LPO's latent reward model, written anew): the diffusion UNet's encoder (conv_in, the
down blocks and the mid block, initialised from the base pipeline's UNet and trained) reads
(x_t, t, prompt); the global average pool of each down stage's output and of the mid block's
(320 + 640 + 1280 + 1280 + 1280 = 4800 values at SD1.5 size) goes through Linear(.., D, no
bias); the prompt's feature is the pipeline's own text encoder's pooled output through
Linear(.., D, no bias); the score is exp(logit_scale) * cos(image, text). Optional CFG on the
pooled mid-block features (the release: 7.5). No up blocks and no VAE decode: SPO's sampler can
judge every candidate x_{t-1} as it is.

Checkpoint folder: `model.safetensors` (keys `unet.*`, `text_encoders.*`, `image_projection.*`,
`text_projection.*`, `logit_scale`), `latent_judge_config.json`, and `tokenizer/` (SDXL also
`tokenizer_2/`). It loads with `preference_model.load(folder)` like the SPM.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from preference_model.errors import (
    CheckpointNotFoundError,
    check_safetensors,
    check_state_dict,
    read_config_file,
)

KIND = "latent_preference_model"
FORMAT_VERSION = 1
CONFIG_NAME = "latent_judge_config.json"
WEIGHTS_NAME = "model.safetensors"
_UP_PARTS = ("up_blocks", "conv_norm_out", "conv_act", "conv_out")


@dataclasses.dataclass
class LatentJudgeConfig:
    """Everything `latent_judge_config.json` holds: enough to rebuild the judge offline."""

    family: str  # "sd" (one text encoder) | "sdxl" (two, pooled embedding, add_time_ids)
    unet_config: dict[str, Any]  # the base UNet's diffusers config
    text_encoder_configs: list[dict[str, Any]]  # transformers CLIP text configs, in order
    resolution: int  # image size of the base pipeline (SDXL's add_time_ids)
    projection_dim: int = 768
    cfg_scale: float | None = None  # CFG on the pooled mid-block features (None: off)
    # The diffusion pipeline whose latents the judge was trained on ({"source", "family",
    # "resolution", "latent_channels"}); SPO refuses a judge of another family. None: unknown.
    trained_on: dict[str, Any] | None = None
    kind: str = KIND
    version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, path: Path) -> LatentJudgeConfig:
        """Read and validate the config file, naming the first problem in one line."""
        return read_config_file(path, cls, KIND, FORMAT_VERSION)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def _text_encoder(config: dict[str, Any]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(config)
    cls_name = cfg.pop("_judge_class", "CLIPTextModel")
    cls = (
        CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
    )
    return cls(CLIPTextConfig.from_dict(cfg))


def _encoder_unet(config: dict[str, Any]) -> nn.Module:
    """A UNet2DConditionModel of `config` without its decoder half."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    for name in _UP_PARTS:
        delattr(unet, name)
    return unet


class LatentJudge(nn.Module):
    """Scores (noisy latent x_t, prompt, t); see the module docstring."""

    def __init__(
        self,
        config: LatentJudgeConfig,
        tokenizers: Sequence[Any],
        *,
        unet: nn.Module | None = None,
        text_encoders: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizers = list(tokenizers)
        self.unet = _encoder_unet(config.unet_config) if unet is None else unet
        encoders = text_encoders or [_text_encoder(c) for c in config.text_encoder_configs]
        self.text_encoders = nn.ModuleList(encoders)
        channels = list(config.unet_config["block_out_channels"])
        features = sum(channels) + channels[-1]
        self.image_projection = nn.Linear(features, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(self._text_width(), config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for layer in (self.image_projection, self.text_projection):
            nn.init.normal_(layer.weight, std=0.02)

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_pipeline(
        cls, pipe, *, projection_dim: int = 768, cfg_scale: float | None = None
    ) -> LatentJudge:
        """A judge whose UNet encoder and text encoder(s) start as copies of `pipe`'s (a
        diffusers SD1.5- or SDXL-family pipeline); the projections start random."""
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
        configs = []
        for encoder in encoders:
            cfg = encoder.config.to_dict()
            cfg["_judge_class"] = type(encoder).__name__
            configs.append(cfg)
        unet = copy.deepcopy(pipe.unet).float()
        for name in _UP_PARTS:
            delattr(unet, name)
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        config = LatentJudgeConfig(
            family="sdxl" if sdxl else "sd",
            unet_config=dict(pipe.unet.config),
            text_encoder_configs=configs,
            resolution=int(pipe.unet.config.sample_size) * vae_scale,
            projection_dim=projection_dim,
            cfg_scale=cfg_scale,
        )
        text = [copy.deepcopy(e).float() for e in encoders]
        judge = cls(config, tokenizers, unet=unet, text_encoders=text)
        return judge.to(pipe.unet.device).requires_grad_(True)

    def _text_width(self) -> int:
        last = self.text_encoders[-1]
        if self.config.family == "sdxl":
            return int(last.config.projection_dim)
        return int(last.config.hidden_size)

    # ------------------------------------------------------------------------------ saving

    def save(self, folder: str | Path) -> None:
        """Write `model.safetensors`, `latent_judge_config.json` and the tokenizer(s)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "kind": KIND})
        config = dataclasses.replace(self.config, unet_config=_jsonable(self.config.unet_config))
        (folder / CONFIG_NAME).write_text(config.to_json())
        for i, tokenizer in enumerate(self.tokenizers):
            tokenizer.save_pretrained(folder / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"))

    # ------------------------------------------------------------------------------ inputs

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, prompts: Sequence[str]) -> list[Tensor]:
        """Token ids per tokenizer, (N, max_length) each, on the judge's device."""
        return [
            t(
                list(prompts),
                padding="max_length",
                truncation=True,
                max_length=t.model_max_length,
                return_tensors="pt",
            ).input_ids.to(self.device)
            for t in self.tokenizers
        ]

    # ------------------------------------------------------------------------------ forward

    def _text(self, ids: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(cross-attention states, pooled feature for the projection, SDXL's pooled embed)."""
        if self.config.family == "sdxl":
            pairs = zip(self.text_encoders, ids, strict=True)
            outs = [e(i, output_hidden_states=True) for e, i in pairs]
            hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            pooled = outs[-1].text_embeds
            return hidden, pooled, pooled
        out = self.text_encoders[0](ids[0])
        return out.last_hidden_state, out.pooler_output, out.pooler_output

    def _pooled_features(
        self, x_t: Tensor, t: Tensor, hidden: Tensor, pooled_text: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Pooled output of each down stage, and of the mid block."""
        unet = self.unet
        x_t = x_t.to(unet.conv_in.weight.dtype)
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=t))
        if self.config.family == "sdxl":
            r = self.config.resolution
            ids = torch.tensor([r, r, 0, 0, r, r], dtype=x_t.dtype, device=x_t.device)
            added = {"text_embeds": pooled_text, "time_ids": ids.expand(len(x_t), -1)}
            emb = emb + unet.get_aug_embed(
                emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added
            )
        hidden = hidden.to(x_t.dtype)
        sample = unet.conv_in(x_t)
        stages = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
            stages.append(sample.float().mean(dim=(2, 3)))
        mid = unet.mid_block(sample, emb, encoder_hidden_states=hidden)
        return stages, mid.float().mean(dim=(2, 3))

    def image_features(self, x_t: Tensor, ids: list[Tensor], timesteps) -> Tensor:
        """Projected (unnormalised) features of noisy latents at step t, (N, D)."""
        t = torch.as_tensor(timesteps, device=x_t.device).flatten()
        t = t.expand(len(x_t)) if t.numel() == 1 else t
        hidden, _, pooled = self._text(ids)
        stages, mid = self._pooled_features(x_t, t, hidden, pooled)
        if self.config.cfg_scale is not None:
            empty = self.tokenize([""] * len(x_t))
            hidden_u, _, pooled_u = self._text(empty)
            _, mid_u = self._pooled_features(x_t, t, hidden_u, pooled_u)
            mid = mid_u + self.config.cfg_scale * (mid - mid_u)
        return self.image_projection(torch.cat([*stages, mid], dim=-1))

    def text_features(self, ids: list[Tensor]) -> Tensor:
        """Projected (unnormalised) text features, (N, D)."""
        _, pooled, _ = self._text(ids)
        return self.text_projection(pooled.float())

    def forward(self, x_t: Tensor, ids: list[Tensor], timesteps) -> Tensor:
        """`logits`, as the module's call (what DDP and other wrappers run)."""
        return self.logits(x_t, ids, timesteps)

    def logits(self, x_t: Tensor, ids: list[Tensor], timesteps) -> Tensor:
        """exp(logit_scale) * cos(latent i at t_i, prompt i), (N,). Differentiable."""
        image = F.normalize(self.image_features(x_t, ids, timesteps), dim=-1)
        text = F.normalize(self.text_features(ids), dim=-1)
        return self.logit_scale.exp() * (image * text).sum(dim=-1)

    @torch.no_grad()
    def score(self, latents: Tensor, prompts: Sequence[str], timesteps=0) -> Tensor:
        """The judge's score of each (scaled latent, prompt) at its timestep, float32 (N,);
        0 means a clean latent."""
        if len(latents) != len(prompts):
            raise ValueError(f"got {len(latents)} latents for {len(prompts)} prompts")
        return self.logits(latents.to(self.device), self.tokenize(prompts), timesteps).float()


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=list))


def restore_weights(
    folder: Path, build: Any, device: str | torch.device, dtype: torch.dtype | None
) -> nn.Module:
    """A judge built by `build()` on `device` with the weights of `folder` (whole, every
    tensor named and shaped as the judge's), in eval mode: what both latent judges' loaders
    share."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{folder}: weights file {WEIGHTS_NAME} is missing")
    check_safetensors(weights)
    with torch.device(device):
        judge = build()
    state = load_file(weights, device=str(device))
    check_state_dict(
        {k: tuple(v.shape) for k, v in judge.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
        str(weights),
    )
    judge.load_state_dict(state, strict=True)
    if dtype is not None:
        judge.to(dtype)
    return judge.eval()


def load_latent_judge(
    folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LatentJudge:
    """Rebuild a saved latent judge from its folder (no network); eval mode."""
    from transformers import CLIPTokenizer

    config = LatentJudgeConfig.from_json(folder / CONFIG_NAME)
    names = ["tokenizer"] + [
        f"tokenizer_{i + 1}" for i in range(1, len(config.text_encoder_configs))
    ]
    tokenizers = []
    for name in names:
        if not (folder / name).is_dir():
            raise CheckpointNotFoundError(f"{folder}: tokenizer folder {name}/ is missing")
        tokenizers.append(CLIPTokenizer.from_pretrained(folder / name))
    return restore_weights(folder, lambda: LatentJudge(config, tokenizers), device, dtype)

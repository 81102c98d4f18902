"""The latent judge of the transformer (flow-matching) families: scores the noisy latent itself.

method.md 6: the base model's own transformer, cut after its first N blocks (initialised from
the base pipeline and trained), reads (x_s, t = 1000 s, the prompt's conditioning); its image
tokens after block N are averaged and go through Linear(width, D, no bias); the family's pooled
text embedding (SD3: both CLIPs', 2048 wide; FLUX: CLIP-L's, 768) goes through Linear(.., D, no
bias); the score is exp(logit_scale) * cos(image, text). As the DiT latent reward models (SPEC
8), the judge reads the text conditioning the diffusion model itself is given, so it carries no
text encoder of its own (SD3.5's and FLUX's T5-XXL alone is 4.7B parameters): the caller
encodes the prompts with the base pipeline's frozen encoders.

How a family calls its transformer (SD3's pooled projections; FLUX's packed latents, ids and
guidance input) is the caller's: `bind` gives the judge that call, a function
(backbone, latents, timesteps, hidden, pooled) -> the backbone's output. The image tokens are
read by a hook on the last kept block, so any transformer whose blocks return
(text states, image states) works unchanged; the rest of its forward (the output norm and
projection) runs and is frozen.

Checkpoint folder: `model.safetensors` (keys `backbone.*`, `image_projection.*`,
`text_projection.*`, `logit_scale`) and `latent_judge_config.json` (kind
`transformer_latent_preference_model`). It loads with `preference_model.load(folder)`; the caller
binds the call before scoring.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from preference_model.errors import CheckpointError, read_config_file
from preference_model.latent import restore_weights

KIND = "transformer_latent_preference_model"
FORMAT_VERSION = 1
CONFIG_NAME = "latent_judge_config.json"  # one file name for both latent judges (judge=latent)
WEIGHTS_NAME = "model.safetensors"
# block lists after the first one (FLUX's single-stream blocks): not kept
_LATER_BLOCKS = ("single_transformer_blocks",)
# parts of the forward after the blocks: they run, but no score depends on them
_OUTPUT_PARTS = ("norm_out", "proj_out")

# (backbone, latents, timesteps (1000 s), hidden states, pooled embedding) -> backbone output
BackboneCall = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor], Any]


@dataclasses.dataclass
class TransformerJudgeConfig:
    """Everything `latent_judge_config.json` holds for this judge: enough to rebuild it."""

    transformer_class: str  # the diffusers class of the base transformer
    transformer_config: dict[str, Any]  # its diffusers config
    blocks: int  # the first N blocks kept
    projection_dim: int = 768
    # The pipeline whose latents the judge was trained on ({"source", "family", "resolution",
    # "latent_channels"}); SPO refuses a judge of another family. None: unknown.
    trained_on: dict[str, Any] | None = None
    kind: str = KIND
    version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, path: Path) -> TransformerJudgeConfig:
        return read_config_file(path, cls, KIND, FORMAT_VERSION)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def _truncate(transformer: nn.Module, blocks: int) -> nn.Module:
    """`transformer` keeping its first `blocks` blocks, no later block list, and its output
    parts frozen."""
    available = len(transformer.transformer_blocks)
    if not 1 <= blocks <= available:
        raise ValueError(f"latent judge blocks must be in [1, {available}], got {blocks}")
    transformer.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:blocks])
    for name in _LATER_BLOCKS:
        if hasattr(transformer, name):
            setattr(transformer, name, nn.ModuleList())
    for name in _OUTPUT_PARTS:
        getattr(transformer, name).requires_grad_(False)
    return transformer


def _build_transformer(class_name: str, config: dict[str, Any]) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise CheckpointError(f"unknown transformer class {class_name!r} in the judge's config")
    return cls.from_config(config)


class TransformerJudge(nn.Module):
    """Scores (noisy latent x_s, the prompt's conditioning, t = 1000 s); see the module
    docstring."""

    def __init__(self, config: TransformerJudgeConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if backbone is None:
            backbone = _build_transformer(config.transformer_class, config.transformer_config)
            backbone = _truncate(backbone, config.blocks)
        self.backbone = backbone
        c = config.transformer_config
        width = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
        self.image_projection = nn.Linear(width, config.projection_dim, bias=False)
        pooled = int(c["pooled_projection_dim"])
        self.text_projection = nn.Linear(pooled, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for layer in (self.image_projection, self.text_projection):
            nn.init.normal_(layer.weight, std=0.02)
        self._call: BackboneCall | None = None
        self._tokens: list[Tensor] = []
        self.backbone.transformer_blocks[-1].register_forward_hook(self._keep_image_tokens)

    def _keep_image_tokens(self, module: nn.Module, args: Any, output: Any) -> None:
        self._tokens.append(output[1])  # a block returns (text states, image states)

    @classmethod
    def from_pipeline(
        cls, pipe: Any, *, blocks: int | None, projection_dim: int = 768
    ) -> TransformerJudge:
        """A judge whose backbone starts as the first `blocks` blocks of `pipe.transformer`
        (None: half of them); the projections start random."""
        transformer = pipe.transformer
        n = len(transformer.transformer_blocks)
        blocks = max(1, n // 2) if blocks is None else blocks
        config = TransformerJudgeConfig(
            transformer_class=type(transformer).__name__,
            transformer_config=json.loads(json.dumps(dict(transformer.config), default=list)),
            blocks=blocks,
            projection_dim=projection_dim,
        )
        backbone = _truncate(copy.deepcopy(transformer).float(), blocks)
        judge = cls(config, backbone)
        return judge.to(transformer.device).requires_grad_(True).apply_frozen()

    def apply_frozen(self) -> TransformerJudge:
        """Freeze the output parts again (after a blanket `requires_grad_`)."""
        for name in _OUTPUT_PARTS:
            getattr(self.backbone, name).requires_grad_(False)
        return self

    def bind(self, call: BackboneCall) -> TransformerJudge:
        """How the base model's family calls its transformer (see the module docstring)."""
        self._call = call
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ------------------------------------------------------------------------------ forward

    def image_features(self, x_t: Tensor, text: tuple[Tensor, Tensor], timesteps) -> Tensor:
        """Projected (unnormalised) features of noisy latents at t, (N, D)."""
        if self._call is None:
            raise RuntimeError("bind the family's transformer call before scoring")
        t = torch.as_tensor(timesteps, device=x_t.device, dtype=torch.float32).flatten()
        t = t.expand(len(x_t)) if t.numel() == 1 else t
        dtype = self.image_projection.weight.dtype
        hidden, pooled = (part.to(self.device, dtype) for part in text)
        self._tokens.clear()
        self._call(self.backbone, x_t.to(self.device, dtype), t, hidden, pooled)
        tokens = self._tokens.pop()
        self._tokens.clear()
        return self.image_projection(tokens.mean(dim=1).to(dtype))

    def text_features(self, text: tuple[Tensor, Tensor]) -> Tensor:
        """Projected (unnormalised) pooled text features, (N, D)."""
        pooled = text[1].to(self.device, self.text_projection.weight.dtype)
        return self.text_projection(pooled)

    def forward(self, x_t: Tensor, text: tuple[Tensor, Tensor], timesteps) -> Tensor:
        """`logits`, as the module's call (what DDP and other wrappers run)."""
        return self.logits(x_t, text, timesteps)

    def logits(self, x_t: Tensor, text: tuple[Tensor, Tensor], timesteps) -> Tensor:
        """exp(logit_scale) * cos(latent i at t_i, prompt i), (N,). Differentiable."""
        image = F.normalize(self.image_features(x_t, text, timesteps).float(), dim=-1)
        words = F.normalize(self.text_features(text).float(), dim=-1)
        return self.logit_scale.exp() * (image * words).sum(dim=-1)

    @torch.no_grad()
    def score(self, latents: Tensor, text: tuple[Tensor, Tensor], timesteps=0) -> Tensor:
        """The judge's score of each (scaled latent, conditioning) at its timestep (1000 s;
        0 a clean latent), float32 (N,)."""
        if len(latents) != len(text[1]):
            raise ValueError(f"got {len(latents)} latents for {len(text[1])} prompts")
        return self.logits(latents, text, timesteps).float()

    # ------------------------------------------------------------------------------ saving

    def save(self, folder: str | Path) -> None:
        """Write `model.safetensors` and `latent_judge_config.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "kind": KIND})
        (folder / CONFIG_NAME).write_text(self.config.to_json())


def load_transformer_judge(
    folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TransformerJudge:
    """Rebuild a saved transformer latent judge from its folder (no network); eval mode,
    unbound."""
    config = TransformerJudgeConfig.from_json(folder / CONFIG_NAME)
    return restore_weights(folder, lambda: TransformerJudge(config), device, dtype)

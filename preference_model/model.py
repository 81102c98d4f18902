"""The step-aware preference model (SPM): a CLIP scorer whose image tower knows the timestep.

method.md section 2. A CLIP ViT backbone (PickScore_v1, or any open_clip ViT) gets a sinusoidal
timestep embedding -> Linear -> SiLU -> Linear(width), and DiT-style adaLN modulation in every
vision transformer block and once more after the final layer norm of the pooled token:

    x = x + gate1 * Attn(LN1(x) * (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN2(x) * (1 + scale2) + shift2)
    pooled = LN_post(pooled) * (1 + scale) + shift

The modulation layers start at zero with the two gate biases at one, so an untrained SPM is
exactly its backbone at every t. The text tower is the backbone's, unchanged.

The forward pass over the vision tower is our own loop over the backbone's submodules (the two
libraries' block forwards cannot take a modulation), so the backbone's parameter names are kept
and real checkpoints (PickScore_v1, open_clip ViT-H-14) load as they are.

Checkpoint folder: `model.safetensors` (backbone + time conditioning, keys `backbone.*`,
`time_embed.*`, `block_modulations.*`, `final_modulation.*`), `spm_config.json` (SPMConfig) and,
for transformers backbones with their own tokenizer, the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as read_open_clip_state_dict
from open_clip.transformer import VisionTransformer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from preference_model.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    check_safetensors,
    check_state_dict,
    read_config_file,
)
from preference_model.latent import CONFIG_NAME as LATENT_CONFIG_NAME
from preference_model.latent import LatentJudge, load_latent_judge
from preference_model.transformer_judge import KIND as TRANSFORMER_KIND
from preference_model.transformer_judge import TransformerJudge, load_transformer_judge
from preference_model.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    preprocess_images,
)

KIND = "step_aware_preference_model"
FORMAT_VERSION = 1
CONFIG_NAME = "spm_config.json"
WEIGHTS_NAME = "model.safetensors"
TOY_BACKBONE_DIR = Path(__file__).parent / "toy_backbone"

Family = Literal["open_clip", "hf_clip"]
ValueRange = Literal["0-1", "-1-1"]
Timesteps = int | float | Sequence[int | float] | Tensor
Images = Tensor | Sequence[Image.Image]


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps, shape (N,) -> (N, dim), float32.

    DiT / diffusers convention (`flip_sin_to_cos=True`, shift 0): the cosine half first, then the
    sine half, frequencies max_period ** (-i / (dim // 2)) for i < dim // 2; an odd dim gets a
    trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def pickscore_clip_config() -> CLIPConfig:
    """The CLIPConfig of PickScore_v1 (CLIP ViT-H/14), for random-weight tests and benchmarks."""
    return CLIPConfig(
        text_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=16,
            num_hidden_layers=32,
            patch_size=14,
            image_size=224,
            hidden_act="gelu",
        ),
        projection_dim=1024,
    )


@dataclasses.dataclass
class SPMConfig:
    """Everything `spm_config.json` holds: enough to rebuild the model with no network.

    `backbone` records where the backbone came from (an open_clip model name, a transformers
    checkpoint name or folder, or the config dict itself); `backbone_config` is the resolved
    architecture (open_clip model config dict, or `CLIPConfig.to_dict()`), which is what loading
    uses.
    """

    backbone_family: Family
    backbone: str | dict[str, Any]
    backbone_config: dict[str, Any]
    image_size: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    time_conditioning: bool = True
    # Resize images to image_size with antialiasing (the backbones' own processors do); the
    # released SPM trains and is used without. Missing in older files: true, as they trained.
    antialias: bool = True
    timestep_embed_dim: int = 256
    timestep_max_period: float = 10000
    # The diffusion pipeline whose x0_hat the SPM was trained on ({"source", "family",
    # "resolution", "latent_channels"}); SPO refuses an SPM of another family. None: unknown.
    trained_on: dict[str, Any] | None = None
    kind: str = KIND
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.backbone_family not in ("open_clip", "hf_clip"):
            raise CheckpointError(
                f"backbone_family must be 'open_clip' or 'hf_clip', got {self.backbone_family!r}"
            )
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    @classmethod
    def from_json(cls, path: Path) -> SPMConfig:
        """Read and validate the config file, naming the first problem in one line."""
        return read_config_file(path, cls, KIND, FORMAT_VERSION)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


class _OpenClipTower:
    """The vision-tower pieces of an open_clip CLIP / CustomTextCLIP, in backbone order."""

    def __init__(self, backbone: nn.Module) -> None:
        visual = backbone.visual
        if not isinstance(visual, VisionTransformer):
            raise CheckpointError(
                f"open_clip backbone must have a ViT image tower, got {type(visual).__name__}"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise CheckpointError(
                "open_clip image towers with attentional or no pooling are not supported"
            )
        if not visual.transformer.batch_first:
            raise CheckpointError("open_clip image tower must be batch-first")
        self.backbone = backbone
        self.visual = visual
        self.width: int = visual.transformer.width
        self.blocks: nn.ModuleList = visual.transformer.resblocks

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def embed(self, pixel_values: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(pixel_values.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls_token = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    @staticmethod
    def norm1(block: nn.Module, x: Tensor) -> Tensor:
        return block.ln_1(x)

    @staticmethod
    def norm2(block: nn.Module, x: Tensor) -> Tensor:
        return block.ln_2(x)

    @staticmethod
    def attention(block: nn.Module, h: Tensor) -> Tensor:
        if isinstance(block.attn, nn.MultiheadAttention):
            out = block.attn(h, h, h, need_weights=False)[0]
        else:  # open_clip's own Attention (custom blocks: qk-norm, scaled cosine, ...)
            out = block.ln_attn(block.attn(h))
        return block.ls_1(out)

    @staticmethod
    def mlp(block: nn.Module, h: Tensor) -> Tensor:
        return block.ls_2(block.mlp(h))

    def _global_pool(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.visual.pool_type == "tok" else x[:, 1:].mean(dim=1)

    def pool(self, x: Tensor) -> Tensor:
        if self.visual.final_ln_after_pool:
            return self.visual.ln_post(self._global_pool(x))
        return self._global_pool(self.visual.ln_post(x))

    def project(self, pooled: Tensor) -> Tensor:
        return pooled if self.visual.proj is None else pooled @ self.visual.proj

    def text_features(self, input_ids: Tensor) -> Tensor:
        return self.backbone.encode_text(input_ids)


class _HFClipTower:
    """The vision-tower pieces of a transformers CLIPModel, in backbone order."""

    def __init__(self, backbone: CLIPModel) -> None:
        self.backbone = backbone
        self.vision = backbone.vision_model
        self.width: int = backbone.config.vision_config.hidden_size
        self.blocks: nn.ModuleList = self.vision.encoder.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))

    @staticmethod
    def norm1(block: nn.Module, x: Tensor) -> Tensor:
        return block.layer_norm1(x)

    @staticmethod
    def norm2(block: nn.Module, x: Tensor) -> Tensor:
        return block.layer_norm2(x)

    @staticmethod
    def attention(block: nn.Module, h: Tensor) -> Tensor:
        return block.self_attn(hidden_states=h)[0]

    @staticmethod
    def mlp(block: nn.Module, h: Tensor) -> Tensor:
        return block.mlp(h)

    def pool(self, x: Tensor) -> Tensor:
        return self.vision.post_layernorm(x[:, 0])

    def project(self, pooled: Tensor) -> Tensor:
        return self.backbone.visual_projection(pooled)

    def text_features(self, input_ids: Tensor) -> Tensor:
        pooled = self.backbone.text_model(input_ids=input_ids).pooler_output
        return self.backbone.text_projection(pooled)


def _build_backbone(config: SPMConfig) -> nn.Module:
    """A randomly initialised backbone from the resolved architecture in `config`."""
    if config.backbone_family == "hf_clip":
        return CLIPModel(CLIPConfig.from_dict(config.backbone_config))
    cfg = dict(config.backbone_config)
    if "multimodal_cfg" in cfg:
        raise CheckpointError("open_clip CoCa models are not supported as SPM backbones")
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def _tokenizer_for(config: SPMConfig, folder: Path | None) -> Callable[[list[str]], Tensor]:
    """The backbone's tokenizer as `prompts -> LongTensor (N, context_length)`.

    transformers backbones use the CLIPTokenizer saved next to the weights when there is one,
    otherwise open_clip's offline CLIP BPE tokenizer, which gives the same ids (PickScore_v1 ships
    no tokenizer; its processor is the plain CLIP ViT-H one). Padding never reaches the pooled
    text feature: CLIP text towers are causal and pool at the end-of-text token.
    """
    if config.backbone_family == "hf_clip":
        length = config.backbone_config["text_config"]["max_position_embeddings"]
        if folder is not None and _has_tokenizer_files(folder):
            tokenizer = CLIPTokenizer.from_pretrained(folder)
            return lambda prompts: (
                tokenizer(
                    prompts,
                    padding="max_length",
                    truncation=True,
                    max_length=length,
                    return_tensors="pt",
                ).input_ids
            )
        return open_clip.SimpleTokenizer(context_length=length)
    if isinstance(config.backbone, str):
        return open_clip.get_tokenizer(config.backbone)
    text_cfg = config.backbone_config.get("text_cfg", {})
    length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=length)
    return open_clip.SimpleTokenizer(context_length=length)


class StepAwarePreferenceModel(nn.Module):
    """CLIP scorer conditioned on the diffusion timestep (method.md section 2).

    Build with `from_open_clip` / `from_hf_clip`, reload with `preference_model.load(dir)`.
    With `time_conditioning=False` (the paper's ablation) the model is exactly its backbone and
    timesteps are accepted and ignored.
    """

    def __init__(
        self,
        config: SPMConfig,
        backbone: nn.Module | None = None,
        tokenizer_folder: Path | None = None,
    ) -> None:
        """Wrap `backbone` (random-initialised from `config` when None).

        `tokenizer_folder` is where a transformers backbone's tokenizer files are, if any.
        """
        super().__init__()
        self.config = config
        self.backbone = _build_backbone(config) if backbone is None else backbone
        self._tower = (
            _HFClipTower(self.backbone)
            if config.backbone_family == "hf_clip"
            else _OpenClipTower(self.backbone)
        )
        self._tokenizer_folder = tokenizer_folder
        self._tokenize: Callable[[list[str]], Tensor] | None = None
        if config.time_conditioning:
            width = self._tower.width
            self.time_embed = nn.Sequential(
                nn.Linear(config.timestep_embed_dim, width), nn.SiLU(), nn.Linear(width, width)
            )
            self.block_modulations = nn.ModuleList(
                nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) for _ in self._tower.blocks
            )
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
            self.reset_time_conditioning()

    # ----------------------------------------------------------------------------- building

    @classmethod
    def from_open_clip(
        cls,
        model: str | dict[str, Any] | Path,
        pretrained: str | Path | None = None,
        *,
        time_conditioning: bool = True,
    ) -> StepAwarePreferenceModel:
        """An SPM on an open_clip ViT.

        `model`: an architecture name open_clip knows ("ViT-H-14"), a model-config dict, or the
        path of such a JSON file. `pretrained`: a weights file (.safetensors / .bin / .pt) or an
        open_clip pretrained tag (downloaded by open_clip; its mean/std are used); None keeps the
        random initialisation.
        """
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        if isinstance(model, Path) or (isinstance(model, str) and model.endswith(".json")):
            model = json.loads(Path(model).read_text())
            model = model.get("model_cfg", model)  # open_clip_config.json nests it
        if isinstance(model, dict):
            model_cfg = model
        else:
            model_cfg = open_clip.get_model_config(model)
            if model_cfg is None:
                raise ValueError(f"open_clip does not know the model {model!r}")
        weights = None
        if pretrained is not None:
            if Path(pretrained).is_file():
                weights = Path(pretrained)
            elif isinstance(model, str) and open_clip.get_pretrained_cfg(model, str(pretrained)):
                tag_cfg = open_clip.get_pretrained_cfg(model, str(pretrained))
                mean, std = tag_cfg.get("mean", mean), tag_cfg.get("std", std)
                if tag_cfg.get("quick_gelu"):
                    model_cfg["quick_gelu"] = True
                weights = Path(open_clip.download_pretrained(tag_cfg))
            else:
                name = model if isinstance(model, str) else "a custom config"
                raise FileNotFoundError(
                    f"{pretrained}: neither a weights file nor an open_clip tag of {name}"
                )
        image_size = model_cfg["vision_cfg"].get("image_size", 224)
        if not isinstance(image_size, int):
            height, width = image_size
            if height != width:
                raise ValueError(f"non-square open_clip image size {image_size} not supported")
            image_size = height
        config = SPMConfig(
            backbone_family="open_clip",
            backbone=model,
            backbone_config=model_cfg,
            image_size=image_size,
            image_mean=mean,
            image_std=std,
            time_conditioning=time_conditioning,
        )
        spm = cls(config)
        if weights is not None:
            spm.load_backbone_state_dict(read_open_clip_state_dict(str(weights)))
        return spm

    @classmethod
    def from_hf_clip(
        cls,
        model: str | Path | CLIPConfig | dict[str, Any],
        *,
        tokenizer: str | Path | None = None,
        time_conditioning: bool = True,
    ) -> StepAwarePreferenceModel:
        """An SPM on a transformers CLIPModel.

        `model`: a checkpoint folder or hub name ("yuvalkirstain/PickScore_v1"), loaded with
        `CLIPModel.from_pretrained`; or a CLIPConfig / dict for a randomly initialised one.
        `tokenizer`: a local folder with CLIPTokenizer files (default: the checkpoint folder if
        it has them, else the offline CLIP BPE tokenizer, which gives the same ids). Mean/std come
        from the folder's `preprocessor_config.json` if present, else CLIP's.
        """
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        backbone = None
        if isinstance(model, CLIPConfig | dict):
            clip_config = model if isinstance(model, CLIPConfig) else CLIPConfig.from_dict(model)
            source: str | dict[str, Any] = clip_config.to_dict()
        else:
            backbone = CLIPModel.from_pretrained(model)
            clip_config, source = backbone.config, str(model)
            processor_file = Path(model) / "preprocessor_config.json"
            if processor_file.is_file():
                processor = json.loads(processor_file.read_text())
                mean = processor.get("image_mean", mean)
                std = processor.get("image_std", std)
            if tokenizer is None and _has_tokenizer_files(Path(model)):
                tokenizer = model
        if tokenizer is not None and not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"{tokenizer}: no such tokenizer folder")
        config = SPMConfig(
            backbone_family="hf_clip",
            backbone=source,
            backbone_config=clip_config.to_dict(),
            image_size=clip_config.vision_config.image_size,
            image_mean=mean,
            image_std=std,
            time_conditioning=time_conditioning,
        )
        return cls(config, backbone, Path(tokenizer) if tokenizer is not None else None)

    @torch.no_grad()
    def reset_time_conditioning(self) -> None:
        """Make the model its backbone: modulations 0, gate biases 1, final modulation 0.

        The timestep MLP gets DiT's N(0, 0.02) weights and zero biases; it has no effect until
        the modulations move away from zero. Without time conditioning there is nothing to do.
        """
        if not self.time_conditioning:
            return
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        width = self._tower.width
        for modulation in self.block_modulations:
            linear = modulation[1]
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            linear.bias[2 * width : 3 * width] = 1  # gate of the attention branch
            linear.bias[5 * width : 6 * width] = 1  # gate of the MLP branch
        nn.init.zeros_(self.final_modulation[1].weight)
        nn.init.zeros_(self.final_modulation[1].bias)

    def load_backbone_state_dict(self, state_dict: dict[str, Tensor], assign: bool = False) -> None:
        """Load backbone weights with the backbone library's own key names.

        A PickScore_v1 / CLIPModel state dict (old ones carry `*.position_ids`, dropped) or an
        open_clip one (a DDP `module.` prefix is dropped). Any other missing, unexpected or
        mis-shaped key raises CheckpointError naming it.
        """
        if state_dict and next(iter(state_dict)).startswith("module."):
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        expected = self.backbone.state_dict()
        state_dict = {
            k: v
            for k, v in state_dict.items()
            if k in expected or not k.endswith("embeddings.position_ids")
        }
        check_state_dict(
            {k: tuple(v.shape) for k, v in expected.items()},
            {k: tuple(v.shape) for k, v in state_dict.items()},
            "backbone state dict",
        )
        self.backbone.load_state_dict(state_dict, strict=True, assign=assign)

    # ----------------------------------------------------------------------------- saving

    def save(self, folder: str | Path) -> None:
        """Write `model.safetensors`, `spm_config.json` and any tokenizer files to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "kind": KIND})
        (folder / CONFIG_NAME).write_text(self.config.to_json())
        source = self._tokenizer_folder
        if (
            self.config.backbone_family == "hf_clip"
            and source is not None
            and _has_tokenizer_files(source)
            and source.resolve() != folder.resolve()
        ):
            CLIPTokenizer.from_pretrained(source).save_pretrained(folder)

    # ----------------------------------------------------------------------------- inputs

    @property
    def time_conditioning(self) -> bool:
        return self.config.time_conditioning

    @property
    def device(self) -> torch.device:
        return self.backbone.logit_scale.device

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> LongTensor (N, context_length) for `text_features`, on the model's device."""
        if self._tokenize is None:
            self._tokenize = _tokenizer_for(self.config, self._tokenizer_folder)
        return self._tokenize(list(prompts)).to(self.device)

    def preprocess(self, images: Images, value_range: ValueRange = "0-1") -> Tensor:
        """Images -> normalised pixel values (N, 3, S, S) for `image_features`. Differentiable.

        `images`: PIL images, or a float tensor (N, 3, H, W) in [0, 1] (`value_range="0-1"`) or
        [-1, 1] (`"-1-1"`, what a VAE decodes to). Values outside the range are clamped. The
        shorter side is resized to the backbone's input size S (bicubic, antialiased unless
        `config.antialias` is off), the centre cropped to S x S, then normalised with the
        backbone's mean and std.
        """
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
            if value_range == "-1-1":
                images = (images + 1) / 2
            elif value_range != "0-1":
                raise ValueError(f"value_range must be '0-1' or '-1-1', got {value_range!r}")
            elif images.detach().amin() < -0.5:
                raise ValueError("images go below -0.5 with value_range='0-1'; pass '-1-1'")
            pixels = preprocess_images(images.to(self.device, torch.float32), self.transform)
        else:
            pixels = torch.cat(
                [preprocess_images(self._pil_to_tensor(im), self.transform) for im in images]
            )
        # Normalised in float32 whatever the model's dtype, as the libraries' processors do.
        return pixels.to(self._tower.dtype)

    @property
    def transform(self) -> ImageTransform:
        """Shorter side to the backbone's input size (bicubic, antialiased unless
        `config.antialias` is off), centre crop, the backbone's mean and std."""
        c = self.config
        return ImageTransform(
            c.image_size, tuple(c.image_mean), tuple(c.image_std), antialias=c.antialias
        )

    def _pil_to_tensor(self, image: Image.Image) -> Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255

    def _timesteps(self, timesteps: Timesteps, n: int) -> Tensor:
        t = torch.as_tensor(timesteps, device=self.device).flatten()
        if t.numel() == 1:
            return t.expand(n)
        if t.numel() != n:
            raise ValueError(f"got {t.numel()} timesteps for {n} images")
        return t

    # ----------------------------------------------------------------------------- forward

    def image_features(self, pixel_values: Tensor, timesteps: Timesteps) -> Tensor:
        """Projected (unnormalised) image features of preprocessed pixels at step t, (N, D)."""
        tower = self._tower
        x = tower.embed(pixel_values)
        if not self.time_conditioning:
            for block in tower.blocks:
                x = x + tower.attention(block, tower.norm1(block, x))
                x = x + tower.mlp(block, tower.norm2(block, x))
            return tower.project(tower.pool(x))
        t = self._timesteps(timesteps, x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        c = self.time_embed(
            timestep_embedding(
                t, self.config.timestep_embed_dim, self.config.timestep_max_period
            ).to(dtype)
        )
        for block, modulation in zip(tower.blocks, self.block_modulations, strict=True):
            shift1, scale1, gate1, shift2, scale2, gate2 = modulation(c)[:, None].chunk(6, dim=-1)
            x = x + gate1 * tower.attention(block, tower.norm1(block, x) * (1 + scale1) + shift1)
            x = x + gate2 * tower.mlp(block, tower.norm2(block, x) * (1 + scale2) + shift2)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return tower.project(tower.pool(x) * (1 + scale) + shift)

    def text_features(self, input_ids: Tensor) -> Tensor:
        """Projected (unnormalised) text features of token ids, (N, D); the backbone's own."""
        return self._tower.text_features(input_ids)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, timesteps: Timesteps) -> Tensor:
        """`logits`, as the module's call (what DDP and other wrappers run)."""
        return self.logits(pixel_values, input_ids, timesteps)

    def logits(self, pixel_values: Tensor, input_ids: Tensor, timesteps: Timesteps) -> Tensor:
        """exp(logit_scale) * cos(image i at t_i, text i), one per pair, (N,). Differentiable."""
        image = F.normalize(self.image_features(pixel_values, timesteps), dim=-1)
        text = F.normalize(self.text_features(input_ids), dim=-1)
        return self.backbone.logit_scale.exp() * (image * text).sum(dim=-1)

    @torch.no_grad()
    def score(
        self,
        images: Images,
        prompts: Sequence[str],
        timesteps: Timesteps = 0,
        value_range: ValueRange = "0-1",
    ) -> Tensor:
        """The SPM score s(image_i, prompt_i, t_i) of each pair, float32 (N,).

        `timesteps`: one for all pairs or one per pair; 0 means a clean image.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        pixels = self.preprocess(images, value_range)
        return self.logits(pixels, self.tokenize(prompts), timesteps).float()


def _config_kind(path: Path) -> str | None:
    """The `kind` a judge config file names (None: unreadable; its loader says why)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def load(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> StepAwarePreferenceModel | LatentJudge | TransformerJudge:
    """Rebuild a saved step-aware judge from its folder, with no network; eval mode: the SPM
    (pixel judge) or, for a folder with `latent_judge_config.json`, the latent judge (of a
    UNet, or of a transformer family by the config's `kind`: bind its call before scoring).

    Raises CheckpointNotFoundError (no folder, no weights file) or CheckpointError (not an SPM
    folder, another kind, a missing / unexpected / mis-shaped weight), each with a one-line
    message.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: no such SPM checkpoint folder")
    config_file = folder / CONFIG_NAME
    if (folder / LATENT_CONFIG_NAME).is_file():
        if _config_kind(folder / LATENT_CONFIG_NAME) == TRANSFORMER_KIND:
            return load_transformer_judge(folder, device, dtype)
        return load_latent_judge(folder, device, dtype)
    if not config_file.is_file():
        hint = ""
        if (folder / "model_index.json").is_file():
            hint = "; it is a diffusers pipeline"
        elif (folder / "config.json").is_file():
            hint = (
                "; it looks like a transformers model (use StepAwarePreferenceModel.from_hf_clip)"
            )
        raise CheckpointError(
            f"{folder} is not a step-aware preference model checkpoint (no {CONFIG_NAME}{hint})"
        )
    config = SPMConfig.from_json(config_file)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{folder}: weights file {WEIGHTS_NAME} is missing")
    check_safetensors(weights)
    with torch.device(device):
        model = StepAwarePreferenceModel(config, tokenizer_folder=folder)
    with safe_open(weights, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    check_state_dict(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, str(weights)
    )
    model.load_state_dict(load_file(weights, device=str(device)), strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def toy_spm(time_conditioning: bool = True) -> StepAwarePreferenceModel:
    """The shipped toy CLIP (the toy world's stand-in for PickScore_v1) as an SPM: equal to
    that CLIP at every t until trained."""
    config = TOY_BACKBONE_DIR / "open_clip_config.json"
    if not config.is_file():
        raise CheckpointNotFoundError(f"the shipped toy backbone is missing: {config}")
    return StepAwarePreferenceModel.from_open_clip(
        config,
        TOY_BACKBONE_DIR / "open_clip_model.safetensors",
        time_conditioning=time_conditioning,
    )

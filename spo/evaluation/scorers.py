"""Scorers behind one interface: `score(images, prompts) -> tensor (N,)`, higher is better.

Why a registry: the DPO trainer's AI-feedback relabelling and the evaluation both name a scorer
by a short spec (`oracle`, `spm:runs/toy/spm/final`, `pickscore:yuvalkirstain/PickScore_v1`,
`hpsv2:weights/HPS_v2.1_compressed.pt`, ...), and each is built only when asked for, so its
weights are loaded (and checked) once. `images` are float tensors (N, 3, H, W) in [0, 1].

The evaluation scorers of SPEC.md section 4 (each in its own small builder below):

- `pickscore:<folder or hub name>`: exp(logit_scale) * cos (PickScore_v1).
- `hpsv2:<weights file, folder or hub repo>`: HPSv2.1, cos of open_clip ViT-H-14 features.
- `aesthetic:<MLP weights>[,<CLIP ViT-L/14 weights file or open_clip tag>]`: LAION aesthetic
  predictor v2, an MLP on the L2-normalised CLIP ViT-L/14 image embedding, about 1..10.
- `clip:<open_clip model name or config .json>[@<weights file or open_clip tag>]`: CLIP score,
  100 * max(cos, 0).
- `imagereward:<ImageReward-v1.0, weights file or folder>`: needs the `image-reward` package.

A local weights path that does not exist is a one-line ConfigError before anything is built.
Image preprocessing (resize, crop or pad, normalise) is one helper, `preprocess_images`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spo.config import ConfigError

Scorer = Callable[[Tensor, Sequence[str]], Tensor]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The real architectures and file names (tests point the architectures at tiny configs).
HPS_ARCH = "ViT-H-14"
HPS_FILENAME = "HPS_v2.1_compressed.pt"
AESTHETIC_ARCH = "ViT-L-14"
AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_EMBED_DIM = 768
IMAGEREWARD_NAMES = ("ImageReward-v1.0",)
IMAGEREWARD_FILENAME = "ImageReward.pt"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """How a model wants its pixels, in open_clip's terms.

    `resize_mode`: "shortest" resizes the shorter side to `size` and centre-crops (the CLIP /
    open_clip / ImageReward eval transform); "longest" resizes the longer side to `size` and pads
    the rest with black, centred (open_clip's ResizeMaxSize, HPSv2's eval transform); "squash"
    resizes both sides to `size`. Resizing is antialiased, as PIL's is.
    """

    size: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: str = "bicubic"


def preprocess_images(images: Tensor, transform: ImageTransform) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> normalised float32 pixels (N, 3, size, size)."""
    images = images.float().clamp(0, 1)
    size, (height, width) = transform.size, images.shape[-2:]
    if transform.resize_mode == "squash":
        new_h, new_w = size, size
    elif transform.resize_mode == "shortest":
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    else:
        scale = size / max(height, width)
        new_h, new_w = min(size, round(height * scale)), min(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        smooth = transform.interpolation in ("bilinear", "bicubic")
        images = F.interpolate(
            images,
            size=(new_h, new_w),
            mode=transform.interpolation,
            align_corners=False if smooth else None,
            antialias=smooth,
        ).clamp(0, 1)
    if new_h > size or new_w > size:  # centre crop, torchvision's rounding
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        images = images[..., top : top + size, left : left + size]
    elif new_h < size or new_w < size:  # centred black padding
        pad_h, pad_w = size - new_h, size - new_w
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(transform.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(transform.std, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------- scorers


class OracleScorer:
    """The toy world's oracle reward R in [0, 1] (the ground truth of the toy world)."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from spo.toy.oracle import rewards

        arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(rewards(arrays, list(prompts))).float()


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


class BatchedScorer:
    """The shared loop: input checks, chunks of `batch_size` on `device`, no autograd, float32
    scores (N,) on the CPU. Subclasses define `score_batch(pixels, prompts)` on preprocessed
    pixels."""

    transform: ImageTransform

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = list(prompts)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        out = [torch.zeros(0)]
        for i in range(0, len(prompts), self.batch_size):
            chunk = images[i : i + self.batch_size].to(self.device)
            pixels = preprocess_images(chunk, self.transform)
            scores = self.score_batch(pixels, prompts[i : i + self.batch_size])
            out.append(scores.float().cpu())
        return torch.cat(out)

    def score_batch(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


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
        image = self.model.encode_image(pixels.to(_model_dtype(self.model)))
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        cos = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
        return self.scale * (cos.clamp(min=0) if self.clamp_negative else cos)


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
        embedding = self.model.encode_image(pixels.to(_model_dtype(self.model)))
        embedding = F.normalize(embedding.float(), dim=-1)
        return self.mlp(embedding.to(_model_dtype(self.mlp))).squeeze(-1)


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
        image_embeds = blip.visual_encoder(pixels.to(_model_dtype(blip.visual_encoder)))
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


# ----------------------------------------------------------------------------- loading


def _weights_file(source: str, default_name: str, what: str) -> Path:
    """A local weights file (or a folder holding `default_name`), or `default_name` fetched
    from the hub repo `source` (`org/repo`). A missing local path is a one-line ConfigError."""
    from spo.models import is_local_path

    if is_local_path(source):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / default_name
        if not path.is_file():
            raise ConfigError(f"{what} weights file not found: {path}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, default_name))
    except Exception as err:
        raise ConfigError(
            f"cannot fetch {default_name} ({what}) from the hub repo {source}: {_first_line(err)}"
        ) from None


def unwrap_state_dict(checkpoint: Any) -> dict[str, Tensor]:
    """A state dict from what a weights file holds: a plain state dict, a training checkpoint
    `{"state_dict": ...}` (HPSv2's files), or a TorchScript module (OpenAI's CLIP files, whose
    non-weight entries are dropped); a DDP `module.` prefix is stripped."""
    if isinstance(checkpoint, torch.jit.ScriptModule):
        checkpoint = checkpoint.state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            checkpoint.pop(key, None)
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"expected a state dict, got {type(checkpoint).__name__}")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return dict(checkpoint)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors / torch file (`weights_only`), or of a TorchScript archive."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return unwrap_state_dict(load_file(path))
        try:
            return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            try:  # OpenAI's CLIP files are TorchScript archives
                return unwrap_state_dict(torch.jit.load(path, map_location="cpu"))
            except Exception:
                raise err from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except Exception as err:
        raise ConfigError(f"{path}: cannot read weights ({_first_line(err)})") from None


def check_state_dict(
    expected: dict[str, Tensor], got: dict[str, Tensor], source: str | Path
) -> None:
    """One-line ConfigError naming the first missing, unexpected or mis-shaped key (the SPM
    loader's check, reported as bad input)."""
    from preference_model.model import CheckpointError, _check_state_dict

    try:
        _check_state_dict(
            {k: tuple(v.shape) for k, v in expected.items()},
            {k: tuple(v.shape) for k, v in got.items()},
            str(source),
        )
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into `model`, strictly (keys and shapes checked first)."""
    state = read_state_dict(path)
    check_state_dict(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True)
    return model


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


def _open_clip_tag(arch: str, value: str) -> dict[str, Any]:
    """The open_clip pretrained config of `value` as a tag of `arch`, {} if it is none."""
    import open_clip

    if arch.endswith(".json") or not value:
        return {}
    return open_clip.get_pretrained_cfg(arch, value) or {}


# ----------------------------------------------------------------------------- builders


def _spm(path: str, device: str) -> Scorer:
    import preference_model

    return CLIPPreferenceScorer(preference_model.load(path, device=device))


def _pickscore(source: str, device: str) -> Scorer:
    from preference_model import StepAwarePreferenceModel

    try:
        model = StepAwarePreferenceModel.from_hf_clip(source, time_conditioning=False)
    except OSError as e:
        raise ConfigError(f"cannot load PickScore model {source}: {e}") from e
    return CLIPPreferenceScorer(model.to(device))


def _hpsv2(source: str, device: str) -> Scorer:
    """HPSv2.1: cos(image, prompt) of open_clip ViT-H-14 with the HPS weights, in [-1, 1].

    Exactly what `hpsv2.score` returns (the diagonal of normalised image @ text features), NOT
    multiplied by 100; papers (and SPEC.md's table) report 100 * this. Preprocessing is HPSv2's
    eval transform: longer side to 224 (bicubic), centred black padding, OpenAI CLIP mean / std
    (for square images: a plain resize to 224). Tokens: open_clip's ViT-H-14 tokenizer (77).
    `source`: the weights file (`HPS_v2.1_compressed.pt`, a `{"state_dict": ...}` checkpoint or
    a plain state dict, a `module.` prefix allowed), a folder holding it, or a hub repo
    (`xswu/HPSv2`).
    """
    weights = _weights_file(source, HPS_FILENAME, "HPSv2")
    clip = open_clip_model(HPS_ARCH, device)
    load_weights(clip.model, weights)
    transform = dataclasses.replace(clip.transform, resize_mode="longest")
    return CLIPCosineScorer(clip.model, clip.tokenizer, transform, device=device)


def _aesthetic(arg: str, device: str) -> Scorer:
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
    mlp_file = _weights_file(mlp_source.strip(), AESTHETIC_FILENAME, "aesthetic MLP")
    tag = _open_clip_tag(AESTHETIC_ARCH, clip_source)
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


def _clip(arg: str, device: str) -> Scorer:
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
    tag = _open_clip_tag(arch, weights)
    if weights and not tag and not Path(weights).expanduser().is_file():
        raise ConfigError(f"CLIP weights file not found: {weights} (nor an open_clip tag)")
    pretrained = weights if tag else None
    clip = open_clip_model(arch, device, pretrained, quick_gelu=tag.get("quick_gelu", False))
    if weights and not tag:
        load_weights(clip.model, Path(weights).expanduser())
    return CLIPCosineScorer(
        clip.model, clip.tokenizer, clip.transform, scale=100.0, clamp_negative=True, device=device
    )


def _import_imagereward():
    """The `ImageReward` module, or a one-line ConfigError saying why it is unavailable."""
    try:
        return importlib.import_module("ImageReward")
    except Exception as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "ImageReward":
            reason = "the image-reward package is not installed"
        else:
            reason = f"importing ImageReward fails ({_first_line(err)})"
        raise ConfigError(f"scorer 'imagereward' is unavailable: {reason}") from None


def _imagereward(source: str, device: str) -> Scorer:
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
    module = _import_imagereward()
    try:
        model = module.load(source, device=device, download_root=download_root)
    except Exception as err:
        raise ConfigError(f"cannot load ImageReward model {source}: {_first_line(err)}") from None
    return ImageRewardScorer(model, device=device)


def _toy_pickscore(arg: str, device: str) -> Scorer:
    """The toy world's clean preference model: the shipped toy CLIP (the stand-in for
    PickScore_v1 that the toy SPM starts from), without time conditioning."""
    from preference_model import StepAwarePreferenceModel
    from preference_model.train import TOY_BACKBONE_DIR

    model = StepAwarePreferenceModel.from_open_clip(
        TOY_BACKBONE_DIR / "open_clip_config.json",
        TOY_BACKBONE_DIR / "open_clip_model.safetensors",
        time_conditioning=False,
    )
    return CLIPPreferenceScorer(model.to(device))


# Scorers that need no argument.
NO_ARGUMENT = ("oracle", "toy_pickscore")

SCORERS: dict[str, Callable[..., Scorer]] = {
    "oracle": lambda arg, device: OracleScorer(),
    "toy_pickscore": _toy_pickscore,
    "spm": _spm,
    "pickscore": _pickscore,
    "hpsv2": _hpsv2,
    "aesthetic": _aesthetic,
    "clip": _clip,
    "imagereward": _imagereward,
}


def build_scorer(spec: str, device: str = "cpu") -> Scorer:
    """A scorer from `name` or `name:argument` (e.g. `spm:runs/toy/spm/final`)."""
    name, _, arg = spec.partition(":")
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    if name not in NO_ARGUMENT and not arg:
        raise ConfigError(f"scorer {name!r} needs a model: {name}:<path or hub name>")
    return SCORERS[name](arg, device)


def prefer_by_scorer(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """AI-feedback labels (N, 2): the higher-scored image wins, equal scores tie."""
    label_0 = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
    return np.stack([label_0, 1.0 - label_0], axis=1)

"""What every scorer shares: the batched loop and strict weight loading.

Why: the DPO trainer's AI-feedback relabelling, the validation images and `spo compare` all
score images with models whose weights come from files of several layouts; each is read and
its keys and shapes checked before anything is built, so a wrong file is one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from preference_model import check_state_dict as check_spm_state_dict
from preference_model.errors import CheckpointError
from preference_model.transforms import ImageTransform, preprocess_images
from spo.errors import ConfigError
from spo.models import is_local_path

Scorer = Callable[[Tensor, Sequence[str]], Tensor]  # (images in [0, 1], prompts) -> (N,)


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


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


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def weights_file(source: str, default_name: str, what: str) -> Path:
    """A local weights file (or a folder holding `default_name`), or `default_name` fetched
    from the hub repo `source` (`org/repo`). A missing local path is a one-line ConfigError."""
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
            f"cannot fetch {default_name} ({what}) from the hub repo {source}: {first_line(err)}"
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
        raise ConfigError(f"{path}: cannot read weights ({first_line(err)})") from None


def check_state_dict(
    expected: dict[str, Tensor], got: dict[str, Tensor], source: str | Path
) -> None:
    """One-line ConfigError naming the first missing, unexpected or mis-shaped key (the SPM
    loader's check, reported as bad input)."""
    try:
        check_spm_state_dict(
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

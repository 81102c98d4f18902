"""Scorers behind one interface: `score(images, prompts) -> tensor`, higher is better.

Why a registry: the DPO trainer's AI-feedback relabelling and the evaluation both name a scorer
by a short spec (`oracle`, `spm:runs/toy/spm/final`, `pickscore:yuvalkirstain/PickScore_v1`), and
each is built only when asked for, so its weights are loaded (and checked) once.
`images` are float tensors (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from spo.config import ConfigError

Scorer = Callable[[Tensor, Sequence[str]], Tensor]


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


SCORERS: dict[str, Callable[..., Scorer]] = {
    "oracle": lambda arg, device: OracleScorer(),
    "spm": _spm,
    "pickscore": _pickscore,
}


def build_scorer(spec: str, device: str = "cpu") -> Scorer:
    """A scorer from `name` or `name:argument` (e.g. `spm:runs/toy/spm/final`)."""
    name, _, arg = spec.partition(":")
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    if name != "oracle" and not arg:
        raise ConfigError(f"scorer {name!r} needs a model: {name}:<path or hub name>")
    return SCORERS[name](arg, device)


def prefer_by_scorer(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """AI-feedback labels (N, 2): the higher-scored image wins, equal scores tie."""
    label_0 = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
    return np.stack([label_0, 1.0 - label_0], axis=1)

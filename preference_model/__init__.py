"""The step-aware preference model (SPM): a timestep-conditioned CLIP scorer (method.md section 2).

A standalone model library: the model, its loss, loading and saving, scoring, the noisy-image
maker that makes its training inputs, and the image transform shared with CLIP-style scorers.
It imports nothing from `spo`. Names are resolved on first use, so `preference_model.errors`
(what the `spo` CLI catches) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "preference_model.errors",
    "CheckpointNotFoundError": "preference_model.errors",
    "SPMConfig": "preference_model.model",
    "StepAwarePreferenceModel": "preference_model.model",
    "TOY_BACKBONE_DIR": "preference_model.model",
    "check_judge_folder": "preference_model.errors",
    "check_safetensors": "preference_model.errors",
    "check_state_dict": "preference_model.errors",
    "LatentJudge": "preference_model.latent",
    "LatentJudgeConfig": "preference_model.latent",
    "load": "preference_model.model",
    "pickscore_clip_config": "preference_model.model",
    "timestep_embedding": "preference_model.model",
    "toy_spm": "preference_model.model",
    "TransformerJudge": "preference_model.transformer_judge",
    "TransformerJudgeConfig": "preference_model.transformer_judge",
    "NoisyImageMaker": "preference_model.noisy",
    "NoisyLatentMaker": "preference_model.noisy",
    "pairwise_accuracy": "preference_model.losses",
    "preference_loss": "preference_model.losses",
    "ImageTransform": "preference_model.transforms",
    "preprocess_images": "preference_model.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'preference_model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__

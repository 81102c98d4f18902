"""The step-aware preference model (SPM): a timestep-conditioned CLIP scorer (SPEC.md section 2)."""

from preference_model.model import (
    CheckpointError,
    CheckpointNotFoundError,
    SPMConfig,
    StepAwarePreferenceModel,
    load,
    pickscore_clip_config,
    timestep_embedding,
)

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "SPMConfig",
    "StepAwarePreferenceModel",
    "load",
    "pickscore_clip_config",
    "timestep_embedding",
]

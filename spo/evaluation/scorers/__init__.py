"""Scorers behind one interface: `score(images, prompts) -> tensor (N,)`, higher is better.

Why a registry: the DPO trainer's AI-feedback relabelling, the validation images and the
evaluation all name a scorer by a short spec (`oracle`, `spm:runs/toy/spm/final`,
`pickscore:yuvalkirstain/PickScore_v1`, `hpsv2:weights/HPS_v2.1_compressed.pt`, ...), and each
is built only when asked for, so its weights are loaded (and checked) once. `images` are float
tensors (N, 3, H, W) in [0, 1]. One module per scorer family (the evaluation scorers of method.md
section 4); images go through one transform, `preference_model.transforms.preprocess_images`.
A local weights path that does not exist is a one-line ConfigError before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from preference_model.errors import check_judge_folder
from spo.errors import ConfigError
from spo.evaluation.scorers.aesthetic import aesthetic_scorer
from spo.evaluation.scorers.base import Scorer
from spo.evaluation.scorers.clip import (
    clip_scorer,
    hpsv2_scorer,
    pickscore_scorer,
    spm_scorer,
    toy_pickscore_scorer,
)
from spo.evaluation.scorers.imagereward import imagereward_scorer
from spo.evaluation.scorers.oracle import OracleScorer

__all__ = ["SCORERS", "Scorer", "build_scorer", "check_scorer", "prefer_by_scorer"]

# the toy world's ground truths: the oracle, and each annotator group's of the two-group world
ORACLES = ("oracle", "oracle_large", "oracle_small")
NO_ARGUMENT = (*ORACLES, "toy_pickscore")


SCORERS: dict[str, Callable[..., Scorer]] = {
    "oracle": lambda arg, device: OracleScorer(),
    "oracle_large": lambda arg, device: OracleScorer("large"),
    "oracle_small": lambda arg, device: OracleScorer("small"),
    "toy_pickscore": toy_pickscore_scorer,
    "spm": spm_scorer,
    "pickscore": pickscore_scorer,
    "hpsv2": hpsv2_scorer,
    "aesthetic": aesthetic_scorer,
    "clip": clip_scorer,
    "imagereward": imagereward_scorer,
}


def check_scorer(spec: str, prompts: Sequence[str] = ()) -> None:
    """The cheap checks of a scorer spec, before any model is built: a known name with its
    argument, an SPM folder that is whole, and for the oracle, `prompts` it can score (toy-world
    prompts only)."""
    name, _, arg = spec.partition(":")
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    if name not in NO_ARGUMENT and not arg:
        raise ConfigError(f"scorer {name!r} needs a model: {name}:<path or hub name>")
    if name == "spm":
        from spo.runs import require_path

        check_judge_folder(
            require_path(arg, "SPM"),
            kind="pixel",
            use="the spm: scorer (it scores images; a latent judge scores the noisy latents of its "
            "own model family, in `spo train-spo judge=latent`)",
        )
    if name in ORACLES:
        from spo.toy.render import Prompt

        for text in prompts:
            try:
                Prompt.parse(text)
            except ValueError as e:
                raise ConfigError(f"the oracle scorer scores toy-world prompts only: {e}") from e


def build_scorer(spec: str, device: str = "cpu") -> Scorer:
    """A scorer from `name` or `name:argument` (e.g. `spm:runs/toy/spm/final`)."""
    check_scorer(spec)
    name, _, arg = spec.partition(":")
    return SCORERS[name](arg, device)


def prefer_by_scorer(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """AI-feedback labels (N, 2): the higher-scored image wins, equal scores tie."""
    label_0 = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
    return np.stack([label_0, 1.0 - label_0], axis=1)

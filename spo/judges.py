"""How the toolkit hands a step-aware judge its inputs, whatever its kind.

Why one place: the judges' trainer and SPO's sampler both score with the three kinds of judge
(`preference_model`): the pixel SPM and the UNet latent judge read prompts through their own
tokenizers; the transformer latent judge (flow families) reads the diffusion model's own text
conditioning and calls its transformer as the model's family does. Binding and the text inputs
are decided here once, not in every recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from preference_model.transformer_judge import TransformerJudge
from spo.families import TextConditioning
from spo.models import DiffusionModel


def bind_judge(judge: Any, model: DiffusionModel) -> Any:
    """A transformer latent judge learns how `model`'s family calls its transformer; other
    judges need nothing."""
    if isinstance(judge, TransformerJudge):

        def call(backbone, latents: Tensor, timesteps: Tensor, hidden: Tensor, pooled: Tensor):
            return model.unet_forward(
                backbone, latents, timesteps, TextConditioning(hidden, pooled)
            )

        judge.bind(call)
    return judge


def judge_text(judge: Any, model: DiffusionModel, prompts: Sequence[str], repeats: int = 1):
    """The text input of `judge.logits` for `prompts`, each repeated `repeats` times in a row:
    the model's (hidden states, pooled embedding) for a transformer judge, else the judge's
    own token ids (a list of them per tokenizer for the UNet latent judge)."""
    if isinstance(judge, TransformerJudge):
        text = model.encode_text(list(prompts)).repeat_interleave(repeats)
        return text.hidden, text.pooled
    ids = judge.tokenize(list(prompts))
    if isinstance(ids, list):
        return [i.repeat_interleave(repeats, dim=0) for i in ids]
    return ids.repeat_interleave(repeats, dim=0)


def step_judge(judge: Any, model: DiffusionModel, kind: str) -> Callable[..., Tensor]:
    """The pool sampler's `StepJudge` (inputs, prompts, t) -> scores: a pixel judge scores
    decoded x0_hat in [-1, 1], a latent judge the candidate latents themselves."""
    if kind == "pixel":
        return lambda images, prompts, t: judge.score(images, prompts, t, value_range="-1-1")
    if isinstance(judge, TransformerJudge):
        return lambda latents, prompts, t: judge.score(
            latents, judge_text(judge, model, prompts), t
        )
    return judge.score

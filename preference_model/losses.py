"""PickScore's preference loss (method.md section 2), as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def preference_loss(
    scores_0: Tensor, scores_1: Tensor, labels: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Soft-label cross-entropy of the 2-way softmax over a pair's scores.

    `scores_0`, `scores_1`: (B,) scores of image 0 and image 1 (exp(logit_scale) * cosine);
    `labels`: (B, 2) soft labels (1, 0), (0, 1) or (0.5, 0.5) for a tie, which is kept;
    `weights`: (B,) per-example weights (PickScore: 1 / examples per prompt); the loss is their
    weighted mean, sum(w * ce) / sum(w), so its scale does not depend on the batch's prompts.
    Returns (loss, probability that image 0 is preferred).
    """
    log_probs = F.log_softmax(torch.stack([scores_0, scores_1], dim=-1).float(), dim=-1)
    ce = -(labels.to(log_probs) * log_probs).sum(dim=-1)
    if weights is None:
        weights = torch.ones_like(ce)
    weights = weights.to(ce)
    return (weights * ce).sum() / weights.sum(), log_probs[:, 0].exp()


def pairwise_accuracy(scores_0: Tensor, scores_1: Tensor, labels: Tensor) -> tuple[float, int]:
    """Share of non-tie pairs whose higher score is the labelled winner (equal scores count 0.5).

    Returns (accuracy, number of non-tie pairs); the accuracy is nan when there are none.
    """
    decided = labels[:, 0] != 0.5
    if not bool(decided.any()):
        return float("nan"), 0
    s0, s1 = scores_0[decided].float(), scores_1[decided].float()
    winner_0 = labels[decided, 0] > 0.5
    right = torch.where(winner_0, s0 > s1, s1 > s0).float() + 0.5 * (s0 == s1).float()
    return float(right.mean()), int(decided.sum())

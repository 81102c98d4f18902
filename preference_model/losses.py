"""The SPM's pair loss (the released criterion, method.md section 2), as a pure function."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Added to a tie's cross-entropy so that its best value, at equal scores, is 0 as a decided
# pair's is: -(0.5 log p0 + 0.5 log p1) is at least log 2.
TIE_OFFSET = math.log(0.5)


def preference_loss(
    scores_0: Tensor,
    scores_1: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    weight_total: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """The released SPM criterion: per-pair soft-label cross-entropy of the 2-way softmax plus
    the tie offset, weighted by w_i / sum(w).

    `scores_0`, `scores_1`: (B,) scores of image 0 and image 1 (exp(logit_scale) * cosine);
    `labels`: (B, 2) soft labels (1, 0), (0, 1) or (0.5, 0.5) for a tie, which is kept;
    `weights`: (B,) per-pair weights (1 / pairs with the caption; default 1). `weight_total`
    is the sum(w) to normalise by: default this batch's own; a trainer with several processes
    passes the sum over every process's batch (the release normalises over the gathered
    batch), and then this is the process's share of that batch's loss. A zero total (only
    zero-weight stand-in pairs) gives 0.
    Returns (loss, probability that image 0 is preferred).
    """
    log_probs = F.log_softmax(torch.stack([scores_0, scores_1], dim=-1).float(), dim=-1)
    labels = labels.to(log_probs)
    tie = (labels[:, 0] == labels[:, 1]).to(log_probs)
    per_pair = -(labels * log_probs).sum(dim=-1) + TIE_OFFSET * tie
    weights = torch.ones_like(per_pair) if weights is None else weights.to(per_pair)
    total = weights.sum() if weight_total is None else torch.as_tensor(weight_total).to(per_pair)
    loss = (weights * per_pair).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)
    return loss, log_probs[:, 0].exp()


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

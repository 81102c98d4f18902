"""The training losses as pure tensor functions (method.md sections 1 and 3).

Why pure: each reads like its formula, the recipes hold only the loop, and the tests check
them against hand-computed values (ln 2 when policy and reference agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """||pred - target||^2 averaged over every element of each sample: (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class DPOOutput:
    """The Diffusion-DPO loss and what is worth logging about it (all scalars but `inside`)."""

    loss: Tensor
    inside: Tensor  # (B,) the logit of the pair's preference, -beta_scale * beta * (...)
    implicit_acc: Tensor  # share of pairs with inside > 0 (inside == 0 counts 0.5)
    model_mse: Tensor  # mean policy error over winners and losers
    ref_mse: Tensor  # mean reference error
    margin: Tensor  # mean of inside: the implicit reward margin of winner over loser


def dpo_loss(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    beta: float,
    beta_scale: float = 0.5,
) -> DPOOutput:
    """Diffusion-DPO (Wallace et al.; method.md 1) for a batch laid out winners first.

    `model_pred`, `ref_pred`, `target`: (2B, ...), the B winners then the B losers, sharing
    t and noise pairwise. With m = per-sample MSE of the policy and r of the reference:
        inside = -beta_scale * beta * ((m_w - m_l) - (r_w - r_l)),  loss = -logsigmoid(inside)
    `beta_scale` 0.5 is the released code's (and the paper's) form; 1.0 the other public one.
    """
    m = per_sample_mse(model_pred, target)
    r = per_sample_mse(ref_pred, target).detach()
    m_w, m_l = m.chunk(2)
    r_w, r_l = r.chunk(2)
    inside = -beta_scale * beta * ((m_w - m_l) - (r_w - r_l))
    loss = -F.logsigmoid(inside).mean()
    acc = ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()
    return DPOOutput(
        loss, inside.detach(), acc, m.mean().detach(), r.mean(), inside.mean().detach()
    )


def sft_loss(model_pred: Tensor, target: Tensor) -> Tensor:
    """The SFT baseline: plain MSE on the winners only (the first half of a DPO batch)."""
    winners = model_pred.shape[0] // 2
    return per_sample_mse(model_pred[:winners], target[:winners]).mean()


def spo_loss(
    logp_w: Tensor,
    ref_logp_w: Tensor,
    logp_l: Tensor,
    ref_logp_l: Tensor,
    beta: float = 10.0,
    clip: float | None = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SPO's step-wise DPO loss on kept (win, lose) transitions (method.md 3).

    ratio = exp(logp_policy - logp_ref) per transition, clamped to [1 - clip, 1 + clip] as the
    released code does (`clip=None`: the paper's plain form);
    loss = -logsigmoid(beta * log ratio_w - beta * log ratio_l), averaged.
    Returns (loss, ratio_w, ratio_l, share of ratios the clamp changed).
    """
    ratio_w = torch.exp(logp_w.float() - ref_logp_w.float())
    ratio_l = torch.exp(logp_l.float() - ref_logp_l.float())
    clipped = torch.zeros((), device=ratio_w.device)
    if clip is not None:
        lo, hi = 1.0 - clip, 1.0 + clip
        changed = torch.cat([(ratio_w < lo) | (ratio_w > hi), (ratio_l < lo) | (ratio_l > hi)])
        clipped = changed.float().mean()
        ratio_w, ratio_l = ratio_w.clamp(lo, hi), ratio_l.clamp(lo, hi)
    loss = -F.logsigmoid(beta * torch.log(ratio_w) - beta * torch.log(ratio_l)).mean()
    return loss, ratio_w.detach(), ratio_l.detach(), clipped

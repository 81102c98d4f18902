"""How far a policy has moved from its reference: the KL divergence of its sampling chain.

Why: a judge's score can keep rising while the true reward falls (over-optimisation); the
distance a run has travelled from the reference is the x-axis on which that shows, and it is
comparable across trainers (DPO's policy is evaluated on the same chain as SPO's).

Both networks step from the same state along the policy's own chain; each step is a Gaussian
with the same standard deviation under both (DDIM eta > 0, or the flow SDE), so its KL is in
closed form, |mu_policy - mu_ref|^2 / (2 sigma^2) per element. The chain's KL is the sum over
steps (the chain rule of KL for Markov chains, the expectation taken by sampling the policy's
chain): reported averaged over a sample's elements, as the log-probabilities are
(method.md 3), and summed over them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
from torch import Tensor

from spo.models import DiffusionModel, TextConditioning
from spo.pool_sampler import StepSchedule


class ChainKL(NamedTuple):
    """KL(policy chain || reference chain) per sample, (N,) each."""

    per_element: Tensor  # sum over steps of the mean over a sample's elements
    total: Tensor  # sum over steps and elements


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> ChainKL:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) of one step, per sample: (mean over elements,
    sum over elements). `std` broadcasts against the means (one per sample, or per element)."""
    per = (mean_p.float() - mean_q.float()) ** 2 / (2 * std.float() ** 2)
    per = per.flatten(1)
    return ChainKL(per.mean(dim=1), per.sum(dim=1))


@torch.no_grad()
def chain_kl(
    model: DiffusionModel,
    schedule: StepSchedule,
    policy,
    reference: Callable[[], AbstractContextManager],
    prompts: list[str],
    generator: torch.Generator,
    batch_size: int = 8,
) -> ChainKL:
    """The KL of the policy's sampling chain from the reference's for each prompt: the policy
    samples the chain from x_T (drawn from `generator`) with `schedule`'s Gaussian steps; at
    each step both networks' guided outputs give the two means, the schedule the shared
    standard deviation. `reference()` enters a block in which it yields the reference
    network (a LoRA policy's adapters are off meanwhile)."""
    parts = [
        _chain(model, schedule, policy, reference, prompts[i : i + batch_size], generator)
        for i in range(0, len(prompts), batch_size)
    ]
    return ChainKL(*(torch.cat(p) for p in zip(*parts, strict=True)))


def _chain(model, schedule, policy, reference, prompts, generator) -> ChainKL:
    size = model.resolution // model.vae_scale_factor
    shape = (len(prompts), model.latent_channels, size, size)
    x = torch.randn(shape, generator=generator, device=generator.device).to(model.device)
    text = model.encode_text(prompts)
    cond = TextConditioning.cat([text, model.empty_text(len(prompts))])
    per_element = torch.zeros(len(prompts), device=model.device)
    total = torch.zeros(len(prompts), device=model.device)
    for t in schedule.timesteps:
        t_next = schedule.prev(t)
        mean, std = schedule.gaussian(x, schedule.output(policy, x, t, cond), t, t_next)
        with reference() as ref:
            ref_mean, _ = schedule.gaussian(x, schedule.output(ref, x, t, cond), t, t_next)
        step = gaussian_kl(mean, ref_mean, std)
        per_element += step.per_element
        total += step.total
        noise = torch.randn(x.shape, generator=generator, device=generator.device)
        x = (mean + std * noise.to(mean)).to(x.dtype)
    return ChainKL(per_element.cpu(), total.cpu())

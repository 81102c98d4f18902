"""Sampling math against hand-computed values and against diffusers' own schedulers."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from spo.ddim import (
    add_noise,
    cfg_combine,
    ddim_step_with_logprob,
    predict_epsilon,
    predict_x0,
)


def test_cfg_combine_hand_values():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(cfg_combine(uncond, cond, 5.0), torch.tensor([11.0, 8.0]))
    assert torch.equal(cfg_combine(uncond, cond, 1.0), cond)
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)


def test_predict_x0_hand_value():
    # a = 0.64: x0 = (x - 0.6 * eps) / 0.8 = (1.0 - 0.6 * 0.5) / 0.8 = 0.875
    x = torch.full((1, 1, 1, 1), 1.0)
    eps = torch.full((1, 1, 1, 1), 0.5)
    out = predict_x0(x, eps, torch.tensor([0.64]))
    assert math.isclose(out.item(), 0.875, rel_tol=1e-6)
    # v-prediction: x0 = 0.8 * 1.0 - 0.6 * 0.5 = 0.5; eps = 0.6 * 1.0 + 0.8 * 0.5 = 1.0
    assert math.isclose(predict_x0(x, eps, torch.tensor([0.64]), "v_prediction").item(), 0.5)
    assert math.isclose(predict_epsilon(x, eps, torch.tensor([0.64]), "v_prediction").item(), 1.0)


def test_add_noise_and_x0_match_diffusers():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    a = sched.alphas_cumprod[t]
    ours = add_noise(x0, noise, a)
    assert torch.allclose(ours, sched.add_noise(x0, noise, t), atol=1e-6)
    # Given the true noise, the one-step prediction recovers x0 exactly.
    assert torch.allclose(predict_x0(ours, noise, a), x0, atol=1e-4)

    ddim = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    ddim.set_timesteps(20)
    step = ddim.step(noise[:1], 501, ours[1:2], eta=0.0)
    mine = predict_x0(ours[1:2], noise[:1], ddim.alphas_cumprod[[501]])
    assert torch.allclose(mine, step.pred_original_sample, atol=1e-5)


def test_ddim_step_matches_diffusers_and_logprob_is_mean_gaussian_density():
    ddim = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    ddim.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (951, 501, 1):  # t = 1 reaches the "final" alpha
        noise = torch.randn(2, 4, 8, 8, generator=g)
        theirs = ddim.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        prev = t - 50
        a_t = ddim.alphas_cumprod[t].expand(2)
        a_prev = (ddim.alphas_cumprod[prev] if prev >= 0 else ddim.final_alpha_cumprod).expand(2)
        ours, logp = ddim_step_with_logprob(x, eps, a_t, a_prev, eta=1.0, noise=noise)
        assert (ours - theirs).abs().max() < 1e-5

        # The log-probability is the element-wise Gaussian log-density, averaged.
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = var.sqrt().view(-1, 1, 1, 1)
        mean = theirs - std * noise
        density = torch.distributions.Normal(mean, std).log_prob(theirs).flatten(1).mean(1)
        assert torch.allclose(logp, density, atol=1e-5)
        _, given = ddim_step_with_logprob(x, eps, a_t, a_prev, eta=1.0, prev_sample=theirs)
        assert torch.allclose(given, density, atol=1e-5)


def test_ddim_logprob_hand_value():
    # a_t = 0.5, a_prev = 0.8, eta = 1: sigma^2 = 0.2 / 0.5 * (1 - 0.625) = 0.15
    x, eps = torch.full((1, 1, 1, 2), 1.0), torch.full((1, 1, 1, 2), 0.5)
    a_t, a_prev = torch.tensor([0.5]), torch.tensor([0.8])
    x0 = (1.0 - math.sqrt(0.5) * 0.5) / math.sqrt(0.5)
    mu = math.sqrt(0.8) * x0 + math.sqrt(1 - 0.8 - 0.15) * 0.5
    sample = torch.tensor([[[[mu, mu + 0.1]]]])
    _, logp = ddim_step_with_logprob(x, eps, a_t, a_prev, 1.0, prev_sample=sample)
    const = -0.5 * math.log(0.15) - 0.5 * math.log(2 * math.pi)
    expected = const + (0.0 - 0.01 / (2 * 0.15)) / 2  # mean over the two elements
    assert math.isclose(logp.item(), expected, rel_tol=1e-5)

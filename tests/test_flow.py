"""spo.flow: rectified-flow math against hand computations and diffusers' flow scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from spo.flow import (
    calculate_shift,
    euler_step,
    flow_sigmas,
    flux_sigmas,
    interpolate,
    predict_epsilon,
    predict_x0,
    sample_sigmas_logit_normal,
    sample_sigmas_uniform,
    sde_step_with_logprob,
    shift_sigmas,
    sigmas_to_timesteps,
    time_shift,
    velocity_target,
)
from spo.losses import dpo_loss

SHAPE = (3, 4, 5, 5)
SIGMA = [0.9, 0.5, 0.2]
SIGMA_NEXT = [0.8, 0.3, 0.1]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _randn(seed: int, *shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for shape in shapes]


def _col(values) -> np.ndarray:
    """Per-sample values as a (N, 1, 1, 1) float64 array for the numpy hand computations."""
    return np.asarray(values, dtype=np.float64).reshape(-1, 1, 1, 1)


def _gaussian_logp(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    density = -((x - mean) ** 2) / (2 * std**2) - np.log(std) - LOG_SQRT_2PI
    return density.reshape(x.shape[0], -1).mean(axis=1)


def test_interpolation_and_one_step_predictions_invert_each_other():
    x0, eps = _randn(0, SHAPE, SHAPE)
    sigma = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    x_s = interpolate(x0, eps, sigma)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(x_s, (1 - s) * x0 + s * eps, rtol=0, atol=1e-15)
    v = velocity_target(x0, eps)
    assert torch.equal(v, eps - x0)
    assert torch.allclose(predict_x0(x_s, v, sigma), x0, rtol=0, atol=1e-12)
    assert torch.allclose(predict_epsilon(x_s, v, sigma), eps, rtol=0, atol=1e-12)
    # a float sigma is shared by the batch
    assert torch.allclose(interpolate(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps, atol=1e-15)


def test_euler_step_hand_values_and_diffusers_step():
    # x = 1, v = 0.5, s = 0.8 -> s' = 0.6: 1 + (0.6 - 0.8) * 0.5 = 0.9
    x, v = torch.full((1, 1, 1, 2), 1.0), torch.full((1, 1, 1, 2), 0.5)
    assert torch.allclose(euler_step(x, v, torch.tensor([0.8]), torch.tensor([0.6])), 0.9 + 0 * x)

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x, *vs = _randn(1, SHAPE, *[SHAPE] * 6, dtype=torch.float32)
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(vs[i], t, x).prev_sample
        sigma, sigma_next = sched.sigmas[i].expand(3), sched.sigmas[i + 1].expand(3)
        ours = euler_step(x, vs[i], sigma, sigma_next)
        assert torch.allclose(ours, theirs, atol=1e-6)
        x = theirs


def _hand_sde(x, v, noise, a):
    """Flow-GRPO's 'sde' step written in its release's algebraic form, in float64 numpy."""
    s, s_next = _col(SIGMA), _col(SIGMA_NEXT)
    dt = s_next - s
    std_s = a * np.sqrt(s / (1 - s))
    mean = x * (1 + std_s**2 / (2 * s) * dt) + v * (1 + std_s**2 * (1 - s) / (2 * s)) * dt
    std = std_s * np.sqrt(-dt)
    return mean, std, mean + std * noise


def _hand_cps(x, v, noise, a):
    s, s_next = _col(SIGMA), _col(SIGMA_NEXT)
    std = s_next * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    mean = x0_hat * (1 - s_next) + x1_hat * np.sqrt(s_next**2 - std**2)
    return mean, std, mean + std * noise


@pytest.mark.parametrize("kind,hand", [("sde", _hand_sde), ("cps", _hand_cps)])
def test_sde_step_mean_std_and_logprob_match_hand_computation(kind, hand):
    x, v, noise = _randn(2, SHAPE, SHAPE, SHAPE)
    a = 0.7
    mean, std, prev = hand(x.numpy(), v.numpy(), noise.numpy(), a)
    expected_logp = _gaussian_logp(prev, mean, std)

    sigma, sigma_next = torch.tensor(SIGMA), torch.tensor(SIGMA_NEXT)
    out = sde_step_with_logprob(x, v, sigma, sigma_next, a, kind, noise=noise)
    assert out.mean.dtype == torch.float32 and out.log_prob.shape == (3,)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std.numpy(), std.ravel(), rtol=1e-6)
    np.testing.assert_allclose(out.prev_sample.numpy(), prev, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_prob.numpy(), expected_logp, rtol=1e-5)

    # Scoring the sampled transition gives the same log-probability.
    scored = sde_step_with_logprob(x, v, sigma, sigma_next, a, kind, prev_sample=out.prev_sample)
    assert torch.allclose(scored.log_prob, out.log_prob, atol=1e-5)
    assert torch.equal(scored.prev_sample, out.prev_sample)

    # The mean itself has the maximal log-probability, -log std - log sqrt(2 pi).
    at_mean = sde_step_with_logprob(x, v, sigma, sigma_next, a, kind, prev_sample=out.mean)
    peak = -np.log(std.ravel()) - LOG_SQRT_2PI
    np.testing.assert_allclose(at_mean.log_prob.numpy(), peak, rtol=1e-6)
    assert (at_mean.log_prob > out.log_prob).all()

    # A generator draws z ~ N(0, 1) of the latent's shape.
    drawn = sde_step_with_logprob(
        x, v, sigma, sigma_next, a, kind, generator=torch.Generator().manual_seed(5)
    )
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(drawn.prev_sample, out.mean + out.std.view(-1, 1, 1, 1) * z, atol=1e-6)


def test_sde_logprob_hand_value():
    # 'sde', a = 0.5, s = 0.5 -> 0.3: std_s = 0.5, std = 0.5 sqrt(0.2); x = 1, v = 0.5:
    # mean = 1 + [0.5 + 0.25 / 1 * (1 + 0.25)] * (-0.2) = 0.8375
    x, v = torch.full((1, 1, 1, 2), 1.0), torch.full((1, 1, 1, 2), 0.5)
    mu, var = 0.8375, 0.25 * 0.2
    sample = torch.tensor([[[[mu, mu + 0.1]]]])
    out = sde_step_with_logprob(x, v, 0.5, 0.3, 0.5, "sde", prev_sample=sample)
    assert math.isclose(out.mean[0, 0, 0, 0].item(), mu, rel_tol=1e-6)
    expected = -0.5 * math.log(var) - LOG_SQRT_2PI - 0.01 / (2 * var) / 2
    assert math.isclose(out.log_prob.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_vanishing_noise_level_gives_the_euler_step(kind):
    x, v = _randn(3, SHAPE, SHAPE)
    sigma, sigma_next = torch.tensor(SIGMA), torch.tensor(SIGMA_NEXT)
    out = sde_step_with_logprob(x, v, sigma, sigma_next, 1e-6, kind, noise=torch.zeros(SHAPE))
    euler = euler_step(x, v, sigma, sigma_next).float()
    assert torch.allclose(out.mean, euler, atol=1e-5)
    assert torch.allclose(out.prev_sample, euler, atol=1e-5)
    # ...and a real noise level does not (the check can fail)
    noisy = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, kind, noise=torch.zeros(SHAPE))
    assert not torch.allclose(noisy.mean, euler, atol=1e-3)


def test_sigma_one_needs_the_release_substitute_and_cps_needs_a_positive_next_sigma():
    x, v, noise = _randn(4, SHAPE, SHAPE, SHAPE)
    sigmas = flow_sigmas(10, shift=3.0)
    one, nxt = torch.ones(3), sigmas[1].expand(3)
    with pytest.raises(ValueError, match="sigma_max_substitute"):
        sde_step_with_logprob(x, v, one, nxt, 0.7, "sde", noise=noise)
    out = sde_step_with_logprob(
        x, v, one, nxt, 0.7, "sde", noise=noise, sigma_max_substitute=nxt[0]
    )
    for value in out:
        assert torch.isfinite(value).all()
    # std_s = a sqrt(1 / (1 - sigmas[1])) and sqrt(-dt) = sqrt(1 - sigmas[1]): std = a exactly
    assert torch.allclose(out.std, torch.full((3,), 0.7))
    # the substitute only acts where sigma == 1
    mixed = torch.tensor([1.0, 0.5, 0.2])
    both = sde_step_with_logprob(
        x, v, mixed, mixed - 0.1, 0.7, "sde", noise=noise, sigma_max_substitute=0.9
    )
    plain = sde_step_with_logprob(
        x[1:], v[1:], mixed[1:], mixed[1:] - 0.1, 0.7, "sde", noise=noise[1:]
    )
    assert torch.allclose(both.std[1:], plain.std) and torch.allclose(both.mean[1:], plain.mean)
    assert math.isclose(both.std[0].item(), 0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1), rel_tol=1e-6)

    # CPS has no 1 / (1 - s): finite at s = 1 as it is; its std is 0 at s' = 0.
    cps = sde_step_with_logprob(x, v, one, nxt, 0.7, "cps", noise=noise)
    assert all(torch.isfinite(value).all() for value in cps)
    with pytest.raises(ValueError, match="sigma_next > 0"):
        sde_step_with_logprob(x, v, torch.full((3,), 0.1), torch.zeros(3), 0.7, "cps")


@pytest.mark.parametrize("level", [0.0, -0.1, 1.01, float("nan")])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_invalid_noise_level_raises(kind, level):
    x, v = _randn(6, SHAPE, SHAPE)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(x, v, 0.5, 0.4, level, kind)


def test_unknown_kind_raises():
    x, v = _randn(6, SHAPE, SHAPE)
    with pytest.raises(ValueError, match="kind"):
        sde_step_with_logprob(x, v, 0.5, 0.4, 0.7, "ode")  # type: ignore[arg-type]


def test_timestep_sampling_shift_and_logit_normal_statistics():
    # shift 3: 3 s / (1 + 2 s) -> 0, 0.5, 0.75, 1; shift 1 is the identity
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_sigmas(s, 1.0), s)

    n = 200_000
    logit_normal = sample_sigmas_logit_normal(
        n, 0.5, 0.8, generator=torch.Generator().manual_seed(0)
    )
    assert ((logit_normal > 0) & (logit_normal < 1)).all()
    logits = torch.logit(logit_normal.double())
    assert abs(logits.mean().item() - 0.5) < 0.01
    assert abs(logits.std().item() - 0.8) < 0.01
    # the same draw, shifted; reproducible from the generator
    shifted = sample_sigmas_logit_normal(
        n, 0.5, 0.8, 3.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(shifted, 3 * logit_normal / (1 + 2 * logit_normal))
    assert ((shifted > 0) & (shifted < 1)).all()

    uniform = sample_sigmas_uniform(n, generator=torch.Generator().manual_seed(1))
    assert ((uniform >= 0) & (uniform < 1)).all()
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.005
    uniform3 = sample_sigmas_uniform(n, 3.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(uniform3, 3 * uniform / (1 + 2 * uniform))
    assert ((uniform3 >= 0) & (uniform3 < 1)).all()
    assert uniform3.mean() > 0.6  # shift 3 moves the mass towards noise


def test_dynamic_shift_hand_values():
    # mu on the line through (256, 0.5) and (4096, 1.15)
    assert math.isclose(calculate_shift(256), 0.5)
    assert math.isclose(calculate_shift(4096), 1.15)
    assert math.isclose(calculate_shift(1024), 0.5 + 0.65 * 768 / 3840)
    # e^mu / (e^mu + 1 / s - 1): s = 0.5 -> e^mu / (e^mu + 1)
    s = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    e = math.exp(0.7)
    expected = torch.tensor([e / (e + 1), e / (e + 3), 1.0], dtype=torch.float64)
    assert torch.allclose(time_shift(s, 0.7), expected)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10, 28])
def test_static_shift_sigmas_match_diffusers(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow_sigmas(steps, shift)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32
    assert torch.allclose(ours, sched.sigmas, rtol=1e-6, atol=1e-7)
    assert torch.allclose(sigmas_to_timesteps(ours[:-1]), sched.timesteps, rtol=1e-6)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_dynamic_shift_sigmas_match_diffusers(seq_len):
    steps, mu = 12, calculate_shift(seq_len)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    sched.set_timesteps(steps, mu=mu)
    assert torch.allclose(flow_sigmas(steps, mu=mu), sched.sigmas, rtol=1e-6, atol=1e-7)
    # FLUX's pipeline passes its own linspace(1, 1 / steps, steps)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.allclose(flux_sigmas(steps, seq_len), sched.sigmas, rtol=1e-6, atol=1e-7)


def test_flow_dpo_loss_and_gradient_match_hand_computation():
    b, beta = 3, 20.0
    x0, eps_half, model, ref = _randn(
        7, (2 * b, 4, 5, 5), (b, 4, 5, 5), (2 * b, 4, 5, 5), (2 * b, 4, 5, 5)
    )
    eps = torch.cat([eps_half, eps_half])  # winner and loser share the noise (and s)
    target = velocity_target(x0, eps)
    model = (target + 0.5 * model).requires_grad_(True)
    ref = target + 0.5 * ref

    out = dpo_loss(model, ref, target, beta, beta_scale=0.5)
    out.loss.backward()

    # by hand, float64: per-sample MSE to u = eps - x0
    u = (eps - x0).numpy()
    m_np, r_np = model.detach().numpy(), ref.numpy()
    k = u[0].size
    mse_m = ((m_np - u) ** 2).reshape(2 * b, -1).mean(axis=1)
    mse_r = ((r_np - u) ** 2).reshape(2 * b, -1).mean(axis=1)
    inside = -beta / 2 * ((mse_m[:b] - mse_r[:b]) - (mse_m[b:] - mse_r[b:]))
    loss = np.mean(np.log1p(np.exp(-inside)))  # -log sigmoid
    assert abs(inside).max() > 0.1  # a non-trivial point of the loss
    assert math.isclose(out.loss.item(), loss, rel_tol=1e-5)
    np.testing.assert_allclose(out.inside.numpy(), inside, rtol=1e-4, atol=1e-6)

    # dL/dpred_w = sigmoid(-inside) beta (pred_w - u_w) / (B K); the loser's has the minus sign
    weight = _col(1 / (1 + np.exp(inside))) * beta / (b * k)
    grad = np.concatenate([weight * (m_np[:b] - u[:b]), -weight * (m_np[b:] - u[b:])])
    np.testing.assert_allclose(model.grad.numpy(), grad, rtol=1e-4, atol=1e-9)

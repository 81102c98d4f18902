"""Rectified-flow (flow-matching) math as pure tensor functions, beside `spo.ddim`.

Why here and pure: flow models (SD3, FLUX) need the same few formulas in several places: the
training targets and timestep sampling of flow Diffusion-DPO, the sampling schedule, and a
stochastic step with a log-probability for step-wise preference methods (Flow-GRPO's SDE and
CPS steps). As small functions the tests check them against hand-computed values and against
diffusers' FlowMatchEulerDiscreteScheduler.

Conventions: `sigma` (s in [0, 1]) is the noise level, s = 1 pure noise, and
    x_s = (1 - s) x0 + s eps,   the network predicts the velocity v = eps - x0;
the transformer is given the timestep t = 1000 s. Per-sample values are (N,) tensors (or plain
floats, shared by the batch); the step functions compute in float32 like `spo.ddim`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

SDEKind = Literal["sde", "cps"]


def _broadcast(values: Tensor | float, like: Tensor) -> Tensor:
    """(N,) or a float -> (N, 1, 1, ...) in `like`'s dtype and device, to scale whole latents."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """The noisy latent of rectified flow: x_s = (1 - s) x0 + s eps."""
    s = _broadcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching regression target u = eps - x0 (d x_s / d s)."""
    return noise - x0


def predict_x0(x_s: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """The one-step clean-latent estimate: x0_hat = x_s - s v."""
    return x_s - _broadcast(sigma, x_s) * velocity


def predict_epsilon(x_s: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """The noise estimate (Flow-GRPO's "x1_hat"): eps_hat = x_s + (1 - s) v."""
    return x_s + (1 - _broadcast(sigma, x_s)) * velocity


def euler_step(
    x_s: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float
) -> Tensor:
    """The deterministic ODE step of FlowMatchEulerDiscreteScheduler: x_s' = x_s + (s' - s) v."""
    return x_s + (_broadcast(sigma_next, x_s) - _broadcast(sigma, x_s)) * velocity


class SDEStep(NamedTuple):
    """What `sde_step_with_logprob` returns; a plain tuple (prev_sample, log_prob, mean, std)."""

    prev_sample: Tensor  # x_s', the sampled (or the given) next latent
    log_prob: Tensor  # (N,) Gaussian log-density of prev_sample, mean over each sample's elements
    mean: Tensor  # the Gaussian's mean, shaped like the latent (float32)
    std: Tensor  # (N,) its standard deviation per element: prev_sample = mean + std * z


def _check_noise_level(noise_level: float) -> None:
    if not 0 < noise_level <= 1:
        raise ValueError(f"noise_level must be in (0, 1], got {noise_level}")


def sde_step_gaussian(
    x_s: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float = 0.7,
    kind: SDEKind = "sde",
    sigma_max_substitute: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """The Gaussian of one stochastic flow step (`sde_step_with_logprob` has the formulas), in
    float32: its mean and its standard deviation, shaped (N, 1, ...), one per sample."""
    _check_noise_level(noise_level)
    x_s, velocity = x_s.float(), velocity.float()
    s, s_next = _broadcast(sigma, x_s), _broadcast(sigma_next, x_s)
    dt = s_next - s
    if kind == "sde":
        denominator_sigma = s
        if sigma_max_substitute is not None:
            substitute = torch.as_tensor(sigma_max_substitute, dtype=s.dtype, device=s.device)
            denominator_sigma = torch.where(s == 1, substitute, s)
        elif bool((s >= 1).any()):
            raise ValueError("sigma = 1 in the 'sde' step: pass sigma_max_substitute")
        std_s = noise_level * torch.sqrt(s / (1 - denominator_sigma))
        drift = velocity + std_s**2 / (2 * s) * (x_s + (1 - s) * velocity)
        mean = x_s + drift * dt
        std = std_s * torch.sqrt(-dt)
    elif kind == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        if bool((std <= 0).any()):
            raise ValueError("the 'cps' step needs sigma_next > 0 for a log-probability")
        x0_hat = predict_x0(x_s, velocity, s)
        eps_hat = predict_epsilon(x_s, velocity, s)
        mean = x0_hat * (1 - s_next) + eps_hat * (s_next**2 - std**2).clamp(min=0).sqrt()
    else:
        raise ValueError(f"unsupported SDE kind {kind!r}")
    return mean, std.expand(x_s.shape[0], *std.shape[1:])


def sde_step_with_logprob(
    x_s: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float = 0.7,
    kind: SDEKind = "sde",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    sigma_max_substitute: Tensor | float | None = None,
) -> SDEStep:
    """One stochastic flow step s -> s' < s as a Gaussian policy, with its log-probability.

    Flow-GRPO's two steps (`sde_step_with_logprob` with `sde_type`), a = `noise_level`,
    D = s' - s < 0:

    kind="sde" (the SDE with the flow ODE's marginals):
        std_s = a sqrt(s / (1 - s))
        mean  = x_s + [v + std_s^2 / (2 s) (x_s + (1 - s) v)] D
        std   = std_s sqrt(-D)
    kind="cps" (coefficients-preserving sampling, arXiv 2509.05952):
        std   = s' sin(a pi / 2)
        mean  = x0_hat (1 - s') + eps_hat sqrt(s'^2 - std^2),
                x0_hat = x_s - s v,  eps_hat = x_s + (1 - s) v
    then prev_sample = mean + std z and, for both,
        log p = mean over the elements of each sample of
                -(prev - mean)^2 / (2 std^2) - log std - log sqrt(2 pi).
    Flow-GRPO drops the constants for CPS (it keeps only -(prev - mean)^2, so also the
    1 / (2 std^2) scale); we keep the full density so both kinds compare with
    `spo.ddim.ddim_step_with_logprob`. As a -> 0 both means become the Euler step.

    With `prev_sample` the log-probability of that given transition is returned; otherwise
    z = `noise` if given, else drawn from `generator`. `prev_sample` enters the density
    detached (as in Flow-GRPO): gradients reach the log-probability through mean and std only.

    `sigma_max_substitute`: the "sde" std divides by 1 - s, infinite at s = 1. Flow-GRPO
    computes it there as sqrt(s / (1 - sigmas[1])) with sigmas[1] the schedule's second sigma
    (the next one after s = 1); pass that value here to do the same. Without it a sample with
    s >= 1 raises ValueError. "cps" needs s' > 0 (its std is 0 at s' = 0: no density).
    Returns SDEStep(prev_sample, log_prob (N,), mean, std (N,)).
    """
    mean, std = sde_step_gaussian(
        x_s,
        velocity,
        sigma,
        sigma_next,
        noise_level=noise_level,
        kind=kind,
        sigma_max_substitute=sigma_max_substitute,
    )
    if prev_sample is None:
        if noise is None:
            device = generator.device if generator is not None else x_s.device
            noise = torch.randn(x_s.shape, generator=generator, device=device)
        prev_sample = mean + std * noise.to(mean)
    prev = prev_sample.detach().float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return SDEStep(prev_sample, log_prob.flatten(1).mean(dim=1), mean, std.flatten())


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """The static timestep shift of SD3 / FlowMatchEulerDiscreteScheduler:
    shift s / (1 + (shift - 1) s); shift 1 is the identity, SD3 uses 3."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent mu: the line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) at image_seq_len (the number of latent patches)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(sigma: Tensor, mu: float, exponent: float = 1.0) -> Tensor:
    """The dynamic (exponential) shift: e^mu / (e^mu + (1 / s - 1)^exponent); 0 stays 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1) ** exponent)


def flow_sigmas(
    num_inference_steps: int,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """The (steps + 1,) float32 sampling sigmas of FlowMatchEulerDiscreteScheduler.set_timesteps
    (the schedule SD3's pipeline uses), from 1 down to the appended final 0.

    Static shift (mu None): linspace(1, shift(1 / T), steps), then shifted, where T =
    `num_train_timesteps`. The end point is the scheduler's smallest training sigma, which is
    already shifted, so it is shifted twice (diffusers' behaviour, kept to match it).
    Dynamic shift (mu given, use_dynamic_shifting=True): linspace(1, 1 / T, steps) through
    `time_shift(., mu)`; `shift` is then unused. Timesteps for the transformer: 1000 s.
    """
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be >= 1")
    smallest = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64)
    if mu is None:
        smallest = shift_sigmas(smallest, shift)
    base = torch.linspace(1.0, smallest.item(), num_inference_steps, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift) if mu is None else time_shift(base, mu)
    return torch.cat([sigmas.float(), torch.zeros(1)])


def flux_sigmas(
    num_inference_steps: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """The (steps + 1,) float32 sigmas of FLUX's pipeline: linspace(1, 1 / steps, steps) through
    `time_shift` with mu = `calculate_shift(image_seq_len, ...)`, then the final 0."""
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be >= 1")
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    base = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=torch.float64)
    return torch.cat([time_shift(base, mu).float(), torch.zeros(1)])


def sigmas_to_timesteps(sigma: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """The timestep the flow transformer is conditioned on: t = T s."""
    return sigma * num_train_timesteps


def _device(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device | str | None:
    """Where to draw: `device` if given, else the generator's (so a CUDA generator works)."""
    if device is None and generator is not None:
        return generator.device
    return device


def sample_sigmas_uniform(
    n: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """n training noise levels s ~ U[0, 1), then `shift_sigmas(s, shift)` (shift 1: none)."""
    u = torch.rand(n, generator=generator, device=_device(generator, device))
    return shift_sigmas(u, shift)


def sample_sigmas_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """n training noise levels from SD3's logit-normal: s = sigmoid(mean + std n), n ~ N(0, 1),
    then `shift_sigmas(s, shift)` (shift 1: none). In (0, 1)."""
    z = torch.randn(n, generator=generator, device=_device(generator, device))
    return shift_sigmas(torch.sigmoid(mean + std * z), shift)

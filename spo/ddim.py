"""DDIM and diffusion math as pure tensor functions (method.md sections 2 and 3).

Why here and pure: the SPM's noisy training images, the SPO pool sampler and the evaluation
all need the same classifier-free guidance and one-step clean-image prediction; keeping them as
small functions lets the tests check them against hand-computed values and against diffusers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction"]


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 gives `cond`."""
    return uncond + scale * (cond - uncond)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) in `like`'s dtype, so per-sample scalars scale whole latents."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def predict_x0(
    x_t: Tensor,
    model_output: Tensor,
    alpha_bar_t: Tensor,
    prediction_type: PredictionType = "epsilon",
) -> Tensor:
    """The one-step estimate of the clean latent from x_t (the DDIM "x0_hat").

    epsilon:      x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    v_prediction: x0 = sqrt(a_t) * x_t - sqrt(1 - a_t) * v
    `alpha_bar_t` holds one cumulative alpha per sample (N,).
    """
    a = _broadcast(alpha_bar_t, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def predict_epsilon(
    x_t: Tensor,
    model_output: Tensor,
    alpha_bar_t: Tensor,
    prediction_type: PredictionType = "epsilon",
) -> Tensor:
    """The noise estimate eps_hat implied by the model output (identity for epsilon models)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        a = _broadcast(alpha_bar_t, x_t)
        return (1 - a).sqrt() * x_t + a.sqrt() * model_output
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def add_noise(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """Forward diffusion q(x_t | x_0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise."""
    a = _broadcast(alpha_bar_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_step_gaussian(
    x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The Gaussian of one DDIM step x_t -> x_{t-1} (method.md 3), in float32: its mean
    sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps and its standard deviation sigma
    (shaped (N, 1, ...), one per sample). eta must be > 0 for the step to be a Gaussian."""
    if eta <= 0:
        raise ValueError("eta must be > 0: a deterministic step has no log-probability")
    a_t = _broadcast(alpha_bar_t, x_t).float()
    a_prev = _broadcast(alpha_bar_prev, x_t).float()
    x_t, eps = x_t.float(), eps.float()
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def ddim_step_with_logprob(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: Tensor,
    alpha_bar_prev: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy, with its log-probability (method.md 3).

        x0_hat  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        sigma^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
        mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps
        log p   = mean over the elements of each sample of
                  -(x_prev - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)

    `eps` is the guided noise estimate; `alpha_bar_*` hold one value per sample (N,).
    With `prev_sample` the log-probability of that given transition is returned (scoring a
    stored transition); otherwise x_prev = mu + sigma * z with z = `noise` if given, else
    drawn from `generator`.
    Returns (x_prev, log p (N,)). eta must be > 0 for a log-probability to exist.
    """
    mean, std = ddim_step_gaussian(x_t, eps, alpha_bar_t, alpha_bar_prev, eta)
    if prev_sample is None:
        if noise is None:
            device = generator.device if generator is not None else None
            noise = torch.randn(x_t.shape, generator=generator, device=device)
        prev_sample = mean + std * noise.to(mean)
    prev = prev_sample.float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.flatten(1).mean(dim=1)

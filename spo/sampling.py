"""Sampling math as pure tensor functions (SPEC.md sections 2 and 3).

Why here and pure: the SPM's noisy training images, the SPO pool sampler and the evaluation
all need the same classifier-free guidance and one-step clean-image prediction; keeping them as
small functions lets the tests check them against hand-computed values and against diffusers.
"""

from __future__ import annotations

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


def shared_pair_noise(
    num_pairs: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> Tensor:
    """One Gaussian noise per pair, repeated for its two images: (2 * num_pairs, *shape).

    Pairs are laid out image 0, image 1, image 0, image 1, ... (repeat_interleave order), so both
    images of a pair are judged at the same t with the same noise (SPEC.md 1 and 2).
    """
    noise = torch.randn((num_pairs, *shape), generator=generator, device=generator.device)
    return noise.to(device).repeat_interleave(2, dim=0)

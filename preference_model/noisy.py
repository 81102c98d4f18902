"""The SPM's training input: the one-step clean-image prediction x0_hat of a noisy image.

method.md section 2: encode both images of a pair with the frozen VAE, draw one t and one noise
shared by the pair, let the frozen base UNet predict the noise with classifier-free guidance
(empty negative prompt), take the one-step x0_hat and decode it. The SPM then judges
(decoded x0_hat, t), which is exactly what it sees inside SPO's sampler. As in the released
trainer, each image's latents are a draw from the VAE posterior and a pair drawn at t = 0 is
noised at alpha_bar_0 and predicted like the others; validation (and SPO's final samples) judge
t = 0 as the clean image.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class DiffusionBackend(Protocol):
    """The diffusion calls the maker needs (`spo.models.DiffusionModel` has them): the frozen
    UNet, VAE encode / decode, text conditioning, and the noise schedule's math."""

    unet: torch.nn.Module
    device: torch.device

    def encode_images(self, pixels: Tensor, generator=None) -> Tensor: ...
    def decode_latents(self, latents: Tensor) -> Tensor: ...
    def encode_text(self, prompts: list[str]) -> Any: ...
    def empty_text(self, n: int) -> Any: ...
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor: ...
    def guided_output(self, unet, x: Tensor, t: Tensor, cond: Any, scale: float) -> Tensor: ...
    def predict_x0(self, x_t: Tensor, output: Tensor, timesteps: Tensor) -> Tensor: ...


class NoisyImageMaker:
    """Turns batches of clean pairs into decoded x0_hat images at given timesteps.

    One UNet call per micro-batch of `max_pairs` pairs (the conditional and unconditional
    inputs of both images together); each caption's text embedding is computed once.
    `sample_posterior`: each image's latents are drawn from the VAE posterior (the release),
    else its mean. `noise_t0`: a pair at t = 0 is noised and predicted like any other (the
    release's training), else returned as the clean image (its validation).
    """

    def __init__(
        self,
        model: DiffusionBackend,
        guidance_scale: float = 5.0,
        max_pairs: int = 64,
        *,
        sample_posterior: bool = True,
        noise_t0: bool = True,
    ) -> None:
        self.model = model
        self.guidance_scale = guidance_scale
        self.max_pairs = max_pairs
        self.sample_posterior = sample_posterior
        self.noise_t0 = noise_t0

    @torch.no_grad()
    def __call__(
        self,
        pixels: Tensor,
        captions: list[str],
        timesteps: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        """`pixels` (B, 2, 3, H, W) in [-1, 1], `timesteps` (B,) -> x0_hat images, same shape.

        Without `noise_t0`, pairs with t = 0 are returned unchanged (clean images).
        `generator` draws the latents and the noise, so a fixed generator gives fixed inputs
        (validation).
        """
        out = pixels.clone().float()
        chosen = timesteps >= 0 if self.noise_t0 else timesteps > 0
        noisy = torch.nonzero(chosen).flatten().tolist()
        for start in range(0, len(noisy), self.max_pairs):
            idx = noisy[start : start + self.max_pairs]
            out[idx] = self._x0_hat(
                pixels[idx], [captions[i] for i in idx], timesteps[idx], generator
            ).to(out.device)
        return out

    def _x0_hat(
        self, pixels: Tensor, captions: list[str], timesteps: Tensor, generator: torch.Generator
    ) -> Tensor:
        model = self.model
        b = pixels.shape[0]
        posterior_generator = generator if self.sample_posterior else None
        # (2B, C, h, w): 0, 1, 0, 1, ...
        latents = model.encode_images(pixels.flatten(0, 1), generator=posterior_generator)
        noise = torch.randn((b, *latents.shape[1:]), generator=generator, device=generator.device)
        noise = noise.to(latents).repeat_interleave(2, dim=0)
        t = timesteps.to(model.device).long().repeat_interleave(2)
        x_t = model.add_noise(latents, noise, t)
        text = model.encode_text(captions).repeat_interleave(2)
        both = type(text).cat([text, model.empty_text(2 * b)])
        guided = model.guided_output(model.unet, x_t, t, both, self.guidance_scale)
        x0 = model.predict_x0(x_t.float(), guided, t)
        return model.decode_latents(x0).unflatten(0, (b, 2))


class NoisyLatentMaker:
    """The latent judge's training input: both images of a pair VAE-encoded (posterior
    sampled), noised at the pair's t with one noise shared by the pair (method.md 6). t = 0 gives
    the clean latents, as SPO's final samples are judged."""

    def __init__(self, model: DiffusionBackend) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(
        self, pixels: Tensor, captions: list[str], timesteps: Tensor, generator: torch.Generator
    ) -> Tensor:
        """`pixels` (B, 2, 3, H, W) in [-1, 1], `timesteps` (B,) -> x_t (B, 2, C, h, w)."""
        model = self.model
        b = pixels.shape[0]
        latents = model.encode_images(pixels.flatten(0, 1), generator=generator).float()
        noise = torch.randn((b, *latents.shape[1:]), generator=generator, device=generator.device)
        noise = noise.to(latents).repeat_interleave(2, dim=0)
        t = timesteps.to(latents.device).long().repeat_interleave(2)
        x_t = torch.where((t > 0).view(-1, 1, 1, 1), model.add_noise(latents, noise, t), latents)
        return x_t.unflatten(0, (b, 2))

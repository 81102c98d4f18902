"""FLUX.1: a rectified-flow transformer of double- and single-stream blocks (SPEC 8) that sees
its 16-channel latents packed 2x2 into 64-channel tokens, conditioned on T5's hidden states and
CLIP's pooled embedding, with the guidance scale as an input (FLUX.1-dev is guidance-distilled:
one forward per step, no unconditional branch) instead of classifier-free guidance.

The recipes keep latents unpacked (N, C, H, W) everywhere (noise, interpolation, the MSE, which
packing only permutes); packing happens inside `forward`, with the pipeline's own helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from spo.families import FlowTransformerFamily, TextConditioning

# The guidance value a guidance-embedded transformer is trained at: FLUX.1-dev's pipeline
# default, which diffusers' FLUX LoRA trainers also pass while training.
TRAINING_GUIDANCE = 3.5


class FluxFamily(FlowTransformerFamily):
    name = "flux"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")
    hub_tag = "flux"
    denoiser_class = "FluxTransformer2DModel"
    compile_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    t5_tokenizer = "tokenizer_2"
    pipeline_t5_tokens = 512  # FluxPipeline's default max_sequence_length
    pipeline_sample_size = 128  # FluxPipeline.default_sample_size: 1024 px with the 8x VAE

    @classmethod
    def latent_channels(cls, denoiser_config: dict[str, Any]) -> int:
        """The VAE's channels: the transformer's input is four of them packed (2x2)."""
        return int(denoiser_config["in_channels"]) // 4

    @classmethod
    def native_resolution(cls, denoiser_config: dict[str, Any], vae_scale: int) -> int:
        """The pipeline's default size (the transformer has no sample size: rope positions)."""
        return cls.pipeline_sample_size * vae_scale

    @classmethod
    def image_tokens(cls, latent_height: int, latent_width: int, denoiser_config: dict) -> int:
        return (latent_height // 2) * (latent_width // 2)

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1-dev embeds the guidance scale (read from the pipeline's own transformer: a
        trained copy may be wrapped for distributed training)."""
        return bool(self.pipe.transformer.config.guidance_embeds)

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        """FluxPipeline's sigmas: linspace(1, 1 / steps, steps) before the shift."""
        import numpy as np

        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}

    def encode(self, prompts: Sequence[str], device: torch.device) -> TextConditioning:
        """The pipeline's own encoding at `t5_tokens`: T5's hidden states and CLIP's pooled
        embedding."""
        hidden, pooled, _ = self.pipe.encode_prompt(
            list(prompts), None, device=device, max_sequence_length=self.t5_tokens
        )
        return TextConditioning(hidden, pooled)

    def forward(
        self,
        denoiser: Any,
        latents: Tensor,
        timesteps: Tensor,
        text: TextConditioning,
        resolution: int,
        guidance: float | None = None,
    ) -> Tensor:
        """The velocity for unpacked latents: packed 2x2 on the way in and unpacked on the way
        out, exactly as the pipeline does; the transformer takes the noise level itself
        (timesteps / 1000) and, when guidance-distilled, `guidance` (`TRAINING_GUIDANCE` when
        not given)."""
        pipe_class = type(self.pipe)
        n, c, h, w = latents.shape
        packed = pipe_class._pack_latents(latents, n, c, h, w)
        img_ids = pipe_class._prepare_latent_image_ids(
            n, h // 2, w // 2, latents.device, latents.dtype
        )
        txt_ids = torch.zeros(text.hidden.shape[1], 3, device=latents.device, dtype=latents.dtype)
        scale = None
        if self.guidance_distilled:
            value = TRAINING_GUIDANCE if guidance is None else guidance
            scale = torch.full((n,), value, device=latents.device)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=scale,
            pooled_projections=text.pooled.to(latents.dtype),
            encoder_hidden_states=text.hidden.to(latents.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        vae_scale = resolution // h
        return pipe_class._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)


FAMILY = FluxFamily

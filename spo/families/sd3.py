"""Stable Diffusion 3 / 3.5: an MMDiT transformer predicting the rectified-flow velocity,
conditioned on two CLIP encoders' hidden states (and T5's, when the pipeline has it) and their
pooled embeddings (SPEC 8); sampled with the flow-matching Euler scheduler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from spo.families import FlowTransformerFamily, TextConditioning


class SD3Family(FlowTransformerFamily):
    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    hub_tag = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    compile_blocks = ("JointTransformerBlock",)
    t5_tokenizer = "tokenizer_3"
    pipeline_t5_tokens = 256  # StableDiffusion3Pipeline's default max_sequence_length

    def encode(self, prompts: Sequence[str], device: torch.device) -> TextConditioning:
        """The pipeline's own encoding (CLIP penultimate states beside T5's, or zeros where
        the pipeline has no T5), at `t5_tokens`, as the toolkit samples."""
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts),
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.t5_tokens,
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
        """The transformer's velocity; `timesteps` are 1000 x the noise level (SPEC 8)."""
        return denoiser(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=text.hidden.to(latents.dtype),
            pooled_projections=text.pooled.to(latents.dtype),
        ).sample


FAMILY = SD3Family

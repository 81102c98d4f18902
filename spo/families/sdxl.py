"""SDXL: two CLIP text encoders (hidden states concatenated, the second's pooled embedding) and
the UNet's added conditioning (pooled text, `add_time_ids`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from spo.families import Family, TextConditioning


class SDXLFamily(Family):
    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    hub_tag = "stable-diffusion-xl"

    def encode(self, prompts: Sequence[str], device: torch.device) -> TextConditioning:
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=False
        )
        return TextConditioning(hidden, pooled)

    def unconditional(self, empty: TextConditioning) -> TextConditioning:
        """Zeros where the pipeline says so (`force_zeros_for_empty_prompt`), as it samples."""
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return TextConditioning(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))
        return empty

    def denoiser_kwargs(
        self, latents: Tensor, text: TextConditioning, resolution: int
    ) -> dict[str, Any]:
        return {
            "added_cond_kwargs": {
                "text_embeds": text.pooled.to(latents.dtype),
                "time_ids": add_time_ids(latents.shape[0], resolution, latents),
            }
        }


def add_time_ids(n: int, resolution: int, like: Tensor) -> Tensor:
    """SDXL's micro-conditioning (original size, crop top-left, target size) of full-frame
    images at `resolution`, n rows in `like`'s dtype and device."""
    r = resolution
    ids = torch.tensor([r, r, 0, 0, r, r], dtype=like.dtype, device=like.device)
    return ids.expand(n, -1)


FAMILY = SDXLFamily

"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet conditioned on its hidden states."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spo.families import Family, TextConditioning


class SDFamily(Family):
    name = "sd"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    hub_tag = "stable-diffusion"

    def encode(self, prompts: Sequence[str], device: torch.device) -> TextConditioning:
        hidden, _ = self.pipe.encode_prompt(
            list(prompts), device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return TextConditioning(hidden)


FAMILY = SDFamily

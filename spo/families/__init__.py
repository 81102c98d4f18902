"""Model families: what differs between SD1.5-, SDXL- (and later flow-) pipelines, one module
each, behind one small interface that `spo.models.DiffusionModel` delegates to.

Why a module per family: the recipes and samplers call `DiffusionModel` and never ask which
family a model is; a new family is a new module here and one line in `FAMILIES`, not an
`if family == ...` in every recipe (docs/architecture.md). A family is found from the pipeline
class diffusers names in `model_index.json` (`_class_name`), so a folder's family is known
before any weight loads.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class TextConditioning:
    """What the UNet is conditioned on: hidden states, plus SDXL's pooled text embedding."""

    hidden: Tensor  # (N, L, D)
    pooled: Tensor | None = None  # (N, P), SDXL only

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, idx: Tensor | Sequence[int]) -> TextConditioning:
        idx = torch.as_tensor(idx, device=self.hidden.device)
        pooled = None if self.pooled is None else self.pooled[idx]
        return TextConditioning(self.hidden[idx], pooled)

    def repeat_interleave(self, repeats: int) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(repeats, 0)
        return TextConditioning(self.hidden.repeat_interleave(repeats, 0), pooled)

    @staticmethod
    def cat(parts: Sequence[TextConditioning]) -> TextConditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled)


# Family name -> the module holding its `Family` subclass (imported only when asked for).
FAMILIES: dict[str, str] = {
    "sd": "spo.families.sd",
    "sdxl": "spo.families.sdxl",
    "sd3": "spo.families.sd3",
    "flux": "spo.families.flux",
}


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    # the diffusers pipeline classes (model_index.json `_class_name`) of this family
    pipelines: ClassVar[tuple[str, ...]]
    hub_tag: ClassVar[str]  # the Hub tag of the family on a model card
    denoiser: ClassVar[str] = "unet"  # the pipeline component that denoises
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"  # its diffusers class
    # the denoiser's repeated blocks (class names), what `speed.compile=regional` compiles:
    # a UNet's attention blocks, as diffusers' `compile_repeated_blocks` does (its resnet
    # blocks come in many sizes, each its own compilation, for convolutions cuDNN runs well)
    compile_blocks: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock",)
    # ddpm: a discrete noise schedule sampled with DDIM (epsilon or v prediction); flow:
    # rectified flow, velocity prediction, sampled with the pipeline's flow-matching scheduler
    schedule: ClassVar[str] = "ddpm"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @classmethod
    def latent_channels(cls, denoiser_config: dict[str, Any]) -> int:
        """The VAE latent channels the denoiser takes, from its config."""
        return int(denoiser_config["in_channels"])

    @classmethod
    def native_resolution(cls, denoiser_config: dict[str, Any], vae_scale: int) -> int:
        """The image size the model is made for, from its denoiser's config."""
        return int(denoiser_config["sample_size"]) * vae_scale

    @classmethod
    def image_tokens(cls, latent_height: int, latent_width: int, denoiser_config: dict) -> int:
        """The denoiser's image sequence length (a flow scheduler's dynamic shift reads it)."""
        patch = int(denoiser_config.get("patch_size", 1))
        return (latent_height // patch) * (latent_width // patch)

    def flow_shift(self, latent_height: int, latent_width: int) -> float:
        """The scheduler's timestep shift at this latent size as a static factor: `shift`, or
        e^mu for a dynamically shifting scheduler (FLUX; the exponential shift with mu equals
        the static one with factor e^mu), mu from the image sequence length as its pipeline
        computes it."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        from spo.flow import calculate_shift

        tokens = self.image_tokens(
            latent_height, latent_width, getattr(self.pipe, self.denoiser).config
        )
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu)

    def encode(self, prompts: Sequence[str], device: torch.device) -> TextConditioning:
        """The denoiser's text conditioning of `prompts` (no classifier-free guidance)."""
        raise NotImplementedError

    def lora_file_state(self, peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """LoRA tensors named as this family's diffusers LoRA files name them, as its own
        training scripts save them: UNet scripts convert peft's names (`lora_A`) to diffusers'
        (`lora.down`) for the attention projections. One file must not mix the two: diffusers
        then reads only the peft-named part."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the pipeline's call when the toolkit samples with it, so that
        sampling sees the text conditioning `encode` makes (flow families: the T5 length)."""
        return {}

    def unconditional(self, empty: TextConditioning) -> TextConditioning:
        """The conditioning of the guidance's unconditional branch, given the empty prompt's."""
        return empty

    def denoiser_kwargs(
        self, latents: Tensor, text: TextConditioning, resolution: int
    ) -> dict[str, Any]:
        """Extra keyword arguments of the denoiser call beside latents, timesteps and hidden
        states (SDXL's added conditioning)."""
        return {}

    def forward(
        self,
        denoiser: Any,
        latents: Tensor,
        timesteps: Tensor,
        text: TextConditioning,
        resolution: int,
        guidance: float | None = None,
    ) -> Tensor:
        """One call of `denoiser` (the family's own, or a trained copy of it): a UNet's
        `unet(latents, t, encoder_hidden_states, **denoiser_kwargs)` by default. `guidance`:
        the guidance scale of a guidance-distilled denoiser (`guidance_distilled`); others
        ignore it."""
        kwargs = self.denoiser_kwargs(latents, text, resolution)
        hidden = text.hidden.to(latents.dtype)
        return denoiser(latents, timesteps, encoder_hidden_states=hidden, **kwargs).sample

    @property
    def guidance_distilled(self) -> bool:
        """Whether the denoiser takes the guidance scale as an input (one forward per step)
        instead of classifier-free guidance's two branches."""
        return False

    def sampling_sigmas(self, num_steps: int, latent_height: int, latent_width: int) -> Tensor:
        """A flow family's (num_steps + 1,) noise levels, 1 down to 0, as its pipeline sets
        its scheduler at this latent size."""
        raise NotImplementedError(f"{self.name} has no flow schedule")

    def sampling_scheduler(self, scheduler: Any) -> Any:
        """The scheduler the toolkit samples with: DDIM on the pipeline's own noise schedule
        (method.md 3 / 4); flow families keep theirs."""
        if self.schedule != "ddpm":
            return scheduler
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler.config)


class FlowTransformerFamily(Family):
    """What the rectified-flow transformer families (SD3, FLUX) share: the transformer as the
    denoiser, the flow schedule, T5 at a set length, and LoRA files with peft's key names."""

    denoiser = "transformer"
    schedule = "flow"
    t5_tokenizer: ClassVar[str]  # the pipeline component that tokenizes for T5
    pipeline_t5_tokens: ClassVar[int]  # the pipeline's default max_sequence_length

    @property
    def t5_tokens(self) -> int:
        """T5's sequence length: the pipeline's default, or its T5 tokenizer's
        `model_max_length` when smaller (the toy flow model's 16: its T5 is zero)."""
        tokenizer = getattr(self.pipe, self.t5_tokenizer, None)
        limit = getattr(tokenizer, "model_max_length", None) or self.pipeline_t5_tokens
        return min(self.pipeline_t5_tokens, int(limit))

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_tokens}

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        """What the pipeline hands `set_timesteps` beside the step count (and `mu`)."""
        return {}

    def sampling_sigmas(self, num_steps: int, latent_height: int, latent_width: int) -> Tensor:
        """The pipeline's own `set_timesteps` on a copy of its scheduler: the static shift, or
        the dynamic one with mu from the image sequence length (`flow_shift`)."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        kwargs = self.scheduler_kwargs(num_steps)
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = math.log(self.flow_shift(latent_height, latent_width))
        scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas.float().cpu()

    def lora_file_state(self, peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """peft's names, as diffusers' transformer LoRA scripts save them."""
        return peft_state


def family_class(name: str) -> type[Family]:
    """The `Family` subclass registered as `name`."""
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_for_pipeline(class_name: str) -> str | None:
    """The family name serving diffusers pipeline class `class_name`, or None."""
    for name in FAMILIES:
        if class_name in family_class(name).pipelines:
            return name
    return None


def family_name(class_name: str, second_text_encoder: bool) -> str:
    """The family of a pipeline by its class; a pipeline class no family names (a custom one)
    is told apart by its components: two text encoders, SDXL, else SD."""
    return family_for_pipeline(class_name) or ("sdxl" if second_text_encoder else "sd")


def family_of(pipe: Any) -> Family:
    """The family of a loaded (or built) pipeline."""
    second = getattr(pipe, "text_encoder_2", None) is not None
    return family_class(family_name(type(pipe).__name__, second))(pipe)

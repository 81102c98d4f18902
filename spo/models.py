"""Diffusion models behind one small interface.

Why: the SPM's noisy-image maker, the DPO and SPO recipes and the evaluation all need the same
few things from a diffusers pipeline (text conditioning, the denoiser call with a family's extra
inputs, VAE encode / decode, the noise schedule). What differs between model families (SD1.5's
one text encoder; SDXL's two, pooled embedding and `add_time_ids`) is each family's module in
`spo.families`, which `DiffusionModel` delegates to. Loading goes through diffusers' own
`DiffusionPipeline.from_pretrained`, so hub names and local folders both work.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spo import flow
from spo.ddim import add_noise, cfg_combine, predict_epsilon, predict_x0
from spo.errors import ConfigError
from spo.families import TextConditioning, family_class, family_name, family_of
from spo.sources import is_local_path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PRECISIONS = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are loaded in for accelerate's `mixed_precision` (no / fp16 /
    bf16)."""
    return DTYPES[_PRECISIONS[mixed_precision]]


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component loading bars from diffusers / transformers: loading is quick, and
    the recipes show their own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [m.is_progress_bar_enabled() for m in (diffusers_logging, transformers_logging)]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in zip((diffusers_logging, transformers_logging), enabled, strict=True):
            if was:
                module.enable_progress_bar()


def describe_pipeline_folder(source: str) -> dict | None:
    """`DiffusionModel.describe`'s family and sizes read from a local pipeline folder's config
    files, without loading a weight (None for a Hub name or an unreadable folder): a judge of
    another family is refused before any model loads."""
    root = Path(source)
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        second = (index.get("text_encoder_2") or [None])[0] is not None
        family = family_name(index["_class_name"], second)
        kind = family_class(family)
        denoiser = json.loads((root / kind.denoiser / "config.json").read_text(encoding="utf-8"))
        return {
            "source": str(source),
            "family": family,
            "resolution": kind.native_resolution(denoiser, scale),
            "latent_channels": kind.latent_channels(denoiser),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_family(found: str | None, wanted: str | None, source: str) -> None:
    """One line when a config written for the model family `wanted` (its `model_family` key)
    is given a base model of another family (`found`; None: not known before loading)."""
    if wanted is not None and found is not None and found != wanted:
        raise ConfigError(
            f"base model {source} is a {found} model, but this config is written for {wanted} "
            f"(config key 'model_family'): use a {found} config, or set model_family={found} "
            "(or null) if its settings are meant for it"
        )


def require_family(source: str, wanted: str | None) -> None:
    """`check_family` before any weight loads, for a local pipeline folder."""
    facts = describe_pipeline_folder(source)
    check_family(facts and facts["family"], wanted, source)


class DiffusionModel:
    """The frozen parts of an SD-family pipeline and the calls the recipes make on them.

    The UNet held here is the one the recipes train or freeze; `unet_forward` takes any UNet of
    the same architecture (a policy with adapters, a reference copy) so the SDXL extras are
    written once.
    """

    def __init__(self, pipe, text_cache_size: int = 4096) -> None:
        self.pipe = pipe
        self.family_module = family_of(pipe)
        self.family = self.family_module.name
        self.vae = pipe.vae
        # the denoiser (a UNet, or a flow family's transformer), named `unet` by the recipes
        self.unet = getattr(pipe, self.family_module.denoiser)
        self.scheduler = pipe.scheduler
        if self.family_module.schedule == "ddpm":
            self.alphas_cumprod = self.scheduler.alphas_cumprod.float()
            self.prediction_type = self.scheduler.config.prediction_type
        else:  # rectified flow: no discrete alphas; the denoiser predicts the velocity
            self.alphas_cumprod = None
            self.prediction_type = "flow"
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.family_module.native_resolution(
            self.unet.config, self.vae_scale_factor
        )
        self.latent_channels = self.family_module.latent_channels(self.unet.config)
        self._text_cache: OrderedDict[str, TextConditioning] = OrderedDict()
        self._text_cache_size = text_cache_size

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        vae: str | None = None,
        what: str = "base model",
    ) -> DiffusionModel:
        """Load a diffusers pipeline folder or hub name of any family, frozen, on `device`.

        `vae` replaces the pipeline's VAE (e.g. SDXL's fp16-safe VAE). A VAE that asks to be
        upcast (`force_upcast`) stays in float32 when `dtype` is float16.
        """
        from diffusers import AutoencoderKL, DiffusionPipeline

        if is_local_path(source) and not (Path(source) / "model_index.json").is_file():
            raise ConfigError(
                f"{what} {source}: not a diffusers pipeline folder (no model_index.json)"
            )
        kwargs = {}
        if vae is not None:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae, dtype=dtype)
        try:
            with quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load {what} {source}: {e}") from e
        for name in ("vae", family_of(pipe).denoiser, "text_encoder"):
            if getattr(pipe, name, None) is None:
                raise ConfigError(f"{what} {source}: the pipeline has no {name}")
        return cls.from_pipeline(pipe, dtype=dtype, device=device, upcast_vae=vae is None)

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        upcast_vae: bool = True,
    ) -> DiffusionModel:
        """A loaded (or freshly built) pipeline, frozen, with its family's sampling scheduler
        (DDIM on the pipeline's noise schedule, method.md 3 / 4; a flow family keeps its own),
        on `device`. A VAE that asks to be upcast (`force_upcast`) stays in float32 when
        `dtype` is float16."""
        pipe.scheduler = family_of(pipe).sampling_scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        force_upcast = pipe.vae.config.get("force_upcast", False)
        if dtype == torch.float16 and upcast_vae and force_upcast:
            pipe.vae.to(torch.float32)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        return cls(pipe)

    @classmethod
    def for_training(cls, cfg, accelerator) -> DiffusionModel:
        """The base pipeline of a DPO / SPO config (`base_model`, `vae`, `resolution`) on the
        accelerator's device, its frozen weights in the dtype of the run's mixed precision (the
        config's, or the launcher's when the config leaves it unset)."""
        dtype = weight_dtype(accelerator.mixed_precision)
        device = accelerator.device
        model = cls.from_pretrained(cfg.base_model, dtype=dtype, device=device, vae=cfg.vae)
        return model.at_resolution(cfg.resolution)

    def at_resolution(self, resolution: int | None) -> DiffusionModel:
        """This model working at `resolution` px (None: its own), for training, SPO's
        sampling and the images it generates."""
        if resolution is not None:
            self.resolution = resolution
        return self

    def fast_decode(self, *, compile_decoder: bool = False) -> None:
        """Faster VAE decoding on a GPU, the same math: channels_last memory format and cuDNN
        autotuning, optionally the decoder compiled. Nothing changes on a CPU."""
        if self.device.type != "cuda":
            return
        torch.backends.cudnn.benchmark = True
        self.vae.to(memory_format=torch.channels_last)
        if compile_decoder:
            self.vae.decoder.compile()

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def describe(self) -> dict:
        """What an SPM trained on this model's x0_hat must match (family, sizes)."""
        return {
            "source": str(self.pipe.name_or_path),
            "family": self.family,
            "resolution": self.resolution,
            "latent_channels": self.latent_channels,
        }

    # ------------------------------------------------------------------------------ text

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextConditioning:
        """Text conditioning per prompt; each distinct prompt is encoded once (LRU cache), on
        its own: a text encoder's output can round differently with the batch it is in (SD3's
        pooled projections do, by 2e-7), and a resumed run, whose cache starts empty, must see
        bit for bit the conditioning of the uninterrupted one."""
        for prompt in dict.fromkeys(p for p in prompts if p not in self._text_cache):
            self._text_cache[prompt] = self.family_module.encode([prompt], self.device)
        parts = []
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
            parts.append(self._text_cache[prompt])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return TextConditioning.cat(parts)

    @torch.no_grad()
    def empty_text(self, n: int) -> TextConditioning:
        """The unconditional input of classifier-free guidance for n samples: the empty prompt,
        or what the family makes of it (SDXL's `force_zeros_for_empty_prompt`)."""
        return self.family_module.unconditional(self.encode_text([""])).index([0] * n)

    # ------------------------------------------------------------------------------ UNet

    def unet_forward(
        self, unet, latents: Tensor, timesteps: Tensor, text: TextConditioning
    ) -> Tensor:
        """One call of the denoiser `unet` (this model's, or a trained copy) as its family
        makes it (SDXL's added conditioning, SD3's pooled projections)."""
        return self.family_module.forward(unet, latents, timesteps, text, self.resolution)

    def guided_output(
        self, unet, x: Tensor, t: int | Tensor, cond: TextConditioning, scale: float
    ) -> Tensor:
        """The classifier-free-guided model output for every row of x, conditional and
        unconditional rows in ONE UNet call. `t` is one timestep or one per row; `cond` holds
        the conditional rows followed by the unconditional ones (2N). float32."""
        timesteps = self._timesteps(t, x)
        dtype = next(unet.parameters()).dtype
        family = self.family_module
        if family.guidance_distilled:  # one forward with the scale as an input (FLUX.1-dev)
            text = cond.index(list(range(x.shape[0])))
            out = family.forward(unet, x.to(dtype), timesteps, text, self.resolution, scale)
            return out.float()
        out = self.unet_forward(unet, torch.cat([x, x]).to(dtype), timesteps.repeat(2), cond)
        e_c, e_u = out.float().chunk(2)
        return cfg_combine(e_u, e_c, scale)

    def _timesteps(self, t: int | float | Tensor, x: Tensor) -> Tensor:
        """One timestep per row of x: integers on a discrete schedule, 1000 s (a float) for
        rectified flow."""
        t = torch.as_tensor(t, device=x.device)
        t = t.float() if self.prediction_type == "flow" else t.long()
        return t.expand(x.shape[0])

    def guided_epsilon(
        self, unet, x: Tensor, t: int | Tensor, cond: TextConditioning, scale: float
    ) -> Tensor:
        """`guided_output` as a noise estimate: the output itself for epsilon models, the
        epsilon implied by it for v-prediction ones (what the DDIM step and its
        log-probability need; guidance commutes with the conversion, which is linear)."""
        out = self.guided_output(unet, x, t, cond, scale)
        timesteps = self._timesteps(t, x)
        return predict_epsilon(x, out, self.alpha_bar(timesteps), self.prediction_type)

    # ------------------------------------------------------------------------------ schedule

    def training_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        """n denoiser timesteps to train at: uniform over the discrete schedule (ddpm); for
        rectified flow 1000 x a noise level drawn logit-normal (SD3's training density) and
        moved by the scheduler's shift at the model's resolution (FLUX's depends on it), as the
        model is sampled (method.md: flow DPO)."""
        if self.prediction_type != "flow":
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        size = self.resolution // self.vae_scale_factor
        shift = self.family_module.flow_shift(size, size)
        sigmas = flow.sample_sigmas_logit_normal(n, shift=shift, generator=generator)
        return flow.sigmas_to_timesteps(sigmas, self.num_train_timesteps)

    def noised(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """(the noisy latents at `timesteps`, the denoiser's regression target): the noise
        (epsilon), v (v-prediction) or the velocity eps - x0 (rectified flow)."""
        x_t = self.add_noise(latents, noise, timesteps)
        if self.prediction_type == "flow":
            return x_t, flow.velocity_target(latents, noise)
        if self.prediction_type == "v_prediction":
            a = self.alpha_bar(timesteps).view(-1, *([1] * (latents.ndim - 1)))
            return x_t, a.sqrt() * noise - (1 - a).sqrt() * latents
        return x_t, noise

    def alpha_bar(self, timesteps: Tensor) -> Tensor:
        """Cumulative alpha of each timestep, float32 on the timesteps' device."""
        return self.alphas_cumprod.to(timesteps.device)[timesteps.long()]

    def flow_sigma(self, timesteps: Tensor) -> Tensor:
        """A flow model's noise level s = t / 1000 of each timestep, float32."""
        return timesteps.float() / self.num_train_timesteps

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward diffusion q(x_t | x_0) at one timestep per row; for rectified flow the
        interpolation at s = t / 1000 (the SPM's noisy inputs, SPEC 8)."""
        if self.prediction_type == "flow":
            return flow.interpolate(latents, noise, self.flow_sigma(timesteps))
        return add_noise(latents, noise, self.alpha_bar(timesteps))

    def predict_x0(self, x_t: Tensor, output: Tensor, timesteps: Tensor) -> Tensor:
        """The one-step clean-latent estimate from the model output (epsilon, v, or the flow
        velocity: x_s - s v)."""
        if self.prediction_type == "flow":
            return flow.predict_x0(x_t, output, self.flow_sigma(timesteps))
        return predict_x0(x_t, output, self.alpha_bar(timesteps), self.prediction_type)

    # ------------------------------------------------------------------------------ VAE

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) -> scaled latents. With a generator the posterior is
        sampled (as the DPO code does), otherwise its mean is used (deterministic)."""
        dist = self.posterior(pixels)
        latents = dist.sample(generator) if generator is not None else dist.mean
        return self._scale(latents)

    @torch.no_grad()
    def posterior(self, pixels: Tensor):
        """The VAE's posterior of pixels in [-1, 1]: a diagonal Gaussian (`mean`, `std`)."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
        """Scaled latents drawn from a posterior's moments, exactly as `encode_images` draws
        them from the posterior itself (the same generator gives the same latents)."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self._scale(mean + std * noise)

    def _scale(self, latents: Tensor) -> Tensor:
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels in [-1, 1] (clamped), float32."""
        vae_dtype = next(self.vae.parameters()).dtype
        shift = self.vae.config.get("shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(vae_dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        batch_size: int = 16,
    ) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] from the pipeline as it is now (the policy in place);
        image i depends only on (prompts[i], seeds[i])."""
        return self._sample(
            self.pipe,
            prompts,
            seeds,
            batch_size,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )

    def edit(
        self,
        prompts: Sequence[str],
        sources: Tensor,
        seeds: Sequence[int],
        strength: float,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        batch_size: int = 16,
    ) -> Tensor:
        """SDEdit: each source image (N, 3, resolution, resolution) in [0, 1] noised to
        `strength` and denoised with its prompt by the family's image-to-image pipeline, built
        on this pipeline's components (the policy in place); image i depends only on
        (prompts[i], sources[i], seeds[i]). Returns (N, 3, H, W) in [0, 1]."""
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(self.pipe)
        pipe.set_progress_bar_config(disable=True)
        # FLUX's and SD3's image-to-image pipelines take the size (FLUX's default is 1024 px,
        # which would resize the source); SD's and SDXL's read it off the image
        accepted = inspect.signature(pipe.__call__).parameters
        size = {k: self.resolution for k in ("height", "width") if k in accepted}
        return self._sample(
            pipe,
            prompts,
            seeds,
            batch_size,
            per_image={"image": sources},
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            **size,
        )

    def _sample(
        self,
        pipe,
        prompts: Sequence[str],
        seeds: Sequence[int],
        batch_size: int,
        per_image: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """`pipe` called in batches, image i with its own generator seeded seeds[i] (and its
        rows of `per_image`); returns (N, 3, H, W) in [0, 1] on the CPU."""
        out = []
        # Frozen weights in bf16 / fp16 beside a float32 LoRA: the UNet hands float32 latents
        # to a half-precision VAE, so sample under autocast as training does.
        dtype = next(self.vae.parameters()).dtype
        low = dtype != torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=low):
            for i in range(0, len(prompts), batch_size):
                rows = slice(i, i + batch_size)
                gens = [torch.Generator().manual_seed(int(s)) for s in seeds[rows]]
                batch = {k: v[rows].to(self.device, dtype) for k, v in (per_image or {}).items()}
                images = pipe(
                    list(prompts[rows]),
                    generator=gens,
                    output_type="pt",
                    **batch,
                    **kwargs,
                    **self.family_module.pipeline_kwargs(),
                ).images
                out.append(images.float().clamp(0, 1).cpu())
        return torch.cat(out)

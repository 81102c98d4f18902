"""Randomly initialised models at the real architectures (method.md 5), for benchmarks.

Why: speed, memory and FLOP rate depend on the architecture, not on the weights, and nothing
can be downloaded here. `tiny` is the toy world's architecture (the shipped configs), `sd15`
and `sdxl` the real ones; each comes with its SPM (the toy CLIP, or a PickScore-size ViT-H/14).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from preference_model import pickscore_clip_config
from preference_model.model import TOY_BACKBONE_DIR, StepAwarePreferenceModel
from spo.errors import ConfigError
from spo.toy.base_model import BASE_MODEL_DIR
from spo.toy.text import VOCAB_SIZE, build_tokenizer

PRESETS = ("tiny", "sd15", "sdxl", "tiny_flow", "sd35m", "flux")
FLOW_PRESETS = ("tiny_flow", "sd35m", "flux")  # rectified-flow transformers (SPEC 8)
TOY_PRESETS = ("tiny", "tiny_flow")  # the toy world's sizes: judged by the toy SPM's architecture


@dataclass(frozen=True, kw_only=True)
class PresetSettings:
    """The sampler and policy settings each architecture is trained with (method.md 3; the
    flow presets: configs/sd35/spo.yaml and configs/flux/spo_latent.yaml)."""

    k: int
    inner_steps: int
    lora_rank: int
    gradient_checkpointing: bool
    train_batch: int
    resolution: int | None = None  # the size SPO samples at (None: the model's own)
    judge_blocks: int | None = None  # the transformer latent judge's blocks (None: half)


SETTINGS = {
    "tiny": PresetSettings(
        k=4, inner_steps=0, lora_rank=4, gradient_checkpointing=False, train_batch=10
    ),
    "sd15": PresetSettings(
        k=4, inner_steps=0, lora_rank=4, gradient_checkpointing=False, train_batch=10
    ),
    "sdxl": PresetSettings(
        k=2, inner_steps=3, lora_rank=64, gradient_checkpointing=True, train_batch=2
    ),
    "tiny_flow": PresetSettings(
        k=4, inner_steps=0, lora_rank=4, gradient_checkpointing=False, train_batch=10
    ),
    "sd35m": PresetSettings(
        k=4, inner_steps=0, lora_rank=32, gradient_checkpointing=True, train_batch=10,
        resolution=512, judge_blocks=12,
    ),
    "flux": PresetSettings(
        k=4, inner_steps=0, lora_rank=32, gradient_checkpointing=True, train_batch=10,
        resolution=512, judge_blocks=4,
    ),
}  # fmt: skip


# SD3.5 Medium's transformer (SPEC 8; stabilityai/stable-diffusion-3.5-medium's config): the
# MMDiT-X of 24 layers, 24 heads x 64, with dual attention in layers 0-12 and RMS q/k norms.
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}


# FLUX.1-dev's transformer (SPEC 8; black-forest-labs/FLUX.1-dev's config): 19 double-stream
# and 38 single-stream blocks, 24 heads x 128, 16-channel latents packed 2x2, guidance embedding.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def sd_scheduler() -> DDIMScheduler:
    """SD1.5 / SDXL's noise schedule with DDIM's leading spacing (offset 1: 951, ..., 1)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler: the shift set from the image sequence length (mu) when sampling."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _clip_text(hidden: int, layers: int, heads: int, projection: int | None = None):
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act="quick_gelu" if projection is None else "gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def _sd_vae(scaling_factor: float, sample_size: int):
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """SD3's / FLUX's VAE: SD's layout with 16 latent channels and no quant convs."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=2,
        sample_size=1024,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _flow_pipeline(preset: str):
    """The flow presets (SPEC 8). `tiny_flow` is the toy flow base model's architecture;
    SD3.5 Medium runs without T5 (its pipeline's documented mode: zeros in T5's place); FLUX's
    T5 has T5-XXL's width and 2 of its 24 layers: text is encoded once per prompt and cached,
    so only the denoiser and the VAE are timed."""
    if preset == "tiny_flow":
        from spo.toy.flow_base_model import build_untrained

        return build_untrained()
    if preset == "sd35m":
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(1.5305, 0.0609),
            text_encoder=_clip_text(768, 12, 12, projection=768),
            tokenizer=build_tokenizer(77),
            text_encoder_2=_clip_text(1280, 32, 20, projection=1280),
            tokenizer_2=build_tokenizer(77),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    t5 = T5Config(
        vocab_size=VOCAB_SIZE, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2,
        feed_forward_proj="gated-gelu",
    )  # fmt: skip
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
        scheduler=flux_scheduler(),
        vae=_flow_vae(0.3611, 0.1159),
        text_encoder=_clip_text(768, 12, 12),
        tokenizer=build_tokenizer(77),
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=build_tokenizer(77),
    )


def build_pipeline(preset: str, device: str | torch.device, dtype: torch.dtype):
    """A diffusers pipeline of `preset` with random weights, built on `device` in `dtype`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    with torch.device(device):
        if preset in FLOW_PRESETS:
            pipe = _flow_pipeline(preset)
        elif preset == "tiny":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL.from_config(AutoencoderKL.load_config(BASE_MODEL_DIR / "vae")),
                text_encoder=CLIPTextModel(
                    CLIPTextConfig.from_pretrained(BASE_MODEL_DIR / "text_encoder")
                ),
                tokenizer=CLIPTokenizer.from_pretrained(BASE_MODEL_DIR / "tokenizer"),
                unet=UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(BASE_MODEL_DIR / "unet")
                ),
                scheduler=sd_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif preset == "sd15":
            pipe = StableDiffusionPipeline(
                vae=_sd_vae(0.18215, 512),
                text_encoder=_clip_text(768, 12, 12),
                tokenizer=build_tokenizer(77),
                unet=UNet2DConditionModel(
                    sample_size=64,
                    block_out_channels=(320, 640, 1280, 1280),
                    layers_per_block=2,
                    cross_attention_dim=768,
                    attention_head_dim=8,
                ),
                scheduler=sd_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=_sd_vae(0.13025, 1024),
                text_encoder=_clip_text(768, 12, 12),
                text_encoder_2=_clip_text(1280, 32, 20, projection=1280),
                tokenizer=build_tokenizer(77),
                tokenizer_2=build_tokenizer(77),
                unet=UNet2DConditionModel(
                    sample_size=128,
                    block_out_channels=(320, 640, 1280),
                    layers_per_block=2,
                    down_block_types=(
                        "DownBlock2D",
                        "CrossAttnDownBlock2D",
                        "CrossAttnDownBlock2D",
                    ),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10),
                    attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048,
                    use_linear_projection=True,
                    addition_embed_type="text_time",
                    addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816,
                ),
                scheduler=sd_scheduler(),
            )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_spm(preset: str, device: str | torch.device):
    """The preset's SPM with random weights: the toy CLIP's architecture for the toy presets,
    PickScore's for the real ones."""
    with torch.device(device):
        if preset in TOY_PRESETS:
            return StepAwarePreferenceModel.from_open_clip(
                TOY_BACKBONE_DIR / "open_clip_config.json"
            ).eval()
        return StepAwarePreferenceModel.from_hf_clip(pickscore_clip_config()).eval()

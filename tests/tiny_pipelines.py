"""Randomly initialised SD1.5-family and SDXL-family pipelines, small enough for CPU tests.

Why: nothing can be downloaded in tests, yet the recipes must run on both families' real
layouts (SDXL: two text encoders, pooled embedding, `text_time` added conditioning). Both use
the real CLIP tokenizer (built offline), 32x32 images and 4x8x8 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
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
    T5Config,
    T5EncoderModel,
)

from spo.architectures import flux_scheduler, sd_scheduler
from spo.toy.text import VOCAB_SIZE, build_tokenizer

MAX_TOKENS = 16


def _text_config(hidden: int, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
        scaling_factor=0.5,
    )


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder (32x32 images) at `path`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=build_tokenizer(MAX_TOKENS),
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline folder (32x32 images): two text encoders (16 + 16 wide,
    the second with a 32-wide projection = the pooled embedding) and `text_time` conditioning."""
    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,  # 16 + 16: the two encoders' penultimate states concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(16)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(16, projection=32)),
        tokenizer=build_tokenizer(MAX_TOKENS),
        tokenizer_2=build_tokenizer(MAX_TOKENS),
        unet=unet,
        scheduler=sd_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sd3(path: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline folder (32x32 images) at `path`, in SPEC 8's tiny layout: an
    MMDiT of 1 layer (4 heads x 8, patch 1), two CLIP encoders with projections (pooled 32 + 32),
    a 1-layer T5 as large as the joint attention (32), the flow-matching Euler scheduler (shift
    3) and a VAE whose config has SD3's `shift_factor`."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = _vae()
    vae.register_to_config(shift_factor=0.1)
    t5 = T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(_text_config(32)),
        tokenizer=build_tokenizer(MAX_TOKENS),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32)),
        tokenizer_2=build_tokenizer(MAX_TOKENS),
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=build_tokenizer(MAX_TOKENS),
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_flux(path: Path, seed: int = 0) -> Path:
    """A FluxPipeline folder in SPEC 8's tiny layout: a FLUX transformer of 1 double- and 1
    single-stream block (2 heads x 16, rope axes (4, 4, 8)) with the guidance embedding, on the
    tiny VAE's 4-channel latents packed 2x2 (in_channels 16); a CLIP for the pooled embedding
    (32), a 1-layer T5 as wide as the joint attention (32), and FLUX.1-dev's dynamically
    shifting scheduler. The pipeline's native size is FLUX's 1024 px: train it at 32."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4)
    scheduler = flux_scheduler()
    vae = _vae()
    vae.register_to_config(shift_factor=0.1)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=build_tokenizer(MAX_TOKENS),
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=build_tokenizer(MAX_TOKENS),
    )
    pipe.save_pretrained(path)
    return path

"""The toy world's tiny flow-matching base model (a StableDiffusion3Pipeline folder,
`spo/toy/flow_base_model/`, rebuilt by `scripts/build_toy_flow_model.py`) and its parts.

Why a module: the builder script, `spo toy-world`, the `tiny_flow` benchmark preset and the
tests make the same pipeline from the same parts; see the script for what each part is and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spo.toy.base_model import BASE_MODEL_DIR
from spo.toy.render import BACKGROUNDS, COLOURS, SHAPES, SIZE

FLOW_BASE_MODEL_DIR = Path(__file__).parent / "flow_base_model"
CLIP_WIDTH = 64  # the toy CLIP text encoder's width; SD3 concatenates two of them
JOINT_DIM = 2 * CLIP_WIDTH  # joint_attention_dim: the concatenated CLIP tokens, = T5's d_model
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": SIZE // 8,
    "patch_size": 1,  # transformer_config(patch_size) for another; pos_embed_max_size follows
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": JOINT_DIM,
    "caption_projection_dim": 128,  # = the width, as in SD3 (context and image share attention)
    "pooled_projection_dim": JOINT_DIM,  # the two pooled CLIP projections, concatenated
    "pos_embed_max_size": SIZE // 8,
    "qk_norm": "rms_norm",
}
DEFAULT_SHIFT = 1.5
# tokenizer_3's vocabulary: T5's special tokens, the toy words, and single characters so that
# any lower-case text tokenizes (its ids only feed the zero T5, so nothing depends on them)
T5_WORDS = ["a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS]


def transformer_config(patch_size: int = 1) -> dict[str, Any]:
    """TRANSFORMER_CONFIG with another patch size (SD3's own is 2: 4x fewer image tokens)."""
    grid = SIZE // 8 // patch_size
    return TRANSFORMER_CONFIG | {"patch_size": patch_size, "pos_embed_max_size": grid}


def new_transformer(patch_size: int = 1):
    """The MMDiT with adaLN-Zero initialisation: every block's modulation (shift, scale, gate)
    and the output layer start at zero, so the network starts as the identity on its residual
    streams and predicts zero velocity (DiT's initialisation; diffusers starts them random)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**transformer_config(patch_size))
    zero = [model.norm_out.linear, model.proj_out]
    for block in model.transformer_blocks:
        zero.append(block.norm1.linear)
        if not block.context_pre_only:
            zero.append(block.norm1_context.linear)
    with torch.no_grad():
        for layer in zero:
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def clip_with_projection(base: Path = BASE_MODEL_DIR):
    """A CLIPTextModelWithProjection from the toy CLIPTextModel's weights, with an identity
    projection (so its pooled output starts as the toy encoder's), in float32."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    toy = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32)
    model = CLIPTextModelWithProjection(toy.config)
    model.text_model.load_state_dict(toy.state_dict())  # strict: every weight, same names
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(toy.config.hidden_size))
    return model.float()


def new_t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(T5_WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    # model_max_length 16 (the toy CLIP tokenizer's length, which no toy prompt exceeds): the
    # toolkit encodes T5 at min(the pipeline's 256, this), 16 zero tokens, a count the
    # transformer was trained for (the builder's `pad_sink`: 1 to 256)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=16)


def new_zero_t5(vocab_size: int):
    """A T5 encoder whose output is exactly zero (no layers, final RMS norm weight 0)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=JOINT_DIM,
        d_kv=8,
        d_ff=8,
        num_layers=0,
        num_heads=1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5EncoderModel(config)
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model


def load_vae(base: Path = BASE_MODEL_DIR):
    """The toy VAE with SD3's `shift_factor` set (0.0: its latents are centred already)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def assemble(transformer, text_encoder, text_encoder_2, shift: float, vae, base=BASE_MODEL_DIR):
    """The StableDiffusion3Pipeline of a (trained or new) transformer, text encoders and VAE
    (`load_vae`), with the toy tokenizers and the zero T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tokenizer_3 = new_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        text_encoder_3=new_zero_t5(len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def build_untrained(patch_size: int = 1):
    """The toy flow pipeline's architecture with random weights, from config files only (the
    `tiny_flow` benchmark preset; builds on any device, the meta device too)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig.from_pretrained(BASE_MODEL_DIR / "text_encoder")
    text_config.projection_dim = text_config.hidden_size
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(BASE_MODEL_DIR / "vae"))
    vae.register_to_config(shift_factor=0.0)
    return assemble(
        new_transformer(patch_size),
        CLIPTextModelWithProjection(text_config).float(),  # its config says fp16 (as stored)
        CLIPTextModelWithProjection(text_config).float(),
        DEFAULT_SHIFT,
        vae,
    )

"""The toy world's tiny base model, shipped in `spo/toy/base_model/` (a diffusers folder).

Why a module: the world builder, the build and measurement scripts and the tests load it the
same way, and `vae_round_trip` is how the oracle was calibrated against what the VAE keeps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BASE_MODEL_DIR = Path(__file__).parent / "base_model"


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Encode (posterior mode) and decode uint8 images (N, H, W, 3) with a diffusers VAE."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def load_base_pipeline(path: str | Path, device: str = "cpu"):
    """The toy base model as a plain diffusers pipeline with a DDIM scheduler, in float32
    (its weights are stored in fp16 to keep the repository small)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

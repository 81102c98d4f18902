"""Rebuild the toy world's tiny base model (shipped in spo/toy/base_model/) from scratch.

Stages, each resumable from its own checkpoint in --work:
  vae   tiny AutoencoderKL (64x64 RGB -> 4x8x8, SD's factor 8; only 16 channels at 64x64
        so it is cheap on a CPU), trained on renders of the train prompts until
        object colour and background survive the round trip;
  unet  tiny UNet2DConditionModel + tiny CLIPTextModel trained jointly (epsilon prediction,
        min-SNR-5 weighting, 10% empty-caption dropout for classifier-free guidance) on VAE
        latents of renders of every quality level, train prompts only;
  export  a StableDiffusionPipeline folder with a DDIM scheduler, weights stored in fp16.

Measured on 2 CPU cores (see docs/toy-world.md): about 12 minutes for the VAE and 60-90 for the
UNet. Usage: python scripts/build_toy_base_model.py --stage all --work runs/build_base
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from spo.toy.base_model import vae_round_trip
from spo.toy.oracle import evaluate, recognition_rates
from spo.toy.render import SIZE, Prompt, render, split_prompts
from spo.toy.text import VOCAB_SIZE, build_tokenizer

MAX_TOKENS = 16  # toy prompts are 9 CLIP tokens with <bos>/<eos>; 16 keeps cross-attention cheap


def render_bank(n: int, seed: int, min_quality: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """n renders of random train prompts at quality ~ U(min_quality, 1), as [-1, 1] tensors."""
    rng = np.random.default_rng(seed)
    train, _ = split_prompts()
    prompts = [train[i] for i in rng.integers(len(train), size=n)]
    imgs = np.stack([render(p, rng.uniform(min_quality, 1.0), rng) for p in prompts])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [p.text for p in prompts]


def new_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        mid_block_add_attention=False,
    )
    # Start with a small posterior variance so that sampled latents are usable from step 0.
    with torch.no_grad():
        vae.quant_conv.bias[4:].fill_(-8.0)
    return vae


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def round_trip_check(vae: AutoencoderKL, n: int = 300, seed: int = 123) -> dict[str, float]:
    """Share of round trips of clean renders (quality >= 0.5, which the oracle itself recognises)
    in which the oracle still sees the right colour / background / shape."""
    x, texts = render_bank(n, seed, min_quality=0.5)
    rec = vae_round_trip(vae, to_uint8(x))
    hits = {"colour": 0, "background": 0, "shape": 0}
    for img, t in zip(rec, texts, strict=True):
        r, p = evaluate(img, t), Prompt.parse(t)
        hits["colour"] += r.seen_colour == p.colour
        hits["background"] += r.seen_background == p.background
        hits["shape"] += r.seen_shape == p.shape
    mse = float(np.mean(((rec.astype(np.float64) - to_uint8(x)) / 127.5) ** 2))
    return {k: v / n for k, v in hits.items()} | {"mse": mse}


def train_vae(work: Path, minutes: float, seed: int = 0) -> None:
    torch.manual_seed(seed)
    ckpt = work / "vae.pt"
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    x_all, _ = render_bank(20000, seed)
    start = time.time()
    while time.time() - start < minutes * 60:
        idx = torch.randint(len(x_all), (32,))
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # Up-weight object pixels (far from the border colour): colour lives in ~15% of the image.
        border = torch.cat([x[..., :2, :].flatten(2), x[..., -2:, :].flatten(2)], dim=2)
        far = (x - border.median(dim=2).values[..., None, None]).norm(dim=1, keepdim=True) > 0.5
        w = 1.0 + 4.0 * far.float()
        err = rec - x
        loss = (w * (err.pow(2) + 0.5 * err.abs())).mean() + 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % 500 == 0:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            print("vae round trip", round_trip_check(vae), flush=True)
    torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    print("vae final round trip", round_trip_check(vae), flush=True)


def new_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=64,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def new_unet() -> UNet2DConditionModel:
    """SD1.5's layout (cross-attention down, plain bottom, cross-attention up) at toy size."""
    return UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def new_noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule (scaled-linear betas, 1000 steps, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def load_vae(work: Path) -> AutoencoderKL:
    vae = new_vae()
    vae.load_state_dict(torch.load(work / "vae.pt")["model"])
    return vae.eval().requires_grad_(False)


def encode_bank(
    vae: AutoencoderKL, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std of n renders (train prompts, quality ~ U(0, 1))."""
    x, texts = render_bank(n, seed)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 256):
            post = vae.encode(x[i : i + 256]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds), texts


@torch.no_grad()
def sample(
    unet,
    text_encoder,
    tokenizer,
    vae,
    texts: list[str],
    seed: int,
    steps: int = 20,
    cfg: float = 5.0,
) -> np.ndarray:
    """DDIM (eta 0) samples with CFG, the same sampler settings as the evaluation protocol."""
    sched = DDIMScheduler.from_config(
        new_noise_scheduler().config,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    sched.set_timesteps(steps)
    ids = tokenizer(
        texts + [""],
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    emb = text_encoder(ids)[0]
    cond, uncond = emb[:-1], emb[-1:].expand(len(texts), -1, -1)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(texts), 4, SIZE // 8, SIZE // 8, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
        e_c, e_u = eps.chunk(2)
        z = sched.step(e_u + cfg * (e_c - e_u), t, z).prev_sample
    return to_uint8(vae.decode(z / vae.config.scaling_factor).sample)


def sample_check(unet, text_encoder, tokenizer, vae, n_per_prompt: int = 4) -> dict[str, float]:
    """Oracle recognition rates and mean reward of samples on the held-out eval prompts."""
    _, eval_prompts = split_prompts()
    texts = [p.text for p in eval_prompts for _ in range(n_per_prompt)]
    imgs = sample(unet, text_encoder, tokenizer, vae, texts, seed=0)
    reps = [evaluate(im, t) for im, t in zip(imgs, texts, strict=True)]
    rates = recognition_rates(reps, [Prompt.parse(t) for t in texts])
    return rates | {"reward": float(np.mean([r.reward for r in reps]))}


def init_from_pipeline(work: Path, folder: Path) -> None:
    """Seed the work folder from an exported pipeline (e.g. the shipped one) so that training
    continues from its weights instead of starting over: its VAE becomes `vae.pt`, its UNet and
    text encoder the starting point of the UNet stage (`init.pt`)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    vae = new_vae()
    vae.load_state_dict(pipe.vae.state_dict())
    torch.save({"model": vae.state_dict(), "step": 0}, work / "vae.pt")
    torch.save(
        {"unet": pipe.unet.state_dict(), "text": pipe.text_encoder.state_dict()}, work / "init.pt"
    )
    print(f"work folder {work} seeded from {folder}", flush=True)


def train_unet(
    work: Path, minutes: float, seed: int = 0, batch: int = 64, peak_lr: float = 1e-3
) -> None:
    """Joint UNet + text encoder training with a time-based cosine lr schedule and EMA."""
    torch.manual_seed(seed)
    vae = load_vae(work)
    tokenizer = build_tokenizer(MAX_TOKENS)
    unet, text_encoder = new_unet(), new_text_encoder()
    if (work / "init.pt").exists():
        init = torch.load(work / "init.pt")
        unet.load_state_dict(init["unet"])
        text_encoder.load_state_dict(init["text"])
    ema_unet, ema_text = new_unet().requires_grad_(False), new_text_encoder().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    ckpt, step, elapsed = work / "unet.pt", 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        for m, k in (
            (unet, "unet"),
            (text_encoder, "text"),
            (ema_unet, "ema_unet"),
            (ema_text, "ema_text"),
            (opt, "opt"),
        ):
            m.load_state_dict(state[k])
        step, elapsed = state["step"], state["elapsed"]
    else:
        ema_unet.load_state_dict(unet.state_dict())
        ema_text.load_state_dict(text_encoder.state_dict())

    bank = work / "latents.pt"
    if not bank.exists():
        mean, std, texts = encode_bank(vae, 30000, seed + 1)
        # Like SD's 0.18215: the factor that gives the diffusion model unit-variance latents.
        scale = float(1.0 / mean.std())
        torch.save({"mean": mean, "std": std, "texts": texts, "scale": scale}, bank)
    data = torch.load(bank)
    mean, std, scale = data["mean"], data["std"], data["scale"]
    vae.register_to_config(scaling_factor=scale)
    captions = sorted(set(data["texts"]))
    caption_idx = torch.tensor([captions.index(t) for t in data["texts"]])
    ids = tokenizer(
        captions + [""],
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    sched = new_noise_scheduler()
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    ema_decay = 0.998
    eval_every = 600

    def save() -> None:
        torch.save(
            {
                "unet": unet.state_dict(),
                "text": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
            },
            ckpt,
        )

    start, last_save, last_eval = time.time() - elapsed, time.time(), time.time()
    while elapsed < minutes * 60:
        frac = elapsed / (minutes * 60)
        lr = (
            peak_lr
            * min(1.0, (step + 1) / 300)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(mean), (batch,))
        z0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scale
        cap = caption_idx[idx].clone()
        cap[torch.rand(batch) < 0.1] = len(captions)  # empty caption: CFG dropout
        emb = text_encoder(ids[cap])[0]
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(z0)
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=emb).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, m in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pm in zip(e.parameters(), m.parameters(), strict=True):
                    pe.lerp_(pm, 1 - d)
        elapsed = time.time() - start
        if step % 100 == 0:
            print(
                f"unet step {step} loss {loss.item():.4f} lr {lr:.2e} {elapsed / 60:.1f} min",
                flush=True,
            )
        if time.time() - last_save > 300:
            save()
            last_save = time.time()
        if time.time() - last_eval > eval_every:
            print("unet eval", sample_check(ema_unet, ema_text, tokenizer, vae), flush=True)
            last_eval = time.time()
    save()
    print("unet final eval", sample_check(ema_unet, ema_text, tokenizer, vae), flush=True)


def export(work: Path, out: Path) -> None:
    """The EMA weights as a StableDiffusionPipeline folder (fp16 storage, DDIM scheduler)."""
    from diffusers import StableDiffusionPipeline

    vae = load_vae(work)
    vae.register_to_config(scaling_factor=torch.load(work / "latents.pt")["scale"])
    state = torch.load(work / "unet.pt")
    unet, text_encoder = new_unet(), new_text_encoder()
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_text"])
    scheduler = DDIMScheduler.from_config(
        new_noise_scheduler().config,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(MAX_TOKENS),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    print(f"exported to {out} after {state['step']} UNet steps", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["vae", "unet", "export", "all"], default="all")
    ap.add_argument("--work", type=Path, default=Path("runs/build_base"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "spo/toy/base_model")
    ap.add_argument("--vae-minutes", type=float, default=12.0)
    ap.add_argument("--unet-minutes", type=float, default=75.0)
    ap.add_argument("--unet-lr", type=float, default=1e-3, help="peak learning rate of the UNet")
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from this pipeline folder (its VAE is kept; UNet stage only)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 if sharing the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.init_from is not None:
        init_from_pipeline(args.work, args.init_from)
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_minutes)
    if args.stage in ("unet", "all"):
        train_unet(args.work, args.unet_minutes, peak_lr=args.unet_lr)
    if args.stage in ("export", "all"):
        export(args.work, args.out)


if __name__ == "__main__":
    main()

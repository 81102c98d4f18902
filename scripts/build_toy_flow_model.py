"""Build the toy world's tiny flow-matching base model: a StableDiffusion3Pipeline folder.

Why: flow preference methods (Diffusion-DPO and step-wise methods on SD3 / FLUX, see spo/flow.py)
need a rectified-flow base model that runs on a CPU, just as the SD1.5-style UNet base
(spo/toy/base_model/, scripts/build_toy_base_model.py) serves the DDIM methods. The folder loads
with a plain `diffusers.StableDiffusion3Pipeline.from_pretrained(out, dtype=torch.float32)`
(weights stored in fp16 like the UNet base), without importing this project.

What it holds (spo/toy/flow_base_model.py builds the parts; `TRANSFORMER_CONFIG` there):
  transformer     SD3Transformer2DModel (MMDiT): patch 1 on the toy VAE's 4x8x8 latents (64
                  image tokens), width 128 (4 heads of 32), 6 joint blocks, RMS qk-norm (as in
                  SD3.5), adaLN-Zero initialisation (as in DiT): `TRANSFORMER_PARAMETERS`;
  vae             the toy world's VAE (spo/toy/base_model/vae), unchanged, shift_factor 0.0 (the
                  SD3 pipeline decodes latents / scaling_factor + shift_factor; its latents'
                  mean is 0.10 of their std, so no shift is needed);
  text_encoder,   two CLIPTextModelWithProjection, both started from the toy CLIP text encoder
  text_encoder_2  (spo/toy/base_model/text_encoder) plus an identity text projection, and
                  trained jointly with the transformer as the UNet builder trains its encoder
                  (the toy encoder's penultimate layer, which SD3 reads, was never read by the
                  UNet, and the projection is new); their token table (3.2M of 3.3M parameters,
                  ~20 rows used by toy prompts) stays frozen. SD3 concatenates the two: 128-wide
                  tokens (= joint_attention_dim) and a 128-wide pooled vector;
  text_encoder_3  a T5EncoderModel with no layers and a zero final norm: its output is exactly
                  zero, which is SD3's documented drop-T5 mode (the pipeline also uses zeros
                  when text_encoder_3 is None), but with it a plain from_pretrained loads;
  tokenizer(_2)   the toy CLIP tokenizer (16 positions); tokenizer_3 a 57-token T5Tokenizer
                  (the toy words and single characters), so the zero T5 costs 7k parameters;
  scheduler       FlowMatchEulerDiscreteScheduler with `--shift`.

The 256 zero T5 tokens that the pipeline appends by default (max_sequence_length=256) are all
equal, so in every layer they stay equal, and k equal keys act exactly like one key with log k
added to its attention logit. Training and the sample check run on one such token with that bias
(`pad_sink`: 81 tokens instead of 336); the test checks the result against the plain pipeline.
k is drawn per sample (256 for half the batch, log-uniform in [1, 256] for the rest), so that
a shorter `max_sequence_length` (cheaper on a CPU) should give about the same samples; the sample
check measures it with max_sequence_length 1.

Training: rectified flow (x_s = (1 - s) x0 + s eps, target eps - x0, spo/flow.py) on the VAE
latents of 30,000 renders of the train prompts at quality ~ U(0, 1), noise levels from SD3's
logit-normal(0, 1) through the timestep shift, 10% empty-caption dropout for classifier-free
guidance, AdamW with a time-based cosine schedule, EMA 0.998, plain MSE.

Shift (measured, `--shift`, default 1.5 for training and sampling): linear probes (softmax
regression on x_s and its per-channel sorted values, 5,000 train / 1,000 held-out renders)
lose half of what they know on clean latents (down to chance) at s = 0.45 for the shape, 0.6 for
the colour and 0.9 for the background. SD3's 3.0 would put the median training noise
level at 0.75 and only a quarter of it below 0.60, where shape and colour are decided; shift 1.5
puts the median at 0.6 and the quartiles at 0.43 / 0.75. The sample check also reports
sampling shifts 1.0 and 3.0 for the trained model.

Stages, each resumable from its own saves in --work:
  latents      encode the render bank with the toy VAE (in chunks; a killed run goes on at the
               next chunk);
  transformer  the joint training (saved every --save-every minutes; a killed run resumes from
               its last save with its step count, optimiser state, EMA and elapsed time), then
               the sample check: the oracle's recognition rates and mean reward on the 16 eval
               prompts x 4 seeds at the toy CFG 2.0, 20 Euler steps, printed and written to
               --work/sample_check.json;
  export       the EMA weights as the pipeline folder (fp16), then the same sample check through
               the exported folder loaded with a plain from_pretrained (sample_check_export.json).

Measured on the shared 2-core machine with --threads 1: the latents stage 4.5 minutes (30,000
renders), the transformer 1.3 steps/s at batch 32. Usage:
    python scripts/build_toy_flow_model.py --stage all --work runs/build_flow --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import Tensor
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from spo.flow import (
    euler_step,
    flow_sigmas,
    interpolate,
    sample_sigmas_logit_normal,
    sigmas_to_timesteps,
    velocity_target,
)
from spo.toy.flow_base_model import (
    DEFAULT_SHIFT,
    JOINT_DIM,
    assemble,
    clip_with_projection,
    load_vae,
    new_transformer,
)
from spo.toy.oracle import evaluate, recognition_rates
from spo.toy.render import SIZE, Prompt, split_prompts


def _load_unet_builder():
    """scripts/build_toy_base_model.py as a module (the scripts folder is not a package)."""
    path = Path(__file__).with_name("build_toy_base_model.py")
    spec = importlib.util.spec_from_file_location("build_toy_base_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unet_builder = _load_unet_builder()

ROOT = Path(__file__).resolve().parents[1]
BASE_DIR = ROOT / "spo" / "toy" / "base_model"
OUT_DIR = ROOT / "spo" / "toy" / "flow_base_model"
LATENT = (4, SIZE // 8, SIZE // 8)
TRANSFORMER_PARAMETERS = 3_481_604  # of new_transformer(); the test checks the exported one
T5_TOKENS = 256  # the pipeline's default max_sequence_length: zero T5 tokens it appends
CFG = 2.0  # the toy world's guidance scale (docs/toy-world.md)
SAMPLE_STEPS = 20
EMA_DECAY = 0.998
CAPTION_DROPOUT = 0.1


# ----------------------------------------------------------------------------- components


def load_tokenizer(base: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(base / "tokenizer")


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> Tensor:
    """CLIP ids exactly as the SD3 pipeline makes them (padded to the tokenizer's max length)."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode(
    text_encoder: CLIPTextModelWithProjection,
    text_encoder_2: CLIPTextModelWithProjection,
    ids: Tensor,
) -> tuple[Tensor, Tensor]:
    """The pipeline's prompt embeddings with the T5 part folded into one zero token: the two
    encoders' penultimate hidden states concatenated (B, 16, 128) followed by the zero T5 token
    (B, 1, 128), and their pooled projections concatenated (B, 128)."""
    out_1 = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids, output_hidden_states=True)
    clip = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, JOINT_DIM - clip.shape[-1]))
    context = torch.cat([clip, clip.new_zeros(clip.shape[0], 1, JOINT_DIM)], dim=1)
    return context, torch.cat([out_1.text_embeds, out_2.text_embeds], dim=-1)


# ----------------------------------------------------------------------------- zero T5 tokens


class PadSinkAttnProcessor:
    """diffusers' JointAttnProcessor2_0 where the last context token stands for `count` equal
    tokens: log(count) is added to its attention logit (for every query), which is exactly what
    `count` copies of it give. `log_count`: (B,) tensor, set before each forward."""

    def __init__(self) -> None:
        self.log_count: Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch = hidden_states.shape[0]
        heads = attn.heads

        def split(x: Tensor) -> Tensor:
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        value = split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        c_query = split(attn.add_q_proj(encoder_hidden_states))
        c_key = split(attn.add_k_proj(encoder_hidden_states))
        c_value = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
        query = torch.cat([query, c_query], dim=2)
        key = torch.cat([key, c_key], dim=2)
        value = torch.cat([value, c_value], dim=2)
        bias = query.new_zeros(batch, 1, 1, key.shape[2])
        bias[:, 0, 0, -1] = self.log_count.to(query)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[-1] * heads).to(query.dtype)
        n = hidden_states.shape[1]
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


@contextmanager
def pad_sink(transformer: SD3Transformer2DModel) -> Iterator[PadSinkAttnProcessor]:
    """Run `transformer` with `PadSinkAttnProcessor` (set its `log_count` before each call);
    the original processors come back afterwards."""
    original = transformer.attn_processors
    processor = PadSinkAttnProcessor()
    transformer.set_attn_processor(processor)
    try:
        yield processor
    finally:
        transformer.set_attn_processor(original)


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_latents(
    transformer,
    text_encoder,
    text_encoder_2,
    tokenizer,
    texts: list[str],
    seed: int,
    steps: int = SAMPLE_STEPS,
    cfg: float = CFG,
    shift: float = DEFAULT_SHIFT,
    t5_tokens: int = T5_TOKENS,
) -> Tensor:
    """What `StableDiffusion3Pipeline(texts, num_inference_steps=steps, guidance_scale=cfg,
    generator=torch.Generator().manual_seed(seed), max_sequence_length=t5_tokens,
    output_type="latent")` computes, with the zero T5 tokens folded into one (`pad_sink`)."""
    n = len(texts)
    context, pooled = encode(text_encoder, text_encoder_2, tokenize(tokenizer, texts + [""]))
    context = torch.cat([context[-1:].expand(n, -1, -1), context[:-1]])  # [uncond, cond]
    pooled = torch.cat([pooled[-1:].expand(n, -1), pooled[:-1]])
    z = torch.randn(n, *LATENT, generator=torch.Generator().manual_seed(seed))
    sigmas = flow_sigmas(steps, shift=shift)
    with pad_sink(transformer) as sink:
        sink.log_count = torch.full((2 * n,), math.log(t5_tokens))
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = transformer(
                hidden_states=torch.cat([z, z]),
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=sigmas_to_timesteps(s).expand(2 * n),
            ).sample
            v_uncond, v_cond = v.chunk(2)
            z = euler_step(z, v_uncond + cfg * (v_cond - v_uncond), s, s_next)
    return z


@torch.no_grad()
def decode(vae: AutoencoderKL, z: Tensor) -> np.ndarray:
    x = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    return unet_builder.to_uint8(x)


def eval_texts(n_per_prompt: int = 4) -> list[str]:
    return [p.text for p in split_prompts()[1] for _ in range(n_per_prompt)]


def oracle_check(images: np.ndarray, texts: list[str]) -> dict[str, float]:
    """The oracle's recognition rates (colour / shape / background right) and mean reward."""
    reports = [evaluate(im, t) for im, t in zip(images, texts, strict=True)]
    rates = recognition_rates(reports, [Prompt.parse(t) for t in texts])
    return rates | {"reward": float(np.mean([r.reward for r in reports]))}


def sample_check(
    transformer,
    text_encoder,
    text_encoder_2,
    tokenizer,
    vae,
    shift: float = DEFAULT_SHIFT,
    t5_tokens: int = T5_TOKENS,
    n_per_prompt: int = 4,
    cfg: float = CFG,
) -> dict[str, float]:
    """The 16 eval prompts x `n_per_prompt` seeds at CFG `cfg` (2.0), 20 Euler steps."""
    texts = eval_texts(n_per_prompt)
    z = sample_latents(
        transformer, text_encoder, text_encoder_2, tokenizer, texts, 0, shift=shift,
        t5_tokens=t5_tokens, cfg=cfg,
    )  # fmt: skip
    return oracle_check(decode(vae, z), texts)


# ----------------------------------------------------------------------------- stages


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, so that a kill never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_latents(work: Path, base: Path, n: int, seed: int = 0, chunk: int = 2000) -> None:
    """VAE posterior means and stds of n renders of the train prompts at quality ~ U(0, 1),
    in chunks of `chunk` renders (each with its own seed), saved after each chunk."""
    done, part = work / "latents.pt", work / "latents_part.pt"
    if done.exists():
        print(f"latents: {done} exists", flush=True)
        return
    vae = load_vae(base)
    state = torch.load(part) if part.exists() else {"mean": [], "std": [], "texts": []}
    while sum(len(m) for m in state["mean"]) < n:
        i = len(state["mean"])
        size = min(chunk, n - sum(len(m) for m in state["mean"]))
        mean, std, texts = unet_builder.encode_bank(vae, size, 1000 * seed + 1 + i)
        state["mean"].append(mean)
        state["std"].append(std)
        state["texts"].append(texts)
        atomic_save(state, part)
        print(f"latents: {sum(len(m) for m in state['mean'])} / {n}", flush=True)
    mean = torch.cat(state["mean"])
    bank = {
        "mean": mean,
        "std": torch.cat(state["std"]),
        "texts": [t for texts in state["texts"] for t in texts],
        "scale": vae.config.scaling_factor,  # the toy VAE's own (latents' std 1.00 after it)
    }
    atomic_save(bank, done)
    part.unlink()
    z = mean * bank["scale"]
    print(f"latents: done, scaled mean {z.mean():.3f} std {z.std():.3f}", flush=True)


class Trainee:
    """The trained modules and their EMA copies (the text encoders' token tables frozen)."""

    def __init__(self, base: Path, patch_size: int = 1) -> None:
        self.transformer = new_transformer(patch_size)
        self.text = clip_with_projection(base)
        self.text_2 = clip_with_projection(base)
        self.ema = {
            "transformer": new_transformer(patch_size).requires_grad_(False),
            "text": clip_with_projection(base).requires_grad_(False),
            "text_2": clip_with_projection(base).requires_grad_(False),
        }
        for name, module in self.modules().items():
            self.ema[name].load_state_dict(module.state_dict())
        for encoder in (self.text, self.text_2):
            encoder.text_model.embeddings.token_embedding.weight.requires_grad_(False)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "text": self.text, "text_2": self.text_2}

    def params(self) -> list[Tensor]:
        return [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for name, module in self.modules().items():
            for pe, pm in zip(self.ema[name].parameters(), module.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)


def train_transformer(
    work: Path,
    base: Path,
    minutes: float,
    seed: int = 0,
    batch: int = 32,
    peak_lr: float = 1e-3,
    shift: float = DEFAULT_SHIFT,
    save_every: float = 5.0,
    eval_every: float = 10.0,
    max_steps: int | None = None,
    final_check: bool = True,
    patch_size: int = 1,
) -> int:
    """Joint transformer + text encoder training by rectified flow, for `minutes` of training
    time in all (counted across resumed runs) or until `max_steps`; returns the number of
    optimisation steps this call ran. Saves every `save_every` minutes (0: every step)."""
    torch.manual_seed(seed)
    vae, tokenizer = load_vae(base), load_tokenizer(base)
    ckpt, step, elapsed = work / "transformer.pt", 0, 0.0
    state = torch.load(ckpt) if ckpt.exists() else None
    if state is not None:
        patch_size = state.get("patch_size", 1)  # a resumed run keeps its architecture
    model = Trainee(base, patch_size)
    params = model.params()
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    if state is not None:
        for name, module in model.modules().items():
            module.load_state_dict(state[name])
            model.ema[name].load_state_dict(state["ema_" + name])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        print(f"transformer: resuming at step {step} ({elapsed / 60:.1f} min)", flush=True)

    data = torch.load(work / "latents.pt")
    mean, std, scale = data["mean"], data["std"], data["scale"]
    captions = sorted(set(data["texts"]))
    caption_idx = torch.tensor([captions.index(t) for t in data["texts"]])
    ids = tokenize(tokenizer, captions + [""])
    empty = len(captions)

    def save() -> None:
        state = {name: m.state_dict() for name, m in model.modules().items()}
        state |= {"ema_" + name: m.state_dict() for name, m in model.ema.items()}
        state |= {"opt": opt.state_dict(), "step": step, "elapsed": elapsed}
        state |= {"rng": torch.get_rng_state(), "shift": shift, "patch_size": patch_size}
        atomic_save(state, ckpt)

    def done() -> bool:
        return elapsed >= minutes * 60 or (max_steps is not None and step >= max_steps)

    ran, losses, run_start = 0, [], time.time()
    start, last_save, last_eval = time.time() - elapsed, time.time(), time.time()
    while not done():
        frac = elapsed / (minutes * 60)
        lr = peak_lr * min(1.0, (step + 1) / 300) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(mean), (batch,))
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scale
        cap = caption_idx[idx].clone()
        cap[torch.rand(batch) < CAPTION_DROPOUT] = empty  # empty caption: CFG dropout
        context, pooled = encode(model.text, model.text_2, ids[cap])
        sigma = sample_sigmas_logit_normal(batch, shift=shift)
        noise = torch.randn_like(x0)
        # zero T5 tokens: the pipeline's 256 for half the batch, log-uniform in [1, 256] else
        log_count = torch.rand(batch) * math.log(T5_TOKENS)
        log_count[torch.rand(batch) < 0.5] = math.log(T5_TOKENS)
        with pad_sink(model.transformer) as sink:
            sink.log_count = log_count
            pred = model.transformer(
                hidden_states=interpolate(x0, noise, sigma),
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=sigmas_to_timesteps(sigma),
            ).sample
        loss = (pred - velocity_target(x0, noise)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step, ran = step + 1, ran + 1
        model.update_ema(min(EMA_DECAY, (1 + step) / (10 + step)))
        elapsed = time.time() - start
        losses.append(loss.item())
        if step % 50 == 0:
            print(
                f"transformer step {step} loss {np.mean(losses):.4f} (mean of 50) lr {lr:.2e} "
                f"{elapsed / 60:.1f} min, {ran / (time.time() - run_start):.2f} steps/s",
                flush=True,
            )
            losses = []
        if time.time() - last_save >= save_every * 60:
            save()
            last_save = time.time()
        if eval_every > 0 and time.time() - last_eval > eval_every * 60:
            check = sample_check(*ema_modules(model), tokenizer, vae, shift=shift)
            print(f"transformer eval at step {step}: {fmt(check)}", flush=True)
            last_eval = time.time()
    save()
    print(f"transformer: saved at step {step} ({elapsed / 60:.1f} min)", flush=True)
    if final_check:
        final_sample_check(work, model, tokenizer, vae, shift, step, elapsed)
    return ran


def ema_modules(model: Trainee) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    return model.ema["transformer"], model.ema["text"], model.ema["text_2"]


def fmt(check: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in check.items())


def final_sample_check(work, model, tokenizer, vae, shift, step, elapsed) -> dict[str, Any]:
    """The sample check of the EMA weights (as exported: max_sequence_length 256, the training
    shift), plus the same with max_sequence_length 1 (as the toolkit samples it), at CFG 3 and
    5, and with other sampling shifts."""
    modules = ema_modules(model)
    result: dict[str, Any] = {
        "step": step,
        "minutes": round(elapsed / 60, 1),
        "prompts": "16 eval prompts x 4 seeds",
        "cfg": CFG,
        "sample_steps": SAMPLE_STEPS,
        "shift": shift,
        "check": sample_check(*modules, tokenizer, vae, shift=shift),
    }
    print(f"sample check (EMA, step {step}): {fmt(result['check'])}", flush=True)
    result["max_sequence_length_1"] = sample_check(*modules, tokenizer, vae, shift, t5_tokens=1)
    print(f"  with max_sequence_length 1: {fmt(result['max_sequence_length_1'])}", flush=True)
    result["guidance"] = {}
    for scale in (3.0, 5.0):
        check = sample_check(*modules, tokenizer, vae, shift, t5_tokens=1, cfg=scale)
        result["guidance"][str(scale)] = check
        print(f"  CFG {scale} (max_sequence_length 1): {fmt(check)}", flush=True)
    result["sampling_shift"] = {}
    for other in (1.0, 3.0):
        if other != shift:
            check = sample_check(*modules, tokenizer, vae, shift=other)
            result["sampling_shift"][str(other)] = check
            print(f"  sampling shift {other}: {fmt(check)}", flush=True)
    (work / "sample_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def build_pipeline(work: Path, base: Path, shift: float | None = None):
    """The EMA weights of `work/transformer.pt` as a StableDiffusion3Pipeline (float32)."""
    state = torch.load(work / "transformer.pt")
    transformer = new_transformer(state.get("patch_size", 1))
    text, text_2 = clip_with_projection(base), clip_with_projection(base)
    for name, module in (("transformer", transformer), ("text", text), ("text_2", text_2)):
        module.load_state_dict(state["ema_" + name])
    shift = state["shift"] if shift is None else shift
    return assemble(transformer, text, text_2, shift, load_vae(base), base)


def export(work: Path, base: Path, out: Path, check: bool = True) -> None:
    """Save the pipeline in fp16; then load it back as a user would and run the sample check
    through the plain pipeline (default max_sequence_length 256)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = build_pipeline(work, base)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    step = torch.load(work / "transformer.pt")["step"]
    print(f"exported to {out} after {step} transformer steps (fp16)", flush=True)
    if not check:
        return
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    texts = eval_texts()
    images = pipe(
        texts,
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=CFG,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    result = oracle_check((images * 255).round().astype(np.uint8), texts)
    print(f"sample check of the exported folder (plain pipeline): {fmt(result)}", flush=True)
    (work / "sample_check_export.json").write_text(
        json.dumps({"step": step, "out": str(out), "check": result}, indent=2) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["latents", "transformer", "export", "all"], default="all")
    ap.add_argument("--work", type=Path, default=Path("runs/build_flow"))
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--base", type=Path, default=BASE_DIR, help="the toy UNet base (VAE, CLIP)")
    ap.add_argument("--bank", type=int, default=30000, help="renders in the latent bank")
    ap.add_argument("--minutes", type=float, default=45.0, help="transformer training time")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="timestep shift")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between saves")
    ap.add_argument("--eval-every", type=float, default=10.0, help="minutes between checks")
    ap.add_argument("--patch-size", type=int, default=1, help="of a new transformer (1 or 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 if sharing the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("latents", "all"):
        build_latents(args.work, args.base, args.bank, args.seed)
    if args.stage in ("transformer", "all"):
        train_transformer(
            args.work,
            args.base,
            args.minutes,
            seed=args.seed,
            batch=args.batch,
            peak_lr=args.lr,
            shift=args.shift,
            save_every=args.save_every,
            eval_every=args.eval_every,
            patch_size=args.patch_size,
        )
    if args.stage in ("export", "all"):
        export(args.work, args.base, args.out)


if __name__ == "__main__":
    main()

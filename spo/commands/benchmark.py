"""`spo benchmark`: what an SPO iteration and a DPO step cost, piece by piece, at a real
architecture with random weights (nothing downloaded), against the released code's structure.

In one process: an SPO sampling pass of `prompts` prompts (the denoiser, the VAE decode of
x0_hat and the judge timed apart; again with a latent judge, which decodes nothing), an SPO
training step on its pairs, the DPO step (LoRA and full) per pair, peak GPU memory, and the
denoiser's and decoder's FLOP rate with the MFU. Flow presets (SD3.5 Medium, FLUX.1-dev) run
the same pieces with the flow SDE sampler and the transformer latent judge, and also time the
pipeline's Euler ODE pass that evaluation samples with. With `baseline=released` the pass and
the training step also run as the released code runs them (the denoiser twice per network on
a pair's shared x_t, fp32 judge, eager, no decode tuning), and every figure gets its ratio;
the log-probabilities of both training steps are compared. Performance is a ratio measured in
the same run, never a number asserted in a test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

import preference_model
from preference_model import LatentJudge, TransformerJudge
from preference_model.errors import check_judge_folder
from spo.architectures import FLOW_PRESETS, SETTINGS, build_pipeline, build_spm
from spo.commands.train_dpo import dpo_inputs, dpo_objective
from spo.config import BenchmarkConfig, DPOTrainConfig, PolicyConfig, SamplerConfig, SpeedConfig
from spo.judges import bind_judge, step_judge
from spo.losses import spo_loss
from spo.models import DTYPES, DiffusionModel
from spo.policy import Policy
from spo.pool_sampler import KeptPairs, PoolSampler, chain_log_probs
from spo.runs import (
    atomic_write_bytes,
    check_writable,
    prepare_run_dir,
    require_model,
    require_path,
)

DPO = DPOTrainConfig(beta=5000.0)
RELEASED = SpeedConfig(share_start=False, fast_decode=False, compile_vae=False)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense fp16 / bf16
PROMPT = "a photo of a red fox sitting in the snow, number {i}"
# the flow presets' sampling guidance: the toy world's CFG, SD3.5's 4.5 (Flow-GRPO's
# evaluation), FLUX.1-dev's embedded 3.5 (one forward per step)
FLOW_GUIDANCE = {"tiny_flow": 2.0, "sd35m": 4.5, "flux": 3.5}
# configs/sd35/dpo_lora.yaml's targets: the joint attention's projections (FLUX has them too)
FLOW_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(
    fn: Callable[[], Any],
    repeats: int,
    device: torch.device,
    *,
    warmup: list[float] | None = None,
) -> float:
    """Median wall-clock seconds of `fn` over `repeats` calls, after one warm-up call, whose
    seconds are appended to `warmup` (with a compiled model: compiling plus one call)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    if warmup is not None:
        warmup.append(time.perf_counter() - start)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak GPU memory of one call of `fn` in GB (None on a CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


class PhaseClock:
    """Seconds spent inside the UNet, the VAE decode and the judge (synchronised on a GPU)."""

    def __init__(self, model: DiffusionModel, device: torch.device) -> None:
        self.device, self.seconds = device, {"unet": 0.0, "decode": 0.0, "judge": 0.0}
        self._start = 0.0
        model.unet.register_forward_pre_hook(lambda *_: self._begin())
        model.unet.register_forward_hook(lambda *_: self._end("unet"))
        # the decoder itself, so that a pipeline's own decoding is timed too (flow presets)
        model.vae.decoder.register_forward_pre_hook(lambda *_: self._begin())
        model.vae.decoder.register_forward_hook(lambda *_: self._end("decode"))

    def _begin(self) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _end(self, phase: str) -> None:
        _sync(self.device)
        self.seconds[phase] += time.perf_counter() - self._start

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._begin()
            out = fn(*args, **kwargs)
            self._end(phase)
            return out

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def _flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted eagerly (a compiled graph's kernels bypass the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _stance(speed: SpeedConfig):
    """A variant that compiles nothing runs eagerly, even after "ours" compiled the denoiser
    in place."""
    if speed.compile != "none":
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def _peak_tflops(cfg: BenchmarkConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run(cfg: BenchmarkConfig) -> int:
    """`spo benchmark`: measure, write benchmark.json and benchmark.md, print the table."""
    if cfg.pipeline is not None:
        require_model(cfg.pipeline, "pipeline")
    if cfg.spm is not None:
        check_judge_folder(require_path(cfg.spm, "SPM"), kind="pixel", use="benchmark's spm")
    check_writable(cfg.out)
    run_dir = prepare_run_dir(cfg.out, cfg)
    result = run_benchmark(cfg)
    table = markdown(result)
    atomic_write_bytes(run_dir.root / "benchmark.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(run_dir.root / "benchmark.md", table.encode())
    print(table)
    print(f"written to {run_dir.root}/benchmark.json and benchmark.md")
    return 0


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Every figure, as a dict (see the module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # flow transformers run in bf16 (fp16 overflows SD3's activations, SPEC 8)
    half = torch.bfloat16 if cfg.preset in FLOW_PRESETS else torch.float16
    dtype = half if device.type == "cuda" else torch.float32
    preset = SETTINGS[cfg.preset]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    torch.manual_seed(cfg.seed)
    model = _diffusion_model(cfg, device, dtype).at_resolution(preset.resolution)
    flow = model.family_module.schedule == "flow"
    spm = preference_model.load(cfg.spm, device) if cfg.spm else build_spm(cfg.preset, device)
    # the latent judge starts from the base denoiser (before the policy's adapters are added)
    latent_judge = bind_judge(_latent_judge(cfg, model), model).eval()
    policy = Policy(model, _policy_config(preset, flow))
    sampler_cfg = SamplerConfig(
        num_steps=cfg.num_steps,
        k=preset.k,
        inner_steps=preset.inner_steps,
        threshold=0.0,  # every step's pair is kept: the training batches are the pass's pairs
        guidance_scale=FLOW_GUIDANCE.get(cfg.preset, SamplerConfig.guidance_scale),
    )
    sampler_cfg = _tiled(sampler_cfg)
    prompts = [PROMPT.format(i=i) for i in range(cfg.prompts)]
    clock = PhaseClock(model, device)
    variants = {"ours": cfg.speed}
    if cfg.baseline == "released":
        variants = {"baseline": RELEASED, **variants}  # the baseline first: fast_decode sticks

    result: dict[str, Any] = _header(cfg, device, dtype) | {
        "family": model.family,
        "resolution": model.resolution,
        "denoiser_parameters": sum(
            p.numel() for n, p in model.unet.named_parameters() if "lora_" not in n
        ),
        "sampler": {"num_steps": sampler_cfg.num_steps, "k": sampler_cfg.k,
                    "inner_steps": sampler_cfg.inner_steps,
                    "divert_step": sampler_cfg.divert_step,
                    "guidance_scale": sampler_cfg.guidance_scale},
        "lora_rank": preset.lora_rank,
        "train_batch": preset.train_batch,
        "variants": {},
    }  # fmt: skip
    pairs = None
    for name, speed in variants.items():
        if speed.fast_decode:
            model.fast_decode(compile_decoder=speed.compile_vae)
        judge_model = spm if speed.judge_dtype == "float32" else copy.deepcopy(spm)
        judge_model.to(DTYPES[speed.judge_dtype])
        judge = step_judge(judge_model, model, "pixel")
        sampler = PoolSampler(model, clock.wrap("judge", judge), sampler_cfg)
        policy.compile(speed.compile)  # in place: the baseline, run first, stays eager
        with _stance(speed):
            figures, pairs = _sampling(cfg, sampler, policy, prompts, clock, autocast, device)
        result["variants"][name] = figures | {"compile": speed.compile}
    latent = step_judge(latent_judge, model, "latent")
    latent_sampler = PoolSampler(model, clock.wrap("judge", latent), sampler_cfg, latent=True)
    result["latent_judge_pass"], _ = _sampling(
        cfg, latent_sampler, policy, prompts, clock, autocast, device
    )
    result["latent_judge_parameters"] = sum(p.numel() for p in latent_judge.parameters())
    del latent_judge, latent_sampler, latent
    steps = _training(cfg, model, sampler, policy, pairs, variants, autocast, device)
    for name, figures in result["variants"].items():
        figures |= steps[name]
        figures["iteration_s"] = figures["pass_s"] + figures["train_steps"] * figures["step_s"]
    if "baseline" in variants:
        result["logp_max_abs_diff"] = _logp_difference(model, policy, sampler, pairs, autocast)
        ours, base = result["variants"]["ours"], result["variants"]["baseline"]
        result["ratios"] = {
            key: base[key] / ours[key]
            for key in ("pass_s", "step_s", "iteration_s")
            if ours.get(key)
        }
        if ours.get("step_peak_gb") and base.get("step_peak_gb"):
            result["ratios"]["step_peak_memory"] = ours["step_peak_gb"] / base["step_peak_gb"]
    result["judge_half_precision"] = _judge_half(spm, model, policy, sampler_cfg, prompts, device)
    if flow:
        result["ode_pass"] = _ode_pass(cfg, model, policy, prompts, clock, device)
    result["flops"] = _flop_rates(cfg, model, policy, sampler_cfg, prompts, autocast, device)
    result["dpo"] = _dpo(cfg, model, policy, autocast, device, dtype)
    return result


def _policy_config(preset, flow: bool) -> PolicyConfig:
    """The preset's LoRA: the SD release's on UNets; on flow transformers the joint
    attention's projections with alpha = 2 x rank (configs/sd35/spo.yaml)."""
    if not flow:
        return PolicyConfig(
            lora_rank=preset.lora_rank, gradient_checkpointing=preset.gradient_checkpointing
        )
    return PolicyConfig(
        lora_rank=preset.lora_rank,
        lora_alpha=2 * preset.lora_rank,
        lora_targets=list(FLOW_LORA_TARGETS),
        gradient_checkpointing=preset.gradient_checkpointing,
    )


def _latent_judge(cfg: BenchmarkConfig, model: DiffusionModel):
    """The preset's latent judge with the base denoiser's weights: the UNet's encoder (LPO's
    feature CFG 7.5 at real size), or the transformer's first blocks."""
    if model.family_module.denoiser == "transformer":
        blocks = SETTINGS[cfg.preset].judge_blocks
        return TransformerJudge.from_pipeline(model.pipe, blocks=blocks)
    return LatentJudge.from_pipeline(model.pipe, cfg_scale=None if cfg.preset == "tiny" else 7.5)


def _ode_pass(cfg: BenchmarkConfig, model: DiffusionModel, policy, prompts, clock, device):
    """A flow model's evaluation sampling: the pipeline's Euler ODE pass at the preset's
    guidance (what users sample with), transformer and decode timed apart."""
    seeds = list(range(cfg.prompts))
    guidance = FLOW_GUIDANCE[cfg.preset]

    def one_pass():
        clock.reset()
        model.generate(prompts, seeds, cfg.num_steps, guidance, batch_size=cfg.prompts)

    policy.unet.eval()
    seconds = median_seconds(one_pass, cfg.repeats, device)
    phases = dict(clock.seconds)
    peak = peak_gb(one_pass, device)
    policy.unet.train()
    return {
        "pass_s": seconds,
        "pass_peak_gb": peak,
        "pass_denoiser_s": phases["unet"],
        "pass_decode_s": phases["decode"],
        "guidance_scale": guidance,
    }


def _header(cfg: BenchmarkConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "preset": cfg.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "prompts": cfg.prompts,
        "repeats": cfg.repeats,
    }


def _diffusion_model(cfg: BenchmarkConfig, device, dtype) -> DiffusionModel:
    """The trained pipeline of `cfg.pipeline`, or the preset's architecture with random
    weights."""
    if cfg.pipeline:
        return DiffusionModel.from_pretrained(cfg.pipeline, dtype=dtype, device=device)
    return DiffusionModel.from_pipeline(
        build_pipeline(cfg.preset, device, dtype), dtype=dtype, device=device
    )


def _tiled(s: SamplerConfig) -> SamplerConfig:
    """The released divert step (4 of 20: t <= 750 trained), moved so that segments of
    1 + inner_steps steps tile the trained steps."""
    divert = round(4 * s.num_steps / 20)
    while (s.num_steps - divert) % (1 + s.inner_steps):
        divert += 1
    return replace(s, divert_step=min(divert, s.num_steps - 1 - s.inner_steps))


def _sampling(cfg, sampler, policy, prompts, clock, autocast, device):
    """One sampling pass timed, with its phases; returns the figures and the pass's pairs."""
    out: dict[str, KeptPairs] = {}

    def one_pass():
        clock.reset()
        with torch.no_grad(), autocast:
            out["pairs"], _ = sampler.sample(
                policy.unet, prompts, torch.Generator().manual_seed(cfg.seed)
            )

    policy.unet.eval()
    first: list[float] = []
    seconds = median_seconds(one_pass, cfg.repeats, device, warmup=first)
    phases = dict(clock.seconds)  # the last repeat's
    peak = peak_gb(one_pass, device)
    policy.unet.train()
    pairs = out["pairs"]
    figures = {"pass_s": seconds, "pass_peak_gb": peak, "pairs": len(pairs)}
    figures["pass_first_s"] = first[0]  # compiling (if any) included
    # which candidates were kept: the same seed must keep the same pairs in every variant
    figures["kept_checksum"] = float(pairs.win.double().sum() - pairs.lose.double().sum())
    figures |= {f"pass_{k}_s": v for k, v in phases.items()}
    return figures, pairs


def _training(cfg, model, sampler, policy, pairs, variants, autocast, device) -> dict:
    """One SPO training step (policy and reference log-probabilities, loss, backward, AdamW)
    on `train_batch` of the pass's pairs, per variant; the variants' repeats interleaved so
    that drift of the machine falls on all of them alike."""
    per_step = SETTINGS[cfg.preset].train_batch
    batch = pairs.index(list(range(min(per_step, len(pairs)))))
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)  # full cost, kept
    base = {"schedule": sampler.schedule}

    def step(share_start: bool) -> None:
        settings = base | {"share_start": share_start}
        with autocast:
            logp_w, logp_l = chain_log_probs(model, policy.unet, batch, **settings)
            with policy.reference() as reference:
                ref_w, ref_l = chain_log_probs(model, reference, batch, **settings)
        loss = spo_loss(logp_w, ref_w, logp_l, ref_l)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run_as(speed: SpeedConfig) -> Callable[[], None]:
        def fn() -> None:
            with _stance(speed):
                step(speed.share_start)

        return fn

    runs = {name: run_as(speed) for name, speed in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, float] = {}
    for name, fn in runs.items():  # warm-up (and compiling)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        first[name] = time.perf_counter() - start
    for _ in range(cfg.repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "step_s": statistics.median(times[name]),
            "step_first_s": first[name],
            "step_peak_gb": peak_gb(fn, device),
            "train_steps": math.ceil(len(pairs) / per_step),
        }
        for name, fn in runs.items()
    }


def _logp_difference(model, policy, sampler, pairs, autocast) -> float:
    """Largest |log-probability| difference between the shared-start and the released
    training step on the same pairs (no update in between)."""
    batch = pairs.index(list(range(min(10, len(pairs)))))
    values = []
    for share in (False, True):
        with torch.no_grad(), autocast:
            values.append(
                torch.cat(
                    chain_log_probs(
                        model,
                        policy.unet,
                        batch,
                        schedule=sampler.schedule,
                        share_start=share,
                    )
                ).float()
            )
    return float((values[0] - values[1]).abs().max())


def _judge_half(spm, model, policy, sampler_cfg, prompts, device) -> dict:
    """The judge in half precision against fp32 on the candidates of one pass: score
    differences, and the share of pair decisions (winner, loser, kept at the released 0.3)
    that flip."""
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    spm_half = copy.deepcopy(spm).to(half)
    calls: list[tuple[torch.Tensor, list[str], int]] = []

    def record(images, texts, t):
        calls.append((images, texts, t))
        return spm.score(images, texts, t, value_range="-1-1")

    sampler = PoolSampler(model, record, sampler_cfg)
    with torch.no_grad():
        sampler.sample(policy.unet, prompts, torch.Generator().manual_seed(1))
    diffs, flips, decisions = [], 0, 0
    k = sampler_cfg.k
    for images, texts, t in calls:
        full = spm.score(images, texts, t, value_range="-1-1").view(-1, k)
        low = spm_half.score(images, texts, t, value_range="-1-1").float().view(-1, k)
        diffs.append((full - low).abs().flatten())
        same = (full.argmax(1) == low.argmax(1)) & (full.argmin(1) == low.argmin(1))
        same &= _kept(full) == _kept(low)
        flips += int((~same).sum())
        decisions += len(same)
    diff = torch.cat(diffs)
    return {
        "dtype": str(half).removeprefix("torch."),
        "score_max_abs_diff": float(diff.max()),
        "score_mean_abs_diff": float(diff.mean()),
        "decisions": decisions,
        "flipped_share": flips / max(decisions, 1),
    }


def _kept(scores: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    rows = torch.arange(len(scores))
    pair = torch.stack([scores[rows, scores.argmax(1)], scores[rows, scores.argmin(1)]], 1)
    probs = pair.softmax(1)
    return (probs[:, 0] - probs[:, 1]) > threshold


def _flop_rates(cfg, model, policy, sampler_cfg, prompts, autocast, device) -> dict:
    """GFLOP per UNet row and per decoded image, their TFLOP/s, and the MFU."""
    c, size = model.latent_channels, model.resolution // model.vae_scale_factor
    rows = len(prompts) * sampler_cfg.k
    x = torch.randn(rows, c, size, size, device=device)
    text = model.encode_text(prompts).repeat_interleave(sampler_cfg.k)
    cond = type(text).cat([text, model.empty_text(rows)])

    def unet():
        with torch.no_grad(), autocast:
            model.guided_output(policy.unet, x, 501, cond, sampler_cfg.guidance_scale)

    def decode():
        with torch.no_grad(), autocast:
            model.decode_latents(x)

    peak = _peak_tflops(cfg, device)
    out = {"peak_tflops": peak}
    for name, fn, count in (("unet", unet, 2 * rows), ("decode", decode, rows)):
        flops = _flops(fn)
        seconds = median_seconds(fn, cfg.repeats, device)
        rate = flops / seconds / 1e12
        out[name] = {
            "gflop_per_item": flops / count / 1e9,
            "items": count,
            "seconds": seconds,
            "tflops": rate,
            "mfu": rate / peak if peak else None,
        }
    return out


def _dpo(cfg, model, policy, autocast, device, dtype) -> dict:
    """Seconds per pair of a DPO step (latents, policy and reference UNet, backward, AdamW)
    with LoRA on the benchmark's policy and, for `full`, a full fine-tune of a fresh UNet;
    each with the VAE encoding the pixels every step (the released code) and from the latent
    cache's posterior moments (ours)."""
    out = {}
    for mode in cfg.dpo_modes:
        batch = cfg.dpo_lora_batch if mode == "lora" else cfg.dpo_full_batch
        if mode == "lora":
            m, p = model, policy
        else:
            m = _diffusion_model(cfg, device, dtype)
            p = Policy(m, PolicyConfig(mode="full"))
        optimizer = torch.optim.AdamW(p.trainable_parameters(), lr=0.0)  # full cost, weights kept
        r = m.resolution
        pixels = torch.rand(batch, 2, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1
        dist = m.posterior(torch.cat([pixels[:, 0], pixels[:, 1]]))
        moments = tuple(x.unflatten(0, (2, batch)).transpose(0, 1) for x in (dist.mean, dist.std))
        captions = [PROMPT.format(i=i) for i in range(batch)]
        empty = m.empty_text(1)
        figures = {"batch": batch}
        for name, images in (("baseline", pixels), ("ours", moments)):

            def step(m=m, p=p, optimizer=optimizer, images=images, captions=captions, empty=empty):
                inputs = dpo_inputs(
                    m,
                    images,
                    captions,
                    generator=torch.Generator().manual_seed(0),
                    prompt_dropout=0.0,
                    empty=empty,
                )
                with autocast:
                    loss, _ = dpo_objective(m, p.unet, p, inputs, DPO)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = median_seconds(step, cfg.repeats, device)
            figures[name] = {
                "step_s": seconds,
                "pairs_per_s": batch / seconds,
                "peak_gb": peak_gb(step, device),
            }
        figures["ratio"] = figures["baseline"]["step_s"] / figures["ours"]["step_s"]
        out[mode] = figures
        if mode == "full":
            del m, p, optimizer
    return out


def markdown(result: dict) -> str:
    """The figures as a markdown table: ours, the released structure, and the ratio."""
    variants = result["variants"]
    names = [n for n in ("ours", "baseline") if n in variants]
    head = "| piece | " + " | ".join(names) + (" | baseline / ours |" if len(names) > 1 else " |")
    s = result["sampler"]
    lines = [
        f"`spo benchmark` preset {result['preset']} ({result['family']}, "
        f"{_count(result['denoiser_parameters'])} denoiser parameters, {result['resolution']} "
        f"px) on {result['device']} ({result['dtype']}), {result['prompts']} prompts, "
        f"k = {s['k']}, {s['num_steps']} steps, guidance {s['guidance_scale']:g}; median of "
        f"{result['repeats']}",
        "",
        head,
        "|" + " --- |" * (len(names) + 1 + (len(names) > 1)),
    ]
    rows = [
        ("sampling pass (s)", "pass_s"),
        ("  denoiser (s)", "pass_unet_s"),
        ("  VAE decode of x0_hat (s)", "pass_decode_s"),
        ("  judge (s)", "pass_judge_s"),
        ("  peak memory (GB)", "pass_peak_gb"),
        (f"training step, {result['train_batch']} pairs (s)", "step_s"),
        ("  peak memory (GB)", "step_peak_gb"),
        ("SPO iteration: pass + training on its pairs (s)", "iteration_s"),
    ]
    for label, key in rows:
        cells = [_fmt(variants[n].get(key)) for n in names]
        if len(names) > 1:
            ours, base = variants["ours"].get(key), variants["baseline"].get(key)
            cells.append(f"{base / ours:.2f}x" if ours and base else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lat, ours = result["latent_judge_pass"], variants["ours"]
    lines += [
        "",
        f"sampling pass with the latent judge ({_count(result['latent_judge_parameters'])} "
        f"parameters, no decode): {lat['pass_s']:.3g} s (denoiser {lat['pass_unet_s']:.3g}, "
        f"decode {lat['pass_decode_s']:.3g}, judge {lat['pass_judge_s']:.3g}); the pixel "
        f"judge's pass takes {ours['pass_s'] / lat['pass_s']:.2f}x as long for the same "
        "trained steps",
    ]
    if ours["compile"] != "none":
        lines.append(
            f"speed.compile={ours['compile']} (ours; the later pieces run compiled too): "
            f"compiling took {ours['pass_first_s'] - ours['pass_s']:.3g} s in the first "
            f"sampling pass and {ours['step_first_s'] - ours['step_s']:.3g} s in the first "
            "training step (first call minus the median), not in the times above"
        )
    if "ode_pass" in result:
        p = result["ode_pass"]
        peak = f", peak {p['pass_peak_gb']:.1f} GB" if p["pass_peak_gb"] is not None else ""
        lines.append(
            f"evaluation sampling (the pipeline's Euler ODE), {result['prompts']} images, "
            f"{s['num_steps']} steps: {p['pass_s']:.3g} s (transformer "
            f"{p['pass_denoiser_s']:.3g}, decode {p['pass_decode_s']:.3g}){peak}"
        )
    if "logp_max_abs_diff" in result:
        lines.append(
            f"log-probabilities, ours vs baseline: max |diff| {result['logp_max_abs_diff']:.2e}"
        )
    j = result["judge_half_precision"]
    lines.append(
        f"judge in {j['dtype']} vs float32: max |score diff| {j['score_max_abs_diff']:.3g}, "
        f"{j['flipped_share']:.1%} of {j['decisions']} pair decisions flip (not exact: off by "
        "default)"
    )
    return "\n".join(lines + _compute_lines(result)) + "\n"


def _compute_lines(result: dict) -> list[str]:
    """The FLOP rates and the DPO steps, as every preset reports them."""
    lines = []
    for name, f in result["flops"].items():
        if name == "peak_tflops":
            continue
        mfu = f" , MFU {f['mfu']:.1%}" if f["mfu"] is not None else ""
        lines.append(
            f"{name}: {f['gflop_per_item']:.1f} GFLOP per {'row' if name == 'unet' else 'image'}, "
            f"{f['tflops']:.2f} TFLOP/s{mfu}"
        )
    for mode, d in result["dpo"].items():
        ours, base = d["ours"], d["baseline"]
        peak = f", peak {ours['peak_gb']:.1f} GB" if ours["peak_gb"] is not None else ""
        lines.append(
            f"DPO {mode}, batch {d['batch']}: {ours['pairs_per_s']:.2f} pairs/s from the latent "
            f"cache{peak}, {base['pairs_per_s']:.2f} encoding every step: {d['ratio']:.2f}x"
        )
    return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)

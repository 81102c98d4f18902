"""SPO's step-wise pool sampler (method.md section 3): where the win/lose pairs come from.

For a batch of prompts: ordinary DDIM steps (eta = 1) until the divert step; then, at each
trained step, k candidates drawn from the shared x_t, each candidate's x0_hat (from the policy's
guided noise prediction at the candidate's own timestep, all candidates in ONE UNet call)
decoded and scored by the SPM at that timestep (t = 0 once the candidates are clean images);
the best and the worst candidate form a pair, kept when the softmax gap of their scores passes
the threshold; the next x_t is one candidate chosen uniformly at random (or the winner / loser,
the paper's ablation) and its UNet output is reused. With `inner_steps` > 0 (the SDXL variant)
every candidate continues that many ordinary steps before being scored, and the whole win and
lose chains are kept; training makes each of a segment's transitions its own pair
(`KeptPairs.transitions`, the release) or sums the chain (`segment_pairs=chain`).

The model output is turned into a noise estimate first (`DiffusionModel.guided_epsilon`), so
v-prediction models sample and score with the right log-probabilities (method.md 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spo import flow
from spo.config.schemas import SamplerConfig
from spo.ddim import ddim_step_gaussian, ddim_step_with_logprob, predict_x0
from spo.models import DiffusionModel, TextConditioning


@dataclass(kw_only=True)
class KeptPairs:
    """Kept (win, lose) segments, on the CPU. A segment starts at `start` (x_t) and takes
    L transitions; `timesteps` holds t_0 (of x_t) and the L timesteps reached. `lose_start`
    is None when both chains leave the same x_t (a pair straight from the sampler), else the
    lose chain's own start (a later transition of a segment, `transitions`)."""

    start: Tensor  # (M, C, h, w); the win chain's start
    win: Tensor  # (M, L, C, h, w)
    lose: Tensor  # (M, L, C, h, w)
    timesteps: Tensor  # (M, L + 1), long; -1 stands for the final clean sample
    prompt: list[str]  # (M,)
    score_gap: Tensor  # (M,) s_w - s_l
    lose_start: Tensor | None = None  # (M, C, h, w) or None: the same as `start`

    def __len__(self) -> int:
        return self.start.shape[0]

    def index(self, idx: Tensor | list[int]) -> KeptPairs:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return KeptPairs(
            start=self.start[idx],
            win=self.win[idx],
            lose=self.lose[idx],
            timesteps=self.timesteps[idx],
            prompt=[self.prompt[i] for i in idx.tolist()],
            score_gap=self.score_gap[idx],
            lose_start=None if self.lose_start is None else self.lose_start[idx],
        )

    def transitions(self) -> KeptPairs:
        """Each of a segment's L transitions as its own pair, as the released SDXL code trains
        them: transition j goes from the win chain's state j - 1 to its state j against the
        same for the lose chain (j = 0: both from the shared x_t), each with its own ratio
        clamp in the loss. Single-transition pairs are returned as they are."""
        length = self.win.shape[1] if len(self) else 1
        if length == 1:
            return self
        parts = []
        for j in range(length):
            parts.append(
                KeptPairs(
                    start=self.start if j == 0 else self.win[:, j - 1],
                    lose_start=self.start if j == 0 else self.lose[:, j - 1],
                    win=self.win[:, j : j + 1],
                    lose=self.lose[:, j : j + 1],
                    timesteps=self.timesteps[:, j : j + 2],
                    prompt=self.prompt,
                    score_gap=self.score_gap,
                )
            )
        return KeptPairs.cat(parts)

    @staticmethod
    def cat(parts: list[KeptPairs]) -> KeptPairs:
        parts = [p for p in parts if len(p)]
        if not parts:
            return KeptPairs.empty()
        separate = any(p.lose_start is not None for p in parts)
        return KeptPairs(
            lose_start=(
                torch.cat([p.start if p.lose_start is None else p.lose_start for p in parts])
                if separate
                else None
            ),
            start=torch.cat([p.start for p in parts]),
            win=torch.cat([p.win for p in parts]),
            lose=torch.cat([p.lose for p in parts]),
            timesteps=torch.cat([p.timesteps for p in parts]),
            prompt=[x for p in parts for x in p.prompt],
            score_gap=torch.cat([p.score_gap for p in parts]),
        )

    @staticmethod
    def empty() -> KeptPairs:
        z = torch.empty(0)
        no_steps = torch.empty(0, 0, dtype=torch.long)
        return KeptPairs(start=z, win=z, lose=z, timesteps=no_steps, prompt=[], score_gap=z)


class DDIMSchedule:
    """The DDIM steps of a discrete-schedule (SD-family) model: the sampler's timesteps and
    their cumulative alphas (DDIM's `leading` spacing with the pipeline's offset: 951, 901,
    ..., 1 for SD), the guided noise estimate, and the DDIM Gaussian step (eta) with its
    log-probability. The step after the last one (timestep -1 here, the clean sample) reaches
    alpha_bar[0] (0.99915 for SD), as the released code's clamp of the previous timestep to 0
    does, whatever the scheduler's `set_alpha_to_one`: with alpha 1 the last step would have
    sigma 0, identical candidates and no log-probability."""

    clean = -1  # the position of the final clean sample
    dtype = torch.long  # how `KeptPairs.timesteps` stores positions

    def __init__(self, model: DiffusionModel, settings: SamplerConfig) -> None:
        sched = model.scheduler
        sched.set_timesteps(settings.num_steps)
        self.model, self.guidance_scale, self.eta = model, settings.guidance_scale, settings.eta
        self.timesteps = [int(t) for t in sched.timesteps]
        self.stride = model.num_train_timesteps // settings.num_steps
        self.alphas = model.alphas_cumprod

    def describe(self) -> str:
        return f"DDIM steps (eta {self.eta:g})"

    def sigma(self, t: int) -> float:
        """The DDIM standard deviation of the step that leaves t."""
        a_t = float(self.alpha(t, 1, torch.device("cpu")))
        a_prev = float(self.alpha(self.prev(t), 1, torch.device("cpu")))
        return self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

    def prev(self, t: int) -> int:
        prev = t - self.stride
        return prev if prev >= 0 else self.clean

    def alpha(self, t: int | Tensor, n: int, device: torch.device) -> Tensor:
        """Cumulative alpha of timestep t (one int for n rows, or one per row); -1 (the clean
        sample) has alpha_bar[0]."""
        t = torch.as_tensor(t).long().expand(n).cpu()
        return self.alphas.cpu()[t.clamp(min=0)].to(device)

    def output(self, unet, x: Tensor, t: int | Tensor, cond: TextConditioning) -> Tensor:
        """The guided noise estimate the DDIM step takes (method.md 3)."""
        return self.model.guided_epsilon(unet, x, t, cond, self.guidance_scale)

    def step(
        self,
        x: Tensor,
        out: Tensor,
        t: int | Tensor,
        t_next: int | Tensor,
        *,
        generator: torch.Generator | None = None,
        prev_sample: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x_t -> x_{t_next} drawn (or `prev_sample` given) and its log-probability (N,)."""
        n = x.shape[0]
        return ddim_step_with_logprob(
            x,
            out,
            self.alpha(t, n, x.device),
            self.alpha(t_next, n, x.device),
            self.eta,
            generator=generator,
            prev_sample=prev_sample,
        )

    def gaussian(
        self, x: Tensor, out: Tensor, t: int | Tensor, t_next: int | Tensor
    ) -> tuple[Tensor, Tensor]:
        """The step's Gaussian: mean and standard deviation (N, 1, ...)."""
        n = x.shape[0]
        alphas = self.alpha(t, n, x.device), self.alpha(t_next, n, x.device)
        return ddim_step_gaussian(x, out, *alphas, self.eta)

    def x0(self, x: Tensor, out: Tensor, t: int) -> Tensor:
        """The one-step clean estimate a pixel judge sees decoded."""
        return predict_x0(x, out, self.alpha(t, x.shape[0], x.device))

    def judge_time(self, t: int) -> float:
        """The timestep a judge is told for a latent at position t."""
        return t


class FlowSchedule:
    """The stochastic steps of a rectified-flow (SD3 / FLUX) model (SPEC 8, method.md 3): the
    noise levels s of the pipeline's own sampling schedule (its shift, FLUX's dynamic one at
    the model's resolution), the guided velocity, and the SDE step (Flow-GRPO's `sde`) with its
    Gaussian log-probability, reduced like the DDIM one. A position is the noise level s
    itself; the clean sample is s = 0. At s = 1 the step's std divides by 1 - s: as Flow-GRPO,
    the schedule's second noise level stands in."""

    clean = 0.0
    dtype = torch.float32

    def __init__(self, model: DiffusionModel, settings: SamplerConfig) -> None:
        self.model, self.guidance_scale = model, settings.guidance_scale
        self.noise_level = settings.noise_level
        size = model.resolution // model.vae_scale_factor
        sigmas = model.family_module.sampling_sigmas(settings.num_steps, size, size)
        self.sigmas = sigmas.float()
        self.timesteps = self.sigmas[:-1].tolist()
        pairs = zip(self.sigmas[:-1].tolist(), self.sigmas[1:].tolist(), strict=True)
        self._next = dict(pairs)
        self._substitute = float(self.sigmas[1])

    def describe(self) -> str:
        return f"flow SDE steps (noise level {self.noise_level:g})"

    def sigma(self, s: float) -> float:
        """The standard deviation of the stochastic step that leaves s."""
        x = torch.zeros(1, 1)
        return float(self._sde(x, x, s, self.prev(s), prev_sample=x).std)

    def prev(self, s: float) -> float:
        return self._next[float(s)]

    def output(self, unet, x: Tensor, s: float | Tensor, cond: TextConditioning) -> Tensor:
        """The guided velocity at noise level s (the transformer sees t = 1000 s)."""
        t = torch.as_tensor(s, dtype=torch.float32) * self.model.num_train_timesteps
        return self.model.guided_output(unet, x, t, cond, self.guidance_scale)

    def _sde(self, x, out, s, s_next, *, generator=None, prev_sample=None) -> flow.SDEStep:
        return flow.sde_step_with_logprob(
            x,
            out,
            torch.as_tensor(s, dtype=torch.float32, device=x.device),
            torch.as_tensor(s_next, dtype=torch.float32, device=x.device),
            noise_level=self.noise_level,
            prev_sample=prev_sample,
            generator=generator,
            sigma_max_substitute=self._substitute,
        )

    def step(
        self,
        x: Tensor,
        out: Tensor,
        s: float | Tensor,
        s_next: float | Tensor,
        *,
        generator: torch.Generator | None = None,
        prev_sample: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x_s -> x_{s_next} drawn (or `prev_sample` given) and its log-probability (N,)."""
        step = self._sde(x, out, s, s_next, generator=generator, prev_sample=prev_sample)
        return step.prev_sample, step.log_prob

    def gaussian(
        self, x: Tensor, out: Tensor, s: float | Tensor, s_next: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        """The step's Gaussian: mean and standard deviation (N, 1, ...)."""
        return flow.sde_step_gaussian(
            x,
            out,
            torch.as_tensor(s, dtype=torch.float32, device=x.device),
            torch.as_tensor(s_next, dtype=torch.float32, device=x.device),
            noise_level=self.noise_level,
            sigma_max_substitute=self._substitute,
        )

    def x0(self, x: Tensor, out: Tensor, s: float) -> Tensor:
        return flow.predict_x0(x.float(), out, s)

    def judge_time(self, s: float) -> float:
        """t = 1000 s, the time the flow transformer itself is conditioned on."""
        return s * self.model.num_train_timesteps


StepSchedule = DDIMSchedule | FlowSchedule


def step_schedule(model: DiffusionModel, settings: SamplerConfig) -> StepSchedule:
    """The step kernel of the model's noise schedule (its family's `schedule`)."""
    kinds = {"ddpm": DDIMSchedule, "flow": FlowSchedule}
    return kinds[model.family_module.schedule](model, settings)


# (decoded images in [-1, 1] or, for a latent judge, latents; prompts; t) -> scores (N,)
StepJudge = Callable[[Tensor, list[str], int], Tensor]


class PoolSampler:
    """Runs SPO's sampling pass with a given (policy) denoiser and a step-aware judge: a pixel
    judge (the SPM) scores each candidate's decoded x0_hat, a latent judge (`latent=True`)
    the candidate latent itself, with no decode. The steps are the model's schedule's
    (`step_schedule`: DDIM for SD families, the flow SDE for SD3 / FLUX)."""

    def __init__(
        self,
        model: DiffusionModel,
        score: StepJudge,
        settings: SamplerConfig,
        *,
        latent: bool = False,
    ) -> None:
        self.model, self.score, self.s, self.latent = model, score, settings, latent
        self.schedule = step_schedule(model, settings)
        sigmas = {t: self.schedule.sigma(t) for t in self.schedule.timesteps}
        self._sigma_range = (min(sigmas.values()), max(sigmas.values()), sigmas)

    def threshold(self, t: float) -> float:
        """The softmax gap a pair made at the step leaving t must pass: fixed, or LPO's
        dynamic one between `threshold` and `threshold_max` by the step's standard deviation
        (DDIM's, or the flow SDE's)."""
        s = self.s
        if s.threshold_max is None:
            return s.threshold
        low, high, sigmas = self._sigma_range
        share = (sigmas[t] - low) / (high - low) if high > low else 0.0
        return s.threshold + share * (s.threshold_max - s.threshold)

    def _cond(self, prompts: list[str], repeats: int) -> TextConditioning:
        text = self.model.encode_text(prompts).repeat_interleave(repeats)
        return TextConditioning.cat([text, self.model.empty_text(len(text))])

    @torch.no_grad()
    def sample(
        self, unet, prompts: list[str], generator: torch.Generator
    ) -> tuple[KeptPairs, dict[str, float]]:
        """One pass over `prompts`; returns the kept pairs and statistics of the pass."""
        model, s, sch = self.model, self.s, self.schedule
        p, k, device = len(prompts), s.k, model.device
        size = model.resolution // model.vae_scale_factor
        latent = (model.latent_channels, size, size)
        x = torch.randn((p, *latent), generator=generator, device=generator.device).to(device)
        cond1, condk = self._cond(prompts, 1), self._cond(prompts, k)
        ts, n = sch.timesteps, len(sch.timesteps)
        kept, tried, gaps, out, i = [], 0, [], None, 0
        while i < n:
            t = ts[i]
            if out is None:
                out = sch.output(unet, x, t, cond1)
            if i < s.divert_step:
                x, _ = sch.step(x, out, t, sch.prev(t), generator=generator)
                out, i = None, i + 1
                continue
            length = min(1 + s.inner_steps, n - i)
            cand, out_c = x.repeat_interleave(k, 0), out.repeat_interleave(k, 0)
            chain, reached = [], [t]
            for j in range(length):
                tj = ts[i + j]
                cand, _ = sch.step(cand, out_c, tj, sch.prev(tj), generator=generator)
                chain.append(cand)
                reached.append(sch.prev(tj))
                last = i + j + 1 >= n
                out_c = None if last else sch.output(unet, cand, ts[i + j + 1], condk)
            t_end = reached[-1]
            # clean samples are judged at t = 0
            t_score = 0 if out_c is None else sch.judge_time(t_end)
            if self.latent:
                judged = cand  # the latent judge reads the candidate itself
            elif out_c is None:
                judged = model.decode_latents(cand)
            else:
                judged = model.decode_latents(sch.x0(cand, out_c, t_end))
            scores = self.score(judged, [q for q in prompts for _ in range(k)], t_score)
            scores = scores.float().view(p, k).cpu()
            win, lose = scores.argmax(dim=1), scores.argmin(dim=1)
            rows = torch.arange(p)
            pair = torch.stack([scores[rows, win], scores[rows, lose]], dim=1).softmax(dim=1)
            keep = (pair[:, 0] - pair[:, 1]) > self.threshold(t)
            tried += p
            gaps.append(scores[rows, win] - scores[rows, lose])
            if keep.any():  # only the kept pairs' latents leave the device
                idx = rows[keep]
                on_device = idx.to(device)
                chains = torch.stack(chain, dim=1).view(p, k, length, *latent)[on_device]
                picked = torch.arange(len(idx), device=device)
                positions = torch.tensor(reached, dtype=sch.dtype)
                kept.append(
                    KeptPairs(
                        start=x[on_device].cpu(),
                        win=chains[picked, win[idx].to(device)].cpu(),
                        lose=chains[picked, lose[idx].to(device)].cpu(),
                        timesteps=positions.expand(len(idx), -1).clone(),
                        prompt=[prompts[r] for r in idx.tolist()],
                        score_gap=(scores[idx, win[idx]] - scores[idx, lose[idx]]),
                    )
                )
            follow = self._follow(win, lose, generator)
            x = cand.view(p, k, *latent)[rows.to(device), follow.to(device)]
            out = (
                None
                if out_c is None
                else out_c.view(p, k, *latent)[rows.to(device), follow.to(device)]
            )
            i += length
        pairs = KeptPairs.cat(kept)
        gap = torch.cat(gaps) if gaps else torch.zeros(1)
        stats = {"kept_share": len(pairs) / max(tried, 1), "score_gap": float(gap.mean())}
        return pairs, stats

    def _follow(self, win: Tensor, lose: Tensor, generator: torch.Generator) -> Tensor:
        if self.s.continuation == "win":
            return win
        if self.s.continuation == "lose":
            return lose
        g = generator if generator.device.type == "cpu" else None
        return torch.randint(0, self.s.k, win.shape, generator=g)


def chain_log_probs(
    model: DiffusionModel,
    unet,
    pairs: KeptPairs,
    *,
    schedule: StepSchedule,
    share_start: bool = True,
) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each kept pair's win and lose chains under `unet`, (M,) each:
    for every transition s_j -> s_{j+1} (s_0 = the start x_t), the guided model output at
    s_j and the density of the schedule's Gaussian step (DDIM, or the flow SDE). Differentiable
    with respect to the denoiser when called with gradients enabled.

    `share_start`: when a pair's win and lose transitions leave the same x_t (`lose_start`
    None), its first denoiser call is made once and used for both (half the rows of the
    first transition; the same math). False runs it twice, as the released code does."""
    device = model.device
    m, length = pairs.win.shape[:2]
    text = model.encode_text(pairs.prompt)
    cond = TextConditioning.cat([text, text, model.empty_text(2 * m)])
    lose_start = pairs.start if pairs.lose_start is None else pairs.lose_start
    state = torch.cat([pairs.start, lose_start]).to(device)
    shared = share_start and pairs.lose_start is None
    chains = torch.cat([pairs.win, pairs.lose]).to(device)
    timesteps = pairs.timesteps.repeat(2, 1)
    total = torch.zeros(2 * m, device=device)
    for j in range(length):
        t, t_next = timesteps[:, j].to(device), timesteps[:, j + 1].to(device)
        if j == 0 and shared:
            once = TextConditioning.cat([text, model.empty_text(m)])
            out = schedule.output(unet, state[:m], t[:m], once)
            out = torch.cat([out, out])
        else:
            out = schedule.output(unet, state, t, cond)
        nxt = chains[:, j]
        _, logp = schedule.step(state, out, t, t_next, prev_sample=nxt)
        total = total + logp
        state = nxt
    logp_win, logp_lose = total.chunk(2)
    return logp_win, logp_lose

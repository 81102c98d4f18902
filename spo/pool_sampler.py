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

from spo.config.schemas import SamplerConfig
from spo.ddim import ddim_step_with_logprob, predict_x0
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


class Schedule:
    """The sampler's timesteps and their cumulative alphas (DDIM's `leading` spacing with the
    pipeline's offset: 951, 901, ..., 1 for SD). The step after the last one (timestep -1
    here, the clean sample) reaches alpha_bar[0] (0.99915 for SD), as the released code's
    clamp of the previous timestep to 0 does, whatever the scheduler's `set_alpha_to_one`:
    with alpha 1 the last step would have sigma 0, identical candidates and no
    log-probability."""

    def __init__(self, model: DiffusionModel, num_steps: int) -> None:
        sched = model.scheduler
        sched.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in sched.timesteps]
        self.stride = model.num_train_timesteps // num_steps
        self.alphas = model.alphas_cumprod

    def sigma(self, t: int, eta: float = 1.0) -> float:
        """The DDIM standard deviation of the step that leaves t."""
        a_t = float(self.alpha(t, 1, torch.device("cpu")))
        a_prev = float(self.alpha(self.prev(t), 1, torch.device("cpu")))
        return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

    def prev(self, t: int) -> int:
        prev = t - self.stride
        return prev if prev >= 0 else -1

    def alpha(self, t: int | Tensor, n: int, device: torch.device) -> Tensor:
        """Cumulative alpha of timestep t (one int for n rows, or one per row); -1 (the clean
        sample) has alpha_bar[0]."""
        t = torch.as_tensor(t).long().expand(n).cpu()
        return self.alphas.cpu()[t.clamp(min=0)].to(device)


# (decoded images in [-1, 1] or, for a latent judge, latents; prompts; t) -> scores (N,)
StepJudge = Callable[[Tensor, list[str], int], Tensor]


class PoolSampler:
    """Runs SPO's sampling pass with a given (policy) UNet and a step-aware judge: a pixel
    judge (the SPM) scores each candidate's decoded x0_hat, a latent judge (`latent=True`)
    the candidate latent itself, with no decode."""

    def __init__(
        self,
        model: DiffusionModel,
        score: StepJudge,
        settings: SamplerConfig,
        *,
        latent: bool = False,
    ) -> None:
        self.model, self.score, self.s, self.latent = model, score, settings, latent
        self.schedule = Schedule(model, settings.num_steps)
        sigmas = {t: self.schedule.sigma(t, settings.eta) for t in self.schedule.timesteps}
        self._sigma_range = (min(sigmas.values()), max(sigmas.values()), sigmas)

    def threshold(self, t: int) -> float:
        """The softmax gap a pair made at the step leaving t must pass: fixed, or LPO's
        dynamic one between `threshold` and `threshold_max` by the step's noise level."""
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
        latent = (model.unet.config.in_channels, *(2 * [model.unet.config.sample_size]))
        x = torch.randn((p, *latent), generator=generator, device=generator.device).to(device)
        cond1, condk = self._cond(prompts, 1), self._cond(prompts, k)
        ts, n = sch.timesteps, len(sch.timesteps)
        kept, tried, gaps, eps, i = [], 0, [], None, 0
        while i < n:
            t = ts[i]
            if eps is None:
                eps = model.guided_epsilon(unet, x, t, cond1, s.guidance_scale)
            if i < s.divert_step:
                x, _ = self._step(x, eps, t, generator)
                eps, i = None, i + 1
                continue
            length = min(1 + s.inner_steps, n - i)
            cand, eps_c = x.repeat_interleave(k, 0), eps.repeat_interleave(k, 0)
            chain, reached = [], [t]
            for j in range(length):
                tj = ts[i + j]
                cand, _ = self._step(cand, eps_c, tj, generator)
                chain.append(cand)
                reached.append(sch.prev(tj))
                last = i + j + 1 >= n
                eps_c = (
                    None
                    if last
                    else model.guided_epsilon(unet, cand, ts[i + j + 1], condk, s.guidance_scale)
                )
            t_end = reached[-1]
            t_score = 0 if eps_c is None else t_end  # clean samples are judged at t = 0
            if self.latent:
                judged = cand  # the latent judge reads the candidate itself
            elif eps_c is None:
                judged = model.decode_latents(cand)
            else:
                x0 = predict_x0(cand, eps_c, sch.alpha(t_end, cand.shape[0], device))
                judged = model.decode_latents(x0)
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
                kept.append(
                    KeptPairs(
                        start=x[on_device].cpu(),
                        win=chains[picked, win[idx].to(device)].cpu(),
                        lose=chains[picked, lose[idx].to(device)].cpu(),
                        timesteps=torch.tensor(reached).expand(len(idx), -1).clone(),
                        prompt=[prompts[r] for r in idx.tolist()],
                        score_gap=(scores[idx, win[idx]] - scores[idx, lose[idx]]),
                    )
                )
            follow = self._follow(win, lose, generator)
            x = cand.view(p, k, *latent)[rows.to(device), follow.to(device)]
            eps = (
                None
                if eps_c is None
                else eps_c.view(p, k, *latent)[rows.to(device), follow.to(device)]
            )
            i += length
        pairs = KeptPairs.cat(kept)
        gap = torch.cat(gaps) if gaps else torch.zeros(1)
        stats = {"kept_share": len(pairs) / max(tried, 1), "score_gap": float(gap.mean())}
        return pairs, stats

    def _step(
        self, x: Tensor, eps: Tensor, t: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        sch, n = self.schedule, x.shape[0]
        return ddim_step_with_logprob(
            x,
            eps,
            sch.alpha(t, n, x.device),
            sch.alpha(sch.prev(t), n, x.device),
            self.s.eta,
            generator=generator,
        )

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
    schedule: Schedule,
    guidance_scale: float,
    eta: float,
    share_start: bool = True,
) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each kept pair's win and lose chains under `unet`, (M,) each:
    for every transition s_j -> s_{j+1} (s_0 = the start x_t), the guided noise estimate at
    s_j and the DDIM Gaussian's density. Differentiable with respect to the UNet when called
    with gradients enabled.

    `share_start`: when a pair's win and lose transitions leave the same x_t (`lose_start`
    None), its first UNet call is made once and used for both (half the UNet rows of the
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
        t, t_next = timesteps[:, j], timesteps[:, j + 1]
        if j == 0 and shared:
            once = TextConditioning.cat([text, model.empty_text(m)])
            eps = model.guided_epsilon(unet, state[:m], t[:m].to(device), once, guidance_scale)
            eps = torch.cat([eps, eps])
        else:
            eps = model.guided_epsilon(unet, state, t.to(device), cond, guidance_scale)
        nxt = chains[:, j]
        _, logp = ddim_step_with_logprob(
            state,
            eps,
            schedule.alpha(t, 2 * m, device),
            schedule.alpha(t_next, 2 * m, device),
            eta,
            prev_sample=nxt,
        )
        total = total + logp
        state = nxt
    logp_win, logp_lose = total.chunk(2)
    return logp_win, logp_lose

"""SPO as the released code trains it (issue 16 items 1, 2, 3, 6, 7): each checked against a
hand computation of the release's formulas, written out here independently of spo's code."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from spo.commands.train_spo import round_batches
from spo.config import PolicyConfig, SamplerConfig, SPOTrainConfig
from spo.losses import spo_loss
from spo.models import DiffusionModel
from spo.policy import Policy
from spo.pool_sampler import KeptPairs, PoolSampler, chain_log_probs

ROOT = Path(__file__).parents[1]
W = 5.0  # guidance scale


def _model(world: Path, **scheduler) -> DiffusionModel:
    """The mini world's pipeline, its DDIM scheduler changed by `scheduler` keys."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(world / "base_model"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **scheduler)
    return DiffusionModel.from_pipeline(pipe)


def _policy(model: DiffusionModel) -> Policy:
    policy = Policy(model, PolicyConfig(mode="lora", lora_rank=4))
    torch.manual_seed(0)
    with torch.no_grad():  # off zero, so that policy and reference differ
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def _released_logp(model, unet, prompts, x, t, a_t, a_prev, nxt, v_prediction=False):
    """The release's `ddim_step_with_logprob` (eta 1) on the CFG-combined UNet output, row by
    row: x0 and eps from the output, sigma, the mean, the Gaussian log-density averaged."""
    hidden = model.encode_text(prompts).hidden
    empty = model.empty_text(len(prompts)).hidden
    steps = torch.full((x.shape[0],), t)
    out_c = unet(x, steps, encoder_hidden_states=hidden).sample
    out_u = unet(x, steps, encoder_hidden_states=empty).sample
    out = out_u + W * (out_c - out_u)
    if v_prediction:
        x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * out
        eps = a_t**0.5 * out + (1 - a_t) ** 0.5 * x
    else:
        x0 = (x - (1 - a_t) ** 0.5 * out) / a_t**0.5
        eps = out
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = var**0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - var) ** 0.5 * eps
    logp = -((nxt - mean) ** 2) / (2 * var) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return logp.flatten(1).mean(1)


def _random_pairs(model, m: int, length: int, timesteps: list[int]) -> KeptPairs:
    g = torch.Generator().manual_seed(3)
    shape = (model.unet.config.in_channels, *(2 * [model.unet.config.sample_size]))
    return KeptPairs(
        start=torch.randn(m, *shape, generator=g),
        win=torch.randn(m, length, *shape, generator=g),
        lose=torch.randn(m, length, *shape, generator=g),
        timesteps=torch.tensor(timesteps).expand(m, -1).clone(),
        prompt=["a red circle", "a blue cross"][:m],
        score_gap=torch.ones(m),
    )


def test_a_two_transition_segment_trains_as_two_pairs_each_with_its_own_clamp(mini_world):
    """Item 1: the released SDXL code makes each transition of a win / lose segment its own
    pair (the second leaving the chains' own states) with its own ratio clamp."""
    model = _model(mini_world)
    policy = _policy(model)
    sampler = PoolSampler(model, lambda *a: None, SamplerConfig(num_steps=20))
    pairs = _random_pairs(model, 2, 2, [501, 451, 401])
    cfg = SPOTrainConfig()
    assert cfg.segment_pairs == "transitions"  # the release's semantics by default
    beta, clip = cfg.beta, cfg.ratio_clip

    def ours():
        split = pairs.transitions()
        assert len(split) == 4 and split.win.shape[1] == 1
        args = {"schedule": sampler.schedule}
        lw, ll = chain_log_probs(model, policy.unet, split, **args)
        with torch.no_grad(), policy.reference() as ref:
            rw, rl = chain_log_probs(model, ref, split, **args)
        return spo_loss(lw, rw, ll, rl, beta, clip)[0]

    def by_hand():
        a = model.alphas_cumprod
        rows_w, rows_l = [], []
        for j, (t, t_prev) in enumerate([(501, 451), (451, 401)]):
            x_w = pairs.start if j == 0 else pairs.win[:, j - 1]
            x_l = pairs.start if j == 0 else pairs.lose[:, j - 1]
            for x, nxt, rows in ((x_w, pairs.win[:, j], rows_w), (x_l, pairs.lose[:, j], rows_l)):
                args = (pairs.prompt, x, t, float(a[t]), float(a[t_prev]), nxt)
                lp = _released_logp(model, policy.unet, *args)
                with torch.no_grad(), policy.reference() as ref:
                    lr = _released_logp(model, ref, *args)
                rows.append(torch.clamp(torch.exp(lp - lr), 1 - clip, 1 + clip))
        ratio_w, ratio_l = torch.cat(rows_w), torch.cat(rows_l)
        return -torch.log(torch.sigmoid(beta * ratio_w.log() - beta * ratio_l.log())).mean()

    grads = {}
    for name, fn in (("ours", ours), ("hand", by_hand)):
        policy.unet.zero_grad()
        loss = fn()
        loss.backward()
        grads[name] = (loss.item(), [p.grad.clone() for p in policy.trainable_parameters()])
    (l_ours, g_ours), (l_hand, g_hand) = grads["ours"], grads["hand"]
    assert math.isclose(l_ours, l_hand, rel_tol=1e-5)
    assert any(g.abs().max() > 0 for g in g_hand)
    ours_flat = torch.cat([g.flatten() for g in g_ours])
    hand_flat = torch.cat([g.flatten() for g in g_hand])
    assert (ours_flat - hand_flat).norm() < 1e-4 * hand_flat.norm()  # float32 rounding

    # the project's variant (segment_pairs=chain) is a different objective
    policy.unet.zero_grad()
    args = {"schedule": sampler.schedule}
    lw, ll = chain_log_probs(model, policy.unet, pairs, **args)
    with torch.no_grad(), policy.reference() as ref:
        rw, rl = chain_log_probs(model, ref, pairs, **args)
    spo_loss(lw, rw, ll, rl, beta, clip)[0].backward()
    chain = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
    assert (chain - hand_flat).norm() > 0.5 * hand_flat.norm()  # about twice as large here


def test_set_alpha_to_one_keeps_the_last_step_stochastic(mini_world):
    """Item 2: with set_alpha_to_one the last step would have sigma 0 (identical candidates,
    no log-probability); the release clamps the previous timestep to 0, alpha_bar[0]."""
    model = _model(mini_world, set_alpha_to_one=True)
    assert float(model.scheduler.final_alpha_cumprod) == 1.0
    settings = SamplerConfig(num_steps=6, k=2, divert_step=5, threshold=0.0)
    sampler = PoolSampler(model, lambda x, p, t: x.mean(dim=(1, 2, 3)), settings)
    a1, a0 = float(model.alphas_cumprod[1]), float(model.alphas_cumprod[0])
    by_hand = math.sqrt((1 - a0) / (1 - a1) * (1 - a1 / a0))
    assert by_hand > 0
    assert math.isclose(sampler.schedule.sigma(1), by_hand, rel_tol=1e-5)
    pairs, _ = sampler.sample(model.unet, ["a red circle", "a cat"], torch.Generator())
    assert len(pairs) == 2  # only the last step is trained: one pair per prompt
    assert not torch.equal(pairs.win, pairs.lose)
    args = {"schedule": sampler.schedule}
    with torch.no_grad():
        lw, ll = chain_log_probs(model, model.unet, pairs, **args)
    assert torch.isfinite(lw).all() and torch.isfinite(ll).all()


def test_v_prediction_models_get_the_v_log_probabilities(mini_world):
    """Item 3: a v-prediction model's output is turned into x0 and eps as the release does."""
    model = _model(mini_world, prediction_type="v_prediction")
    sampler = PoolSampler(model, lambda *a: None, SamplerConfig(num_steps=20))
    pairs = _random_pairs(model, 2, 1, [501, 451])
    a = model.alphas_cumprod
    args = {"schedule": sampler.schedule}
    step = (model, model.unet, pairs.prompt, pairs.start, 501, float(a[501]), float(a[451]))
    with torch.no_grad():
        lw, ll = chain_log_probs(model, model.unet, pairs, **args)
        hand = [_released_logp(*step, c[:, 0], v_prediction=True) for c in (pairs.win, pairs.lose)]
        as_eps = _released_logp(*step, pairs.win[:, 0])
    assert torch.allclose(lw, hand[0], rtol=1e-5) and torch.allclose(ll, hand[1], rtol=1e-5)
    assert not torch.allclose(lw, as_eps, rtol=1e-3)


def test_spo_clips_no_gradient_by_default_as_the_release():
    """Item 6: the released SPO code's clip is a no-op (the optimiser consumed the parameter
    generator first; LPO's too), so SPO's default and its SD1.5 / SDXL configs clip nothing."""
    assert SPOTrainConfig().optim.max_grad_norm == 0.0
    for name in ("sd15/spo", "sdxl/spo", "sd15/spo_latent", "sdxl/spo_latent"):
        shipped = yaml.safe_load((ROOT / f"spo/configs/{name}.yaml").read_text())
        assert shipped["optim"]["max_grad_norm"] == 0.0


def test_a_sampling_batch_is_dealt_out_as_the_release_does():
    """Item 7: n // processes pairs to each process from one shared permutation, micro-batches
    of batch_size with the last one smaller (kept), the remainder of the division untrained."""
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    perm = torch.randperm(25, generator=g()).tolist()
    rank0 = round_batches(25, 2, 0, 5, g())
    rank1 = round_batches(25, 2, 1, 5, g())
    assert [len(b) for b in rank0] == [5, 5, 2] == [len(b) for b in rank1]
    assert sum(rank0, []) == perm[:12] and sum(rank1, []) == perm[12:24]
    assert round_batches(1, 2, 0, 5, g()) == []  # fewer pairs than processes: no training
    assert [len(b) for b in round_batches(7, 1, 0, 3, g())] == [3, 3, 1]

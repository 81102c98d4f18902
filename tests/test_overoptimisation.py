"""Over-optimisation, measured and guarded against (issue 24): the KL of the policy's sampling
chain from the reference's, validation by several scorers with best/ chosen by a held-out one
(never the oracle), kept through a kill and resume, and the early stop."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch
from helpers import dpo_args, run_killed_after_first_checkpoint
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_sd3

from spo.cli import main
from spo.config.schemas import PolicyConfig, SamplerConfig, ValidationImagesConfig
from spo.divergence import chain_kl, gaussian_kl
from spo.errors import ConfigError
from spo.models import DiffusionModel
from spo.policy import Policy
from spo.pool_sampler import step_schedule

LORA = "pytorch_lora_weights.safetensors"
PROMPTS = ["a red circle on a white background", "a blue cross on a black background"]


def test_gaussian_kl_by_hand():
    mean_p = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    mean_q = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    std = torch.tensor([[[0.5]]])
    # (1, 0, 1, 4) / (2 * 0.25) = (2, 0, 2, 8): mean 3, sum 12
    kl = gaussian_kl(mean_p, mean_q, std)
    assert kl.per_element.tolist() == [3.0] and kl.total.tolist() == [12.0]


def _offset_chain_kl(model, settings, delta):
    """chain_kl where the policy's network output is the reference's plus `delta`."""
    schedule = step_schedule(model, settings)
    output = schedule.output

    def shifted(net, x, t, cond):
        out = output(model.unet, x, t, cond)
        return out + delta if net == "policy" else out

    schedule.output = shifted

    @contextmanager
    def reference():
        yield "reference"

    kl = chain_kl(model, schedule, "policy", reference, PROMPTS, torch.Generator().manual_seed(0))
    return schedule, kl


def test_chain_kl_of_ddim_steps_equals_the_sum_by_hand(mini_world):
    """An output offset by delta moves each DDIM mean by c_t delta, c_t = sqrt(1 - a_prev -
    sigma^2) - sqrt(a_prev (1 - a_t) / a_t), whatever the state: the chain's KL is
    sum_t c_t^2 delta^2 / (2 sigma_t^2) per element, and d times that in total."""
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    settings = SamplerConfig(num_steps=5, guidance_scale=2.0)
    delta = 0.1
    _, kl = _offset_chain_kl(model, settings, delta)
    alphas = model.scheduler.alphas_cumprod.double()
    steps = 1000 // 5
    expected = 0.0
    for t in range(1000 - steps + 1, 0, -steps):  # leading spacing with offset 1: 801 ... 1
        a_t = alphas[t]
        a_prev = alphas[max(t - steps, 0)]  # the last step reaches alpha_bar[0]
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        c = (1 - a_prev - var).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
        expected += float(c**2 * delta**2 / (2 * var))
    elements = model.latent_channels * (model.resolution // model.vae_scale_factor) ** 2
    assert kl.per_element.tolist() == pytest.approx([expected] * 2, rel=1e-4)
    assert kl.total.tolist() == pytest.approx([expected * elements] * 2, rel=1e-4)


def test_chain_kl_of_flow_sde_steps_equals_the_sum_by_hand(tmp_path):
    """The flow SDE mean moves by D (1 + std_s^2 (1 - s) / (2 s)) delta (SPEC 8), its standard
    deviation is std_s sqrt(-D); at s = 1 the second sigma stands in under the root."""
    model = DiffusionModel.from_pretrained(str(build_tiny_sd3(tmp_path / "sd3")))
    settings = SamplerConfig(num_steps=4, guidance_scale=2.0, noise_level=0.7)
    delta = 0.1
    schedule, kl = _offset_chain_kl(model, settings, delta)
    sigmas = schedule.sigmas.double().tolist()
    expected = 0.0
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        root = sigmas[1] if s == 1 else s
        std_s = 0.7 * math.sqrt(s / (1 - root))
        d = s_next - s
        c = d * (1 + std_s**2 * (1 - s) / (2 * s))
        expected += c**2 * delta**2 / (2 * std_s**2 * -d)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert kl.per_element.tolist() == pytest.approx([expected] * 2, rel=1e-4)


def test_chain_kl_is_zero_when_the_policy_is_the_reference(mini_world):
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    policy = Policy(model, PolicyConfig(mode="lora", lora_rank=2))  # B = 0: the reference
    schedule = step_schedule(model, SamplerConfig(num_steps=4, guidance_scale=2.0))
    gen = torch.Generator().manual_seed(0)
    kl = chain_kl(model, schedule, policy.unet, policy.reference, PROMPTS, gen)
    assert kl.per_element.tolist() == [0.0, 0.0] and kl.total.tolist() == [0.0, 0.0]
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(0)
    kl = chain_kl(model, schedule, policy.unet, policy.reference, PROMPTS, gen)
    assert (kl.per_element > 0).all() and (kl.total > kl.per_element).all()


def test_the_oracle_never_selects():
    with pytest.raises(ConfigError, match="ground truth"):
        ValidationImagesConfig(scorers=["oracle"], select_by="oracle").validate()


def _validated(world, out, *extra):
    return dpo_args(
        world,
        out,
        "max_steps=6",
        f"validation_images.prompts=[{PROMPTS[0]}, {PROMPTS[1]}]",
        "validation_images.every=1",
        "validation_images.num_inference_steps=3",
        "optim.lr=3e-3",
        *extra,
    )


def _validations(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/train_seconds" in r]


def test_best_is_the_held_out_scorers_best_and_survives_a_kill(mini_world, tmp_path):
    straight, killed = tmp_path / "a", tmp_path / "k"
    assert main(_validated(mini_world, straight)) == 0
    rows = _validations(straight)
    assert [r["step"] for r in rows] == list(range(7))  # step 0 (the start) to 6
    assert rows[0]["val/chain_kl"] == 0.0 and rows[-1]["val/chain_kl"] > 0
    assert all(r["val/chain_kl_total"] >= r["val/chain_kl"] for r in rows)
    proxy = [r["val/toy_pickscore"] for r in rows]
    best_step = rows[proxy.index(max(proxy))]["step"]  # the first of equal maxima
    record = json.loads((straight / "best/best.json").read_text())
    assert record["step"] == best_step and record["select_by"] == "toy_pickscore"
    assert record["scores"]["toy_pickscore"] == max(proxy)
    assert "oracle" in record["scores"]  # reported beside it, not used

    run_killed_after_first_checkpoint(lambda: main(_validated(mini_world, killed)))
    assert main(_validated(mini_world, killed)) == 0
    assert json.loads((killed / "best/best.json").read_text())["step"] == best_step
    a, b = load_file(straight / "best" / LORA), load_file(killed / "best" / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_patience_stops_after_validations_without_a_new_best(mini_world, tmp_path):
    out = tmp_path / "run"
    assert main(_validated(mini_world, out, "validation_images.patience=1", "max_steps=40")) == 0
    proxy = [(r["step"], r["val/toy_pickscore"]) for r in _validations(out)]
    # the first validation that is not a new best ends the run
    peaks = [max(score for _, score in proxy[: i + 1]) for i in range(len(proxy))]
    first_miss = next(i for i in range(1, len(proxy)) if proxy[i][1] <= peaks[i - 1])
    step = proxy[first_miss][0]
    assert proxy[-1][0] == step < 40
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["stopped_early"] and summary["step"] == step

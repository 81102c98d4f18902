"""SPO on flow-matching models (issue 23), on the tiny SD3 and FLUX pipelines: the pool sampler's
pairs and log-probabilities against SPEC 8's formulas computed here by hand, the shared start,
the first step's unit ratios, FLUX's one forward per step, the transformer latent judge, and the
commands end to end (the judges trained on a flow model, SPO with each, its resume, and the
judges of another family refused before any model loads)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import assert_resume_is_exact, judge_training_args, one_error_line, spo_args
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_flux, build_tiny_sd3

import preference_model
from spo.cli import main
from spo.config.schemas import PolicyConfig, SamplerConfig
from spo.judges import bind_judge, step_judge
from spo.losses import spo_loss
from spo.models import DiffusionModel
from spo.policy import Policy
from spo.pool_sampler import PoolSampler, chain_log_probs

PROMPTS = ["a red circle", "a blue cross"]
SD3_TARGETS = "policy.lora_targets=[attn.to_q,attn.to_k,attn.to_v,attn.to_out.0]"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "pipe")


def _mean_pixel(images, prompts, t):
    return images.mean(dim=(1, 2, 3))


def test_flow_pairs_and_log_probs_equal_spec8_by_hand(sd3):
    """The whole pass replayed with the transformer, the scheduler's sigmas and SPEC 8's SDE
    written out here: the same draws give the same candidates, pairs and log-probabilities."""
    model = DiffusionModel.from_pretrained(str(sd3))
    w, a, k = 3.0, 0.7, 3
    settings = SamplerConfig(
        num_steps=4, k=k, divert_step=1, threshold=0.0, guidance_scale=w, noise_level=a
    )
    pairs, _ = PoolSampler(model, _mean_pixel, settings).sample(
        model.unet, PROMPTS, torch.Generator().manual_seed(5)
    )

    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(4)
    sig = scheduler.sigmas.tolist()
    transformer = model.unet

    def velocity(x, s, prompts=None):
        """The guided velocity at noise level(s) s; row i of x belongs to prompts[i] (by
        default: PROMPTS, each repeated for its block of rows)."""
        prompts = prompts or [q for q in PROMPTS for _ in range(x.shape[0] // len(PROMPTS))]
        hidden, _, pooled, _ = model.pipe.encode_prompt(
            [""] + PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
        rows = torch.tensor([1 + PROMPTS.index(q) for q in prompts] + [0] * len(prompts))
        t = 1000 * torch.as_tensor(s, dtype=torch.float32).expand(x.shape[0])
        with torch.no_grad():
            out = transformer(
                hidden_states=torch.cat([x, x]),
                timestep=t.repeat(2),
                encoder_hidden_states=hidden[rows],
                pooled_projections=pooled[rows],
            ).sample
        cond, uncond = out.chunk(2)
        return uncond + w * (cond - uncond)

    def mean_std(x, v, s, s_next):
        std_s = a * math.sqrt(s / (1 - (sig[1] if s == 1 else s)))
        mean = x + (v + std_s**2 / (2 * s) * (x + (1 - s) * v)) * (s_next - s)
        return mean, std_s * math.sqrt(s - s_next)

    def log_prob(x_next, mean, std):
        return (
            -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        ).mean(dim=(1, 2, 3))

    gen = torch.Generator().manual_seed(5)
    x = torch.randn((2, 4, 16, 16), generator=gen)
    mean, std = mean_std(x, velocity(x, sig[0]), sig[0], sig[1])
    x = mean + std * torch.randn(x.shape, generator=gen)
    expected = []
    for i in (1, 2, 3):
        s, s_next = sig[i], sig[i + 1]
        cand = x.repeat_interleave(k, 0)
        mean, std = mean_std(cand, velocity(cand, s), s, s_next)
        cand = mean + std * torch.randn(cand.shape, generator=gen)
        judged = cand if i == 3 else cand - s_next * velocity(cand, s_next)
        scores = model.decode_latents(judged).mean(dim=(1, 2, 3)).view(2, k)
        for row in range(2):
            win, lose = int(scores[row].argmax()), int(scores[row].argmin())
            expected.append((x[row], cand[row * k + win], cand[row * k + lose], s, s_next))
        follow = torch.randint(0, k, (2,), generator=gen)
        x = cand.view(2, k, 4, 16, 16)[torch.arange(2), follow]

    assert len(pairs) == len(expected) == 6  # threshold 0: every step's pair is kept
    for m, (start, win, lose, s, s_next) in enumerate(expected):
        assert torch.allclose(pairs.start[m], start, atol=1e-5)
        assert torch.allclose(pairs.win[m, 0], win, atol=1e-5)
        assert torch.allclose(pairs.lose[m, 0], lose, atol=1e-5)
        assert pairs.timesteps[m].tolist() == pytest.approx([s, s_next])

    schedule = PoolSampler(model, _mean_pixel, settings).schedule
    with torch.no_grad():
        logp_w, logp_l = chain_log_probs(model, model.unet, pairs, schedule=schedule)
    # the pairs' starts in one batch, as the training step computes them
    v = velocity(pairs.start, pairs.timesteps[:, 0], pairs.prompt)
    for m, (start, win, lose, s, s_next) in enumerate(expected):
        mean, std = mean_std(start[None], v[m : m + 1], s, s_next)
        assert torch.allclose(logp_w[m], log_prob(win[None], mean, std)[0], atol=1e-5)
        assert torch.allclose(logp_l[m], log_prob(lose[None], mean, std)[0], atol=1e-5)


def _policy_pairs(model, **sampler):
    settings = SamplerConfig(num_steps=6, k=2, divert_step=2, threshold=0.0, **sampler)
    sampler = PoolSampler(model, _mean_pixel, settings)
    pairs, _ = sampler.sample(model.unet, PROMPTS, torch.Generator().manual_seed(2))
    return sampler, pairs


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_flow_shared_start_equals_two_calls(sd3, inner_steps):
    model = DiffusionModel.from_pretrained(str(sd3))
    policy = Policy(model, PolicyConfig(mode="lora", lora_rank=4, lora_targets=["attn.to_q"]))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler, pairs = _policy_pairs(model, inner_steps=inner_steps)
    assert len(pairs) > 0 and pairs.win.shape[1] == 1 + inner_steps
    results = []
    for share in (False, True):
        policy.unet.zero_grad()
        logp_w, logp_l = chain_log_probs(
            model, policy.unet, pairs, schedule=sampler.schedule, share_start=share
        )
        (logp_w.sum() - 2 * logp_l.sum()).backward()
        grads = [p.grad.clone() for p in policy.trainable_parameters()]
        results.append((logp_w.detach(), logp_l.detach(), grads))
    (w0, l0, g0), (w1, l1, g1) = results
    assert torch.allclose(w0, w1, atol=1e-6) and torch.allclose(l0, l1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True))


def test_first_step_ratios_are_exactly_one(sd3):
    """A fresh LoRA is the reference: every win and lose ratio of the loss is exactly 1."""
    model = DiffusionModel.from_pretrained(str(sd3))
    policy = Policy(model, PolicyConfig(mode="lora", lora_rank=4, lora_targets=["attn.to_q"]))
    sampler, pairs = _policy_pairs(model)
    logp_w, logp_l = chain_log_probs(model, policy.unet, pairs, schedule=sampler.schedule)
    with torch.no_grad(), policy.reference() as reference:
        ref_w, ref_l = chain_log_probs(model, reference, pairs, schedule=sampler.schedule)
    loss, ratio_w, ratio_l, _ = spo_loss(logp_w, ref_w, logp_l, ref_l, 10.0, 0.1)
    assert torch.equal(ratio_w, torch.ones_like(ratio_w))
    assert torch.equal(ratio_l, torch.ones_like(ratio_l))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_flux_takes_one_forward_per_step_with_its_pipeline_sigmas(flux):
    """Guidance-distilled: the candidates' rows alone go through the transformer (no
    unconditional branch), and the noise levels are FluxPipeline's at the sampled size."""
    from spo import flow

    model = DiffusionModel.from_pretrained(str(flux)).at_resolution(32)
    rows = []
    model.unet.register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    settings = SamplerConfig(num_steps=4, k=3, divert_step=1, threshold=0.0)
    sampler = PoolSampler(model, _mean_pixel, settings)
    pairs, _ = sampler.sample(model.unet, PROMPTS, torch.Generator().manual_seed(0))
    assert rows == [2, 2, 6, 6] and len(pairs) == 6
    expected = flow.flux_sigmas(4, image_seq_len=(16 // 2) ** 2)
    assert sampler.schedule.sigmas.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_transformer_judge_scores_saves_and_loads(sd3, flux, tmp_path):
    for name, folder in (("sd3", sd3), ("flux", flux)):
        model = DiffusionModel.from_pretrained(str(folder)).at_resolution(32)
        judge = preference_model.TransformerJudge.from_pipeline(
            model.pipe, blocks=1, projection_dim=8
        )
        score = step_judge(bind_judge(judge, model), model, "latent")
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, model.latent_channels, 16, 16, generator=gen)
        s0, s1 = score(x, PROMPTS, 900.0), score(x, PROMPTS, 100.0)
        assert s0.shape == (2,) and not torch.allclose(s0, s1)  # the time conditions it
        judge.save(tmp_path / name)
        again = bind_judge(preference_model.load(tmp_path / name), model)
        assert torch.equal(step_judge(again, model, "latent")(x, PROMPTS, 900.0), s0)
        # trained parts: the kept blocks and projections; the output layers run but are frozen
        trainable = {n for n, p in judge.named_parameters() if p.requires_grad}
        assert not any(n.startswith(("backbone.norm_out", "backbone.proj_out")) for n in trainable)
        assert any(n.startswith("backbone.transformer_blocks.0") for n in trainable)


@pytest.fixture(scope="module")
def flow_judges(mini_world, sd3, tmp_path_factory):
    """A pixel SPM and a latent judge trained on the tiny SD3 pipeline's inputs."""
    root = tmp_path_factory.mktemp("flow_judges")
    base = f"base_model={sd3}"
    assert main(judge_training_args(mini_world, root / "spm", base)) == 0
    latent = judge_training_args(
        mini_world, root / "latent", base, "latent.projection_dim=8", config="latent_judge.yaml"
    )
    assert main(latent) == 0
    return root / "spm" / "final", root / "latent" / "final"


def test_judges_trained_on_a_flow_model_record_it(flow_judges, sd3):
    pixel, latent = flow_judges
    for folder, name in ((pixel, "spm_config.json"), (latent, "latent_judge_config.json")):
        trained_on = json.loads((folder / name).read_text())["trained_on"]
        assert trained_on["family"] == "sd3" and trained_on["resolution"] == 32
    assert isinstance(preference_model.load(latent), preference_model.TransformerJudge)


def _flow_spo(world, sd3, judge, out, *extra, config="spo_flow.yaml"):
    return spo_args(world, judge, out, SD3_TARGETS, *extra, config=config, base=sd3)


@pytest.mark.parametrize("judge", ["pixel", "latent"])
def test_flow_spo_trains_the_lora(mini_world, sd3, flow_judges, tmp_path, judge):
    folder = flow_judges[0] if judge == "pixel" else flow_judges[1]
    config = "spo_flow.yaml" if judge == "pixel" else "spo_flow_latent.yaml"
    assert main(_flow_spo(mini_world, sd3, folder, tmp_path / "run", config=config)) == 0
    final = tmp_path / "run/final"
    summary = json.loads((final / "train_summary.json").read_text())
    assert summary["family"] == "sd3" and summary["step"] > 0
    assert "flow SDE steps (noise level 0.7)" in (final / "README.md").read_text()
    lora = load_file(final / "pytorch_lora_weights.safetensors")
    up = [v for k, v in lora.items() if "lora_B" in k]
    assert up and all(v.abs().sum() > 0 for v in up)  # trained away from its zero start


def test_flow_spo_resumes_exactly(mini_world, sd3, flow_judges, tmp_path):
    def run(out):
        return main(_flow_spo(mini_world, sd3, flow_judges[0], out, "max_epochs=3"))

    assert_resume_is_exact(run, tmp_path / "a", tmp_path / "b", "pytorch_lora_weights.safetensors")


def test_a_judge_of_another_family_is_one_line_before_any_model_loads(
    mini_world, sd3, flow_judges, tmp_path, capsys, monkeypatch
):
    unet_spm = tmp_path / "unet_spm"  # an SPM as trained on the mini world's SD model
    shutil.copytree(flow_judges[0], unet_spm)
    config = json.loads((unet_spm / "spm_config.json").read_text())
    config["trained_on"] = {"source": "sd", "family": "sd", "resolution": 32, "latent_channels": 4}
    (unet_spm / "spm_config.json").write_text(json.dumps(config))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionModel, "from_pretrained", no_loading)
    cases = [
        # a UNet SPM for a flow policy
        _flow_spo(mini_world, sd3, unet_spm, tmp_path / "a"),
        # a flow judge for a UNet policy
        spo_args(mini_world, flow_judges[0], tmp_path / "b"),
        # the flow latent judge for a UNet policy
        spo_args(mini_world, flow_judges[1], tmp_path / "c", config="spo_latent.yaml"),
    ]
    for args in cases:
        capsys.readouterr()
        assert main(args) == 2
        line = one_error_line(capsys)
        assert "trained on a" in line and "same model family" in line
    assert not any((tmp_path / name).exists() for name in "abc")

"""Diffusion-DPO on a flow-matching model (issue 22 item 3), on the tiny SD3 pipeline: the
noisy input and target are rectified flow's (x_s = (1 - s) x0 + s eps, u = eps - x0, the
transformer given 1000 s), the loss is the same DPO loss on the velocity, the LoRA loads in
stock diffusers and in peft and changes the images, full fine-tuning writes a `transformer/`
folder, and a killed run resumes to the same weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_resume_is_exact, dpo_args
from tiny_pipelines import build_tiny_flux, build_tiny_sd3

from spo.cli import main
from spo.commands.train_dpo import dpo_inputs
from spo.models import DiffusionModel


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


def test_flow_inputs_are_the_rectified_flow_interpolation_and_velocity(sd3):
    model = DiffusionModel.from_pretrained(str(sd3))
    pixels = torch.rand(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    empty = model.empty_text(1)
    gen = torch.Generator().manual_seed(7)
    inputs = dpo_inputs(
        model, pixels, ["a", "b", "c"], generator=gen, prompt_dropout=0.0, empty=empty
    )
    # the same draws by hand, in the recipe's order: latents, noise, the noise levels
    gen = torch.Generator().manual_seed(7)
    latents = model.encode_images(torch.cat([pixels[:, 0], pixels[:, 1]]), generator=gen)
    noise = torch.randn((3, *latents.shape[1:]), generator=gen).repeat(2, 1, 1, 1)
    s = torch.sigmoid(torch.randn(3, generator=gen))  # logit-normal (0, 1)
    shift = model.scheduler.config.shift
    s = (shift * s / (1 + (shift - 1) * s)).repeat(2)
    assert torch.allclose(inputs.t, 1000 * s, atol=1e-4)
    x_s = (1 - s.view(-1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1) * noise
    assert torch.allclose(inputs.x_t, x_s, atol=1e-5)
    assert torch.allclose(inputs.target, noise - latents, atol=1e-6)
    assert torch.equal(inputs.t[:3], inputs.t[3:])  # a pair shares its noise level


def _args(sd3, world, out, *extra):
    return dpo_args(world, out, f"base_model={sd3}", "beta=100", *extra)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.mark.parametrize(
    ("family", "pipeline_class", "extra"),
    [
        ("sd3", "StableDiffusion3Pipeline", ()),
        # FLUX's native 1024 px is too large for a CPU test: trained and sampled at 32
        ("flux", "FluxPipeline", ("resolution=32", "model_family=flux")),
    ],
)
def test_flow_lora_loads_in_stock_diffusers_and_peft_and_changes_images(
    family, pipeline_class, extra, request, mini_world, tmp_path
):
    pipe_dir = request.getfixturevalue(family)
    out = tmp_path / "dpo"
    # the real flow configs' targets: the joint attention's image and text projections
    targets = "policy.lora_targets=[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj]"
    assert main(_args(pipe_dir, mini_world, out, "optim.lr=0.05", targets, *extra)) == 0
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["family"] == family and summary["step"] == 4
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import {pipeline_class} as Pipeline
        from peft import PeftModel
        def sample(pipe):
            g = torch.Generator().manual_seed(0)
            return pipe(["a red circle"], num_inference_steps=3, generator=g, height=32,
                        width=32, output_type="np").images
        pipe = Pipeline.from_pretrained({str(pipe_dir)!r})
        before = sample(pipe)
        pipe.load_lora_weights({str(out / "final")!r})
        lora_params = sum(1 for n, _ in pipe.transformer.named_parameters() if "lora_" in n)
        from safetensors import safe_open
        with safe_open({str(out / "final/pytorch_lora_weights.safetensors")!r}, "pt") as f:
            assert lora_params == len(list(f.keys())), (lora_params, len(list(f.keys())))
        after = sample(pipe)
        other = Pipeline.from_pretrained({str(pipe_dir)!r})
        PeftModel.from_pretrained(other.transformer, {str(out / "final")!r})
        with_peft = sample(other)
        assert "spo" not in sys.modules
        print(lora_params, float(abs(after - before).max()), float(abs(after - with_peft).max()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    lora_params, change, peft_gap = res.stdout.split()[-3:]
    assert int(lora_params) > 0 and float(change) > 1e-3 and float(peft_gap) < 1e-5


def test_flow_full_fine_tune_writes_a_transformer_folder(sd3, mini_world, tmp_path):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "full"
    assert main(_args(sd3, mini_world, out, "policy.mode=full", "max_steps=2")) == 0
    trained = SD3Transformer2DModel.from_pretrained(out / "final/transformer")
    base = SD3Transformer2DModel.from_pretrained(sd3 / "transformer")
    assert any(not torch.equal(p, base.get_parameter(n)) for n, p in trained.named_parameters())
    card = (out / "final/README.md").read_text()
    assert "SD3Transformer2DModel.from_pretrained(" in card and 'subfolder="transformer"' in card


def test_a_killed_flow_run_resumes_to_the_same_weights(sd3, mini_world, tmp_path):
    def run(out):
        return main(_args(sd3, mini_world, out))

    assert_resume_is_exact(
        run, tmp_path / "straight", tmp_path / "killed", "pytorch_lora_weights.safetensors"
    )


def test_flow_sft_regresses_the_winners_velocity(sd3, mini_world, tmp_path):
    """loss=sft on a flow model: the plain velocity MSE on the winners, no reference."""
    from spo.losses import sft_loss

    model = DiffusionModel.from_pretrained(str(sd3))
    pixels = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    inputs = dpo_inputs(
        model,
        pixels,
        ["a", "b"],
        generator=torch.Generator().manual_seed(0),
        prompt_dropout=0.0,
        empty=model.empty_text(1),
    )
    pred = model.unet_forward(model.unet, inputs.x_t, inputs.t, inputs.text)
    winners = (pred[:2] - inputs.target[:2]).pow(2).mean()
    assert torch.allclose(sft_loss(pred, inputs.target), winners)
    out = tmp_path / "sft"
    assert main(_args(sd3, mini_world, out, "loss=sft", "max_steps=2")) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)

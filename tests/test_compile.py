"""`speed.compile` (issue 26 item 2): the trained denoiser compiled in place, regionally (its
family's repeated blocks) or whole, gives the eager outputs and LoRA gradients within float
tolerance on the tiny presets (a UNet and an SD3 transformer), for the policy and for the
reference (the same module with its adapters disabled), and keeps its parameter names (so
checkpoints and saved adapters do not change)."""

from __future__ import annotations

import pytest
import torch

from spo.architectures import build_pipeline
from spo.config import PolicyConfig
from spo.models import DiffusionModel
from spo.policy import Policy

# inductor's fused kernels reorder float32 sums: differences of a few 1e-6 on outputs of ~1
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def _policy(preset: str) -> Policy:
    torch.manual_seed(0)
    model = DiffusionModel.from_pipeline(build_pipeline(preset, "cpu", torch.float32))
    with torch.no_grad():  # random weights everywhere (SD3's output layer starts at zero)
        for p in model.unet.parameters():
            p.normal_(0.0, 0.05)
    policy = Policy(model, PolicyConfig(lora_rank=2))
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, p in policy.unet.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    return policy


def _outputs(policy: Policy) -> list[torch.Tensor]:
    """The policy's prediction, its adapters' gradient of a loss on it, and the reference's
    prediction, on fixed inputs."""
    model = policy.model
    gen = torch.Generator().manual_seed(1)
    size = model.resolution // model.vae_scale_factor
    x = torch.randn(2, model.latent_channels, size, size, generator=gen)
    t = torch.tensor([900, 250])
    text = model.encode_text(["a red ball", "a blue cube"])
    params = policy.trainable_parameters()
    pred = model.unet_forward(policy.unet, x, t, text)
    grads = torch.autograd.grad(pred.square().mean(), params)
    with policy.reference() as reference:
        ref = model.unet_forward(reference, x, t, text)
    return [pred.detach(), *grads, ref]


@pytest.mark.parametrize(
    ("preset", "mode", "blocks"),
    [
        ("tiny", "regional", {"BasicTransformerBlock"}),
        pytest.param("tiny", "full", None, marks=pytest.mark.slow),
        pytest.param("tiny_flow", "regional", {"JointTransformerBlock"}, marks=pytest.mark.slow),
        pytest.param("tiny_flow", "full", None, marks=pytest.mark.slow),
    ],
)
def test_compiled_denoiser_matches_eager(preset, mode, blocks):
    policy = _policy(preset)
    names = [name for name, _ in policy.unet.named_parameters()]
    eager = _outputs(policy)
    count = policy.compile(mode)
    if blocks is None:
        assert count == 1
    else:
        instances = [m for m in policy.unet.modules() if type(m).__name__ in blocks]
        assert count == len(instances) > 1
        assert all(m._compiled_call_impl is not None for m in instances)
    assert [name for name, _ in policy.unet.named_parameters()] == names
    compiled = _outputs(policy)
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)
    # the reference is not the policy: a test whose adapters did nothing could not fail
    assert (eager[0] - eager[-1]).abs().max() > 1e-3


def test_compile_none_leaves_the_denoiser_eager():
    policy = _policy("tiny")
    assert policy.compile("none") == 0
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in policy.unet.modules())

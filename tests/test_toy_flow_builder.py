"""scripts/build_toy_flow_model.py at tiny scale: what it exports is a StableDiffusion3Pipeline
folder that a plain `from_pretrained` loads and samples from, its training shortcut for the zero
T5 tokens computes what that pipeline computes, and a killed transformer stage resumes.

A few optimisation steps only: the quality of the real build is measured by its sample check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_script
from safetensors import safe_open

from spo.toy.flow_base_model import TRANSFORMER_CONFIG

pytestmark = pytest.mark.usefixtures("one_torch_thread")

flow = load_script("build_toy_flow_model")
PROMPTS = ["a red circle on a teal background", "a blue cross on a white background"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent bank of 24 renders, built in two chunks."""
    work = tmp_path_factory.mktemp("bank")
    flow.build_latents(work, flow.BASE_DIR, n=24, chunk=16)
    return work / "latents.pt"


def new_work(tmp_path: Path, bank: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(bank, work / "latents.pt")
    return work


def train(work: Path, max_steps: int) -> int:
    return flow.train_transformer(
        work, flow.BASE_DIR, minutes=10.0, batch=4, max_steps=max_steps, save_every=0.0,
        eval_every=0.0, final_check=False,
    )  # fmt: skip


def test_latent_bank(bank: Path) -> None:
    data = torch.load(bank)
    assert data["mean"].shape == data["std"].shape == (24, *flow.LATENT)
    assert len(data["texts"]) == 24
    assert not (bank.parent / "latents_part.pt").exists()


def test_exported_folder_loads_with_plain_diffusers(tmp_path: Path, bank: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    work, out = new_work(tmp_path, bank), tmp_path / "pipe"
    assert train(work, max_steps=2) == 2
    flow.export(work, flow.BASE_DIR, out, check=False)
    with safe_open(out / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}

    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    assert n_params == flow.TRANSFORMER_PARAMETERS
    assert n_params == sum(p.numel() for p in flow.new_transformer().parameters())
    assert {k: pipe.transformer.config[k] for k in TRANSFORMER_CONFIG} == TRANSFORMER_CONFIG
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.scheduler.config.shift == flow.DEFAULT_SHIFT

    images = pipe(
        PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (2, 64, 64, 3)
    assert images.min() >= 0 and images.max() <= 1

    # After two steps the transformer is still near its zero start (zero velocity), which would
    # hide any mismatch: give it random weights, then the script's sampler (one zero T5 token
    # with log 256 added to its logit) must match the plain pipeline's 256 zero T5 tokens.
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer)
    shift = pipe.scheduler.config.shift
    plain = pipe(
        PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    ours = flow.sample_latents(*modules, PROMPTS, seed=0, steps=2, cfg=2.0, shift=shift)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    # and the check can tell: one zero T5 token instead of 256 gives other latents
    one = flow.sample_latents(*modules, PROMPTS, seed=0, steps=2, cfg=2.0, shift=shift, t5_tokens=1)
    assert (one - plain).abs().max() > 1e-2
    short = pipe(
        PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
        generator=torch.Generator().manual_seed(0), max_sequence_length=1,
    ).images  # fmt: skip
    torch.testing.assert_close(one, short, atol=1e-4, rtol=1e-4)


class Killed(Exception):
    pass


def test_killed_transformer_stage_resumes_from_its_save(
    tmp_path: Path, bank: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = new_work(tmp_path, bank)
    ckpt = work / "transformer.pt"
    real_save, saves = flow.atomic_save, []

    def save_then_die_at_the_second(obj, path: Path) -> None:
        real_save(obj, path)
        if path == ckpt:
            saves.append(obj["step"])
            if len(saves) == 2:
                raise Killed

    monkeypatch.setattr(flow, "atomic_save", save_then_die_at_the_second)
    with pytest.raises(Killed):
        train(work, max_steps=5)
    monkeypatch.undo()
    killed = torch.load(ckpt)
    assert saves == [1, 2] and killed["step"] == 2

    assert train(work, max_steps=4) == 2  # steps 3 and 4 only
    state = torch.load(ckpt)
    assert state["step"] == 4
    assert state["elapsed"] > killed["elapsed"]
    # the optimiser went on from its saved state (AdamW counts its own steps)
    assert {float(s["step"]) for s in state["opt"]["state"].values()} == {4.0}
    # the EMA went on too: it differs from the killed run's and from the weights
    ema, weights = state["ema_transformer"], state["transformer"]
    assert any(not torch.equal(ema[k], killed["ema_transformer"][k]) for k in ema)
    assert any(not torch.equal(ema[k], weights[k]) for k in ema)

"""DeepSpeed ZeRO through accelerate in two real CPU processes, launched with the shipped
accelerate config files: a ZeRO-3 full fine-tune (its weights split over the ranks) trains,
checkpoints every rank's partition and writes a final/ that stock diffusers loads (CI); killed,
it resumes to the weights of the uninterrupted run, and ZeRO-2 and ZeRO-3 train the weights
two plain DDP processes train (slow). accelerate starts DeepSpeed only off the CPU path, so
tests/faults gives it gloo on CPU processes (DeepSpeed's CPU accelerator); the shipped configs
are used as they are."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    ROOT,
    assert_flux_lora_applies,
    assert_trained_unet_saved,
    dpo_args,
    launches_resume_exactly,
    one_error_line,
    spo_args,
    torchrun,
)
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_flux

from spo.cli import main

pytest.importorskip("deepspeed")  # the dev install has it ('spo-diffusion[dev]')

CONFIGS = ROOT / "configs/accelerate"
ZERO2, ZERO3 = CONFIGS / "deepspeed_zero2.yaml", CONFIGS / "deepspeed_zero3.yaml"
UNET = "unet/diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"


def test_zero3_full_dpo_checkpoints_partitions_and_saves_for_diffusers(mini_world, tmp_path):
    """The short version CI runs (the kill and resume is slow): one ZeRO-3 full fine-tune
    checkpoints each rank's partition and writes a whole, trained `unet/` for diffusers."""
    done = torchrun(
        dpo_args(mini_world, tmp_path / "a", "policy.mode=full"), accelerate_config=ZERO3
    )
    assert done.returncode == 0, done.stderr[-3000:]
    step = tmp_path / "a/checkpoints/step-2"
    partitions = sorted(p.name for p in step.rglob("*model_states.pt"))
    assert partitions == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]

    assert_trained_unet_saved(mini_world, tmp_path / "a/final")


@pytest.mark.slow
def test_zero3_full_dpo_resumes_to_the_same_weights(mini_world, tmp_path):
    args = lambda out: dpo_args(mini_world, out, "policy.mode=full")  # noqa: E731
    launches_resume_exactly(args, tmp_path, UNET, accelerate_config=ZERO3)


@pytest.mark.slow
def test_zero2_and_zero3_full_dpo_train_the_weights_of_plain_processes(mini_world, tmp_path):
    """ZeRO averages gradients by its own reductions where DDP all-reduces: the same run's
    weights agree to float rounding, with either stage."""
    args = lambda out: dpo_args(mini_world, out, "policy.mode=full")  # noqa: E731
    runs = {"zero2": ZERO2, "zero3": ZERO3, "ddp": None}
    for name, config in runs.items():
        done = torchrun(args(tmp_path / name), accelerate_config=config)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_file(tmp_path / "ddp/final" / UNET)
    for name in ("zero2", "zero3"):
        weights = load_file(tmp_path / name / "final" / UNET)
        assert weights.keys() == ddp.keys()
        assert max((weights[n] - ddp[n]).abs().max().item() for n in ddp) <= 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("config", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_a_bf16_engine_saves_its_float32_masters(mini_world, tmp_path, config):
    """With bf16 in DeepSpeed's config the engine computes with 16-bit weights and its
    optimizer keeps float32 masters: final/ holds the masters (what was trained), not the
    bf16 copies."""
    args = dpo_args(mini_world, tmp_path / "r", "mixed_precision=bf16", "optim.lr=1e-3")
    done = torchrun(args, accelerate_config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    adapters = load_file(tmp_path / "r/final/adapter_model.safetensors")  # peft's names
    trained = [v for n, v in adapters.items() if "lora_B" in n]
    assert trained and any(v.abs().max() > 0 for v in trained)
    assert all(v.dtype == torch.float32 for v in adapters.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in trained)


@pytest.mark.slow
def test_zero3_flux_lora_resumes_and_saves_what_diffusers_loads(mini_world, tmp_path):
    """LoRA on the tiny FLUX, its frozen transformer split by ZeRO-3: killed and resumed to
    the uninterrupted run's adapters, which FluxPipeline.load_lora_weights applies."""
    flux = build_tiny_flux(tmp_path / "flux")
    args = lambda out: dpo_args(mini_world, out, f"base_model={flux}", "beta=100")  # noqa: E731
    a = launches_resume_exactly(args, tmp_path, LORA, accelerate_config=ZERO3)
    assert any(v.abs().max() > 0 for n, v in a.items() if "lora_B" in n)  # it trained
    assert_flux_lora_applies(flux, tmp_path / "a/final")


@pytest.mark.slow
def test_zero3_spo_samples_together_and_resumes_to_the_same_adapters(
    mini_world, judge, four_prompts, tmp_path
):
    """SPO under ZeRO-3: every sampling step's forward needs both ranks (each samples its own
    prompts), and accumulation over 2 micro-batches is DeepSpeed's; killed after a checkpoint,
    the run resumes to bitwise the uninterrupted run's adapters."""
    extra = (f"prompts={four_prompts}", "checkpoint_every=1", "gradient_accumulation_steps=2")
    args = lambda out: spo_args(mini_world, judge, out, *extra)  # noqa: E731
    a = launches_resume_exactly(args, tmp_path, LORA, accelerate_config=ZERO3)
    assert any(v.abs().max() > 0 for n, v in a.items() if "lora.up" in n or "lora_B" in n)


@pytest.mark.parametrize(("config", "stage"), [(ZERO2, 2), (ZERO3, 3)])
def test_the_shipped_deepspeed_configs_ask_for_their_stage(config, stage):
    """As accelerate reads them: DeepSpeed, the stage, ZeRO-3 gathering its 16-bit weights to
    save (final/ needs them), and no accumulation or clipping of their own (the run's config
    decides those)."""
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type == "DEEPSPEED"
    ds = loaded.deepspeed_config
    assert ds["zero_stage"] == stage
    assert ds.get("zero3_save_16bit_model", False) == (stage == 3)
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds


def test_a_deepspeed_file_that_overrides_the_runs_accumulation_is_refused(
    mini_world, tmp_path, monkeypatch, capsys
):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert main(dpo_args(mini_world, tmp_path / "d")) == 2
    line = one_error_line(capsys)
    assert "gradient_accumulation_steps=4" in line and "says 1" in line
    assert not (tmp_path / "d").exists()

"""Sharded training (FSDP2 through accelerate) in two real CPU processes, launched with the
shipped accelerate config files: a full fine-tune trains, checkpoints every rank's shard, is
killed, resumes to the weights of the uninterrupted run, and writes a final/ that stock
diffusers loads, with the weights two unsharded processes train. accelerate enables FSDP only
on accelerator devices, so tests/faults switches it on for CPU processes (torch's FSDP2 runs
over gloo); the shipped configs are otherwise used as they are."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ROOT,
    assert_flux_lora_applies,
    assert_trained_unet_saved,
    dpo_args,
    launches_resume_exactly,
    one_error_line,
    torchrun,
)
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_flux

from spo.cli import main

CONFIGS = ROOT / "configs/accelerate"
UNET = "unet/diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"


def test_sharded_full_dpo_resumes_to_the_same_weights_and_saves_for_diffusers(mini_world, tmp_path):
    fsdp = CONFIGS / "fsdp_sdxl_full.yaml"  # the tiny UNet has SDXL's block classes
    args = lambda out: dpo_args(mini_world, out, "policy.mode=full")  # noqa: E731
    launches_resume_exactly(args, tmp_path, UNET, accelerate_config=fsdp)
    shards = sorted(p.name for p in (tmp_path / "a/checkpoints/step-2").rglob("*.distcp"))
    assert shards == ["__0_0.distcp", "__0_0.distcp", "__1_0.distcp", "__1_0.distcp"]
    assert_trained_unet_saved(mini_world, tmp_path / "a/final")


@pytest.mark.slow
def test_sharded_full_dpo_trains_the_weights_of_unsharded_processes(mini_world, tmp_path):
    """FSDP averages gradients by reduce-scatter where DDP all-reduces: the same run's
    weights agree to float rounding."""
    args = lambda out: dpo_args(mini_world, out, "policy.mode=full")  # noqa: E731
    sharded = torchrun(args(tmp_path / "fsdp"), accelerate_config=CONFIGS / "fsdp_sdxl_full.yaml")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    unsharded = torchrun(args(tmp_path / "ddp"))
    assert unsharded.returncode == 0, unsharded.stderr[-3000:]
    a, b = (load_file(tmp_path / run / "final" / UNET) for run in ("fsdp", "ddp"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


@pytest.mark.slow
def test_sharded_flux_lora_resumes_and_saves_what_diffusers_loads(mini_world, tmp_path):
    """LoRA on the tiny FLUX, its frozen transformer sharded: killed and resumed to the
    uninterrupted run's adapters, which FluxPipeline.load_lora_weights applies."""
    flux = build_tiny_flux(tmp_path / "flux")
    fsdp = CONFIGS / "fsdp_flux_lora.yaml"
    args = lambda out: dpo_args(mini_world, out, f"base_model={flux}", "beta=100")  # noqa: E731
    a = launches_resume_exactly(args, tmp_path, LORA, accelerate_config=fsdp)
    assert any(v.abs().max() > 0 for n, v in a.items() if "lora_B" in n)  # it trained
    assert_flux_lora_applies(flux, tmp_path / "a/final")


CONFIG_PRESETS = [
    ("fsdp_sdxl_full.yaml", "sdxl"),
    ("fsdp_sd35_full.yaml", "sd35m"),
    ("fsdp_flux_lora.yaml", "flux"),
]


@pytest.mark.parametrize(("name", "preset"), CONFIG_PRESETS)
def test_the_shipped_accelerate_configs_wrap_blocks_their_model_has(name, preset):
    """Each config loads as accelerate reads it, asks for FSDP2, and wraps blocks that the
    real-size denoiser it is for has (a misspelt class would stop accelerate only on the
    GPUs); built on the meta device, without memory."""
    from accelerate.commands.config.config_args import load_config_from_file

    from spo.architectures import build_pipeline
    from spo.families import family_of

    shipped = sorted(p.name for p in CONFIGS.glob("fsdp_*.yaml"))
    assert shipped == sorted(n for n, _ in CONFIG_PRESETS)
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    pipe = build_pipeline(preset, "meta", torch.bfloat16)
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    present = {type(m).__name__ for m in denoiser.modules()}
    for cls in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert cls in present, cls


@pytest.mark.parametrize(("flag", "engine"), [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")])
def test_the_judges_trainer_refuses_a_sharded_launch(
    mini_world, tmp_path, monkeypatch, capsys, flag, engine
):
    from helpers import judge_training_args

    monkeypatch.setenv(f"ACCELERATE_USE_{flag}", "true")
    assert main(judge_training_args(mini_world, tmp_path / "j")) == 2
    assert f"does not run sharded ({engine})" in one_error_line(capsys)
    assert not (tmp_path / "j").exists()

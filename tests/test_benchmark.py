"""`spo benchmark` on the tiny preset: a smoke run of every piece (not timed), ours against
the released structure with equal log-probabilities, and bad input before any model loads."""

from __future__ import annotations

import json
import math

from helpers import one_error_line

from spo.cli import main


def test_tiny_benchmark_against_the_released_structure(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "--preset", "tiny", "--baseline", "released", "--out", str(out)]
    small = ["prompts=2", "num_steps=6", "repeats=1", "dpo_modes=[lora, full]", "dpo_full_batch=1"]
    assert main([*args, *small, "dpo_lora_batch=2"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    ours, base = result["variants"]["ours"], result["variants"]["baseline"]
    assert result["logp_max_abs_diff"] < 1e-5  # the shared x_t changes no log-probability
    assert ours["kept_checksum"] == base["kept_checksum"]  # the same pairs kept
    for figures in (ours, base):
        assert figures["pairs"] == 2 * 5  # threshold 0: one pair per trained step and prompt
        phases = figures["pass_unet_s"] + figures["pass_decode_s"] + figures["pass_judge_s"]
        assert 0 < phases <= figures["pass_s"] * 1.05
        assert figures["train_steps"] == 1 and figures["step_s"] > 0
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    latent = result["latent_judge_pass"]
    assert latent["pass_decode_s"] == 0 and latent["pairs"] == ours["pairs"]
    assert set(result["dpo"]) == {"lora", "full"}
    assert all(d["ratio"] > 0 for d in result["dpo"].values())
    judge = result["judge_half_precision"]
    assert judge["decisions"] == 2 * 5 and 0 <= judge["flipped_share"] <= 1
    assert result["flops"]["unet"]["gflop_per_item"] > 0
    table = (out / "benchmark.md").read_text()
    assert "baseline / ours" in table and "training step" in table
    assert table in capsys.readouterr().out


def test_unknown_preset_is_one_line(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", "--preset", "sd3", "--out", str(out)]) == 2
    assert "'preset'" in one_error_line(capsys)
    assert not out.exists()


def test_real_architectures_have_the_published_sizes():
    """method.md 5's architectures, built on the meta device (no memory, no weights)."""
    import torch

    from spo.architectures import build_pipeline, build_spm

    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    sd15 = build_pipeline("sd15", "meta", torch.float32)
    assert round(millions(sd15.unet)) == 860 and round(millions(sd15.vae)) == 84
    assert round(millions(sd15.text_encoder)) == 123  # CLIP ViT-L/14's text tower
    sdxl = build_pipeline("sdxl", "meta", torch.float32)
    assert round(millions(sdxl.unet) / 100) == 26  # 2.6B
    assert round(millions(sdxl.text_encoder_2)) == 695  # OpenCLIP ViT-bigG/14's text tower
    assert round(millions(build_spm("sd15", "meta")) / 100) == 13  # PickScore, 1.3B
    # the toy presets are judged by the toy SPM's architecture, not PickScore's
    toy_spm = millions(build_spm("tiny", "meta"))
    assert toy_spm < 50 and millions(build_spm("tiny_flow", "meta")) == toy_spm


def test_flow_architectures_have_the_published_sizes():
    """SPEC 8's transformers (diffusers 0.42), their 16-channel VAE and the toy flow model,
    built on the meta device."""
    import torch

    from spo.architectures import build_pipeline
    from spo.toy.flow_base_model import TRANSFORMER_CONFIG

    def billions(module):
        return sum(p.numel() for p in module.parameters()) / 1e9

    sd35m = build_pipeline("sd35m", "meta", torch.float32)
    assert round(billions(sd35m.transformer), 2) == 2.24
    assert sd35m.vae.config.latent_channels == 16 and sd35m.vae.config.shift_factor == 0.0609
    assert sd35m.text_encoder_3 is None  # run without T5, as its pipeline allows
    flux = build_pipeline("flux", "meta", torch.float32)
    assert round(billions(flux.transformer), 2) == 11.90
    assert flux.transformer.config.guidance_embeds and flux.transformer.config.in_channels == 64
    assert flux.vae.config.scaling_factor == 0.3611
    tiny = build_pipeline("tiny_flow", "meta", torch.float32)
    assert {k: tiny.transformer.config[k] for k in TRANSFORMER_CONFIG} == TRANSFORMER_CONFIG


def test_tiny_flow_benchmark_times_spo_with_both_judges_against_the_released_structure(
    tmp_path, capsys
):
    out = tmp_path / "bench"
    args = ["benchmark", "--preset", "tiny_flow", "--baseline", "released", "--out", str(out)]
    small = ["prompts=2", "num_steps=3", "repeats=1", "dpo_modes=[lora]", "dpo_lora_batch=2"]
    assert main([*args, *small]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert result["family"] == "sd3" and result["resolution"] == 64
    assert result["denoiser_parameters"] == 3_481_604
    ours, base = result["variants"]["ours"], result["variants"]["baseline"]
    assert result["logp_max_abs_diff"] < 1e-5  # the shared x_s changes no log-probability
    assert ours["kept_checksum"] == base["kept_checksum"] and ours["pairs"] == 2 * 2
    assert ours["step_s"] > 0 and all(v > 0 for v in result["ratios"].values())
    latent = result["latent_judge_pass"]
    assert latent["pass_decode_s"] == 0 and latent["pairs"] == ours["pairs"]
    assert 0 < result["latent_judge_parameters"] < result["denoiser_parameters"]
    p = result["ode_pass"]
    assert 0 < p["pass_denoiser_s"] + p["pass_decode_s"] <= p["pass_s"] * 1.05
    assert result["dpo"]["lora"]["ratio"] > 0 and result["flops"]["unet"]["gflop_per_item"] > 0
    table = (out / "benchmark.md").read_text()
    assert "baseline / ours" in table and "Euler ODE" in table and "latent judge" in table
    assert table in capsys.readouterr().out

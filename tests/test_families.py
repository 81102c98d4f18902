"""Model families are modules behind `DiffusionModel` (issue 22 item 1): a pipeline's family is
found from its class (also from a folder's model_index.json, before any weight loads), and a
family added to `spo.families.FAMILIES` alone, no recipe touched, is what `DiffusionModel` and
so every recipe uses."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

from spo import families
from spo.families import Family, TextConditioning, family_for_pipeline, family_of
from spo.models import DiffusionModel, describe_pipeline_folder

ROOT = Path(__file__).parents[1]


def test_families_are_found_from_the_pipeline_class_and_the_folder(tmp_path):
    assert family_for_pipeline("StableDiffusionPipeline") == "sd"
    assert family_for_pipeline("StableDiffusionXLPipeline") == "sdxl"
    assert family_for_pipeline("FrobnicatePipeline") is None
    build_tiny_sd(tmp_path / "sd")
    build_tiny_sdxl(tmp_path / "xl")
    assert describe_pipeline_folder(str(tmp_path / "sd"))["family"] == "sd"
    assert describe_pipeline_folder(str(tmp_path / "xl"))["family"] == "sdxl"
    model = DiffusionModel.from_pretrained(str(tmp_path / "xl"))
    assert model.family == "sdxl" and model.describe() == describe_pipeline_folder(
        str(tmp_path / "xl")
    )


class ShoutingPipeline(StableDiffusionPipeline):
    """A pipeline class no built-in family names."""


class ShoutingFamily(Family):
    """A family that doubles the text conditioning and hands the denoiser an extra input."""

    name = "shouting"
    pipelines = ("ShoutingPipeline",)
    hub_tag = "shouting"
    calls: list[str] = []

    def encode(self, prompts, device) -> TextConditioning:
        hidden, _ = self.pipe.encode_prompt(list(prompts), device, 1, False)
        return TextConditioning(2 * hidden)

    def denoiser_kwargs(self, latents, text, resolution):
        self.calls.append(f"kwargs at {resolution}")
        return {"cross_attention_kwargs": {"scale": 1.0}}


def test_a_family_added_to_the_registry_alone_is_used_by_the_model(tmp_path, monkeypatch):
    module = types.ModuleType("shouting_family")
    module.FAMILY = ShoutingFamily
    monkeypatch.setitem(sys.modules, "shouting_family", module)
    monkeypatch.setitem(families.FAMILIES, "shouting", "shouting_family")
    build_tiny_sd(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"))
    plain = DiffusionModel.from_pipeline(pipe)
    text = plain.encode_text(["a red circle"])
    pipe.__class__ = ShoutingPipeline
    model = DiffusionModel.from_pipeline(pipe)
    assert isinstance(family_of(pipe), ShoutingFamily) and model.family == "shouting"
    assert torch.equal(model.encode_text(["a red circle"]).hidden, 2 * text.hidden)
    latents = torch.zeros(1, 4, 8, 8)
    model.unet_forward(model.unet, latents, torch.tensor([10]), model.encode_text(["a"]))
    assert ShoutingFamily.calls == [f"kwargs at {model.resolution}"]


def test_no_code_outside_the_family_modules_asks_which_family_a_model_is():
    """`if family == ...` (or `.family == ...`) only in spo/families/."""
    offenders = []
    for path in sorted((ROOT / "spo").rglob("*.py")):
        if "families" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Constant) and side.value in families.FAMILIES
                for side in (node.left, *node.comparators)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_an_sd3_pipeline_is_the_sd3_family_behind_the_same_interface(tmp_path):
    """The tiny SD3 pipeline (SPEC 8) loads as a flow-family DiffusionModel: its text
    conditioning is the pipeline's own, the denoiser call is the transformer's, and generating
    gives the plain pipeline's images for the same seeds."""
    from diffusers import StableDiffusion3Pipeline
    from tiny_pipelines import build_tiny_sd3

    build_tiny_sd3(tmp_path / "sd3")
    model = DiffusionModel.from_pretrained(str(tmp_path / "sd3"))
    assert model.family == "sd3" and model.prediction_type == "flow"
    assert model.unet is model.pipe.transformer
    assert type(model.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert model.describe() == describe_pipeline_folder(str(tmp_path / "sd3"))
    assert model.describe()["latent_channels"] == 4 and model.resolution == 32

    prompts = ["a red circle", "a blue cross"]
    text = model.encode_text(prompts)
    # T5 at min(the pipeline's 256, the T5 tokenizer's model_max_length): the tiny one's 16
    assert model.family_module.t5_tokens == 16
    each = [
        model.pipe.encode_prompt(
            [p], None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
        for p in prompts
    ]
    hidden = torch.cat([e[0] for e in each])  # one prompt at a time, as DiffusionModel encodes
    pooled = torch.cat([e[2] for e in each])
    assert torch.equal(text.hidden, hidden) and torch.equal(text.pooled, pooled)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 250.0])
    ours = model.unet_forward(model.unet, latents, t, text)
    direct = model.pipe.transformer(
        hidden_states=latents, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled
    ).sample
    assert torch.equal(ours, direct)

    images = model.generate(["a red circle"], [3], num_inference_steps=3, guidance_scale=2.0)
    plain = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "sd3"))
    expected = plain(
        ["a red circle"],
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(3)],
        output_type="pt",
        max_sequence_length=16,
    ).images
    assert images.shape == (1, 3, 32, 32)
    assert torch.allclose(images, expected.clamp(0, 1), atol=1e-5)


def test_compare_mixes_families_in_one_report(mini_world, tmp_path):
    """An SD and an SD3 model on the same prompts and seeds, scored and reported together."""
    import json

    from helpers import compare_args
    from tiny_pipelines import build_tiny_sd3

    from spo.cli import main

    build_tiny_sd3(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue cross on a black background\n")
    models = [
        f"{{name: sd, pipeline: {mini_world / 'base_model'}}}",
        f"{{name: sd3, pipeline: {tmp_path / 'sd3'}}}",
    ]
    small = ("images_per_prompt=1", "num_inference_steps=2", "bootstrap=10", "grid_prompts=1")
    assert main(compare_args(tmp_path / "cmp", prompts, models, *small)) == 0
    results = json.loads((tmp_path / "cmp/results.json").read_text())
    assert set(results["scores"]) == {"sd", "sd3"}
    assert "sd3" in results["paired_differences"]["oracle"]
    assert len(list((tmp_path / "cmp/images/sd3").glob("*.png"))) == 2


def test_a_flux_pipeline_packs_its_latents_inside_the_family(tmp_path):
    """The tiny FLUX pipeline (SPEC 8) is the flux family: the recipes hand it unpacked latents
    and 1000 x the noise level; one Euler step from pure noise with its velocity is exactly the
    plain pipeline's one-step sample (packed, guidance 3.5, the same seed). Its training noise
    levels are shifted by e^mu of its image sequence length, as its sampler's are."""
    import math

    from diffusers import FluxPipeline
    from tiny_pipelines import build_tiny_flux

    from spo.families.flux import TRAINING_GUIDANCE
    from spo.flow import calculate_shift

    build_tiny_flux(tmp_path / "flux")
    model = DiffusionModel.from_pretrained(str(tmp_path / "flux"))
    assert model.family == "flux" and model.prediction_type == "flow"
    assert model.latent_channels == 4 and model.resolution == 128 * 2  # FLUX's 1024 / 8 x 2
    assert model.describe() == describe_pipeline_folder(str(tmp_path / "flux"))
    model.resolution = 32
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    text = model.encode_text(["a red circle"])
    # T5 at min(FLUX's 512, the T5 tokenizer's model_max_length): the tiny one's 16
    assert model.family_module.t5_tokens == 16
    assert text.hidden.shape == (1, 16, 32) and text.pooled.shape == (1, 32)
    v = model.unet_forward(model.unet, z, torch.tensor([1000.0]), text)
    assert v.shape == z.shape
    plain = FluxPipeline.from_pretrained(str(tmp_path / "flux"))
    out = plain(
        ["a red circle"],
        height=32,
        width=32,
        num_inference_steps=1,
        guidance_scale=TRAINING_GUIDANCE,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
        max_sequence_length=16,
    ).images
    assert torch.allclose(FluxPipeline._pack_latents(z - v, 1, 4, 16, 16), out, atol=1e-6)

    tokens = 8 * 8  # 16x16 latents packed 2x2
    assert math.isclose(model.family_module.flow_shift(16, 16), math.exp(calculate_shift(tokens)))
    static = types.SimpleNamespace(scheduler=types.SimpleNamespace(config={"shift": 3.0}))
    assert Family(static).flow_shift(16, 16) == 3.0

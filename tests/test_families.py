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

"""The editing task of `spo compare` (SDEdit): sources, fidelity, the comparison and its report,
every family's image-to-image pipeline, and the toy world's colour layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_pipelines import build_tiny_flux, build_tiny_sd3

from spo.cli import main
from spo.commands.toy_world import write_layouts
from spo.config.schemas import EditConfig
from spo.errors import ConfigError
from spo.evaluation.editing import block_colour_fidelity, load_edit_sources
from spo.models import DiffusionModel
from spo.toy.base_model import BASE_MODEL_DIR
from spo.toy.render import LAYOUT_BLOCK, SIZE, Prompt, colour_layout, split_prompts

ROOT = Path(__file__).parents[1]


def test_block_colour_fidelity_by_hand():
    source = torch.zeros(1, 3, 4, 4)
    edited = torch.zeros(1, 3, 4, 4)
    edited[0, 0, :2, :2] = 0.8  # the top-left block's red: 0.8 higher everywhere in it
    edited[0, 1, 2:, 2:] = torch.tensor([[0.4, 0.0], [0.0, 0.0]])  # bottom-right green: mean 0.1
    # 2 x 2 blocks: |differences| of the 12 (block, channel) means are 0.8, 0.1 and ten 0
    expected = 1 - (0.8 + 0.1) / 12
    assert block_colour_fidelity(edited, source, 2).item() == pytest.approx(expected)
    # one block: the whole image's mean colours, 0.2 red and 0.025 green apart
    assert block_colour_fidelity(edited, source, 1).item() == pytest.approx(1 - 0.225 / 3)
    assert block_colour_fidelity(source, source, 2).item() == 1.0


def test_colour_layouts_are_blocks_of_a_render():
    rng = np.random.default_rng(0)
    layout = colour_layout(Prompt("red", "circle", "white"), rng)
    assert layout.shape == (SIZE, SIZE, 3) and layout.dtype == np.uint8
    blocks = layout.reshape(SIZE // LAYOUT_BLOCK, LAYOUT_BLOCK, -1, LAYOUT_BLOCK, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # every block one colour
    # the object's colour is in it: some block is clearly red
    red = (layout[..., 0].astype(int) - layout[..., 1:].mean(axis=-1)) > 60
    assert red.any()


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sources_from_a_folder_in_name_order_and_from_a_table(tmp_path):
    folder = tmp_path / "layouts"
    folder.mkdir()
    (folder / "b.png").write_bytes(_png((0, 0, 255)))
    (folder / "a.png").write_bytes(_png((255, 0, 0)))
    (folder / "notes.md").write_text("not a source")
    (folder / "prompts.txt").write_text("first\nsecond\n")
    sources = load_edit_sources(EditConfig(sources=str(folder)), "caption", "train")
    assert sources.names == ["a.png", "b.png"] and sources.prompts == ["first", "second"]
    pixels = sources.pixels(16)
    assert pixels.shape == (2, 3, 16, 16)
    assert pixels[0, 0].min() == 1.0 and pixels[1, 2].min() == 1.0  # red, then blue

    (folder / "prompts.txt").write_text("only one\n")
    with pytest.raises(ConfigError, match="has 1 prompts for the 2 images"):
        load_edit_sources(EditConfig(sources=str(folder)), "caption", "train")

    table = tmp_path / "sources.parquet"
    rows = [
        {"image": _png((0, 255, 0)), "caption": "green"},
        {"image": _png((9, 9, 9)), "caption": "x"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), table)
    sources = load_edit_sources(EditConfig(sources=str(table)), "caption", "train")
    assert sources.prompts == ["green", "x"] and sources.pixels(8)[0, 1].min() == 1.0


def _edit_compare(out: Path, layouts: Path, *extra: str) -> list[str]:
    return [
        "compare",
        "--config",
        str(ROOT / "configs/toy/compare_edit.yaml"),
        "--out",
        str(out),
        f"edit.sources={layouts}",
        f"models=[{{name: base, pipeline: {BASE_MODEL_DIR}}}]",
        "scorers=[oracle]",
        "images_per_prompt=2",
        "num_inference_steps=10",
        "bootstrap=50",
        "grid_prompts=2",
        *extra,
    ]


def test_edit_comparison_scores_keeps_the_layout_at_low_strength_and_reports(tmp_path):
    world = tmp_path / "world"
    layouts = write_layouts(world, split_prompts()[1][:2], seed=0, per_prompt=1)
    assert (layouts / "prompts.txt").read_text().splitlines() == [
        p.text for p in split_prompts()[1][:2]
    ]
    fidelity = {}
    for strength in (0.2, 0.9):
        out = tmp_path / f"s{strength}"
        assert main(_edit_compare(out, layouts, f"edit.strength={strength}")) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["settings"]["task"] == "edit" and results["settings"]["strength"] == strength
        assert set(results["scores"]["base"]) == {"oracle", "fidelity"}
        scores = json.loads((out / "scores.json").read_text())["scores"]
        fidelity[strength] = np.array(scores["fidelity"]["base"])
        assert fidelity[strength].shape == (2, 2)
        # the sources are shown at the edited images' size beside the edits
        source = np.asarray(Image.open(out / "images/_source/p00001_s1.png"))
        assert (source == np.asarray(Image.open(layouts / "001.png"))).all()
        page = (out / "report.html").read_text()
        assert "Comparison: editing (SDEdit)" in page and "<th>source</th>" in page
    # the edits at 0.2 stay closer to their layouts than those at 0.9, image by image
    assert (fidelity[0.2] > fidelity[0.9]).all()
    assert fidelity[0.2].mean() > 0.9

    # the same strength again: the cached edits are kept, and the scores are the same
    out = tmp_path / "s0.2"
    before = (out / "images/base/p00000_s0.png").stat().st_mtime_ns
    assert main(_edit_compare(out, layouts, "edit.strength=0.2")) == 0
    assert (out / "images/base/p00000_s0.png").stat().st_mtime_ns == before
    again = json.loads((out / "scores.json").read_text())["scores"]["fidelity"]["base"]
    assert np.array(again).tolist() == fidelity[0.2].tolist()


@pytest.mark.parametrize("build", [build_tiny_sd3, build_tiny_flux], ids=["sd3", "flux"])
def test_flow_families_edit_with_their_image_to_image_pipelines(build, tmp_path):
    model = DiffusionModel.from_pretrained(str(build(tmp_path / "pipe")))
    model.resolution = 32
    sources = torch.rand(3, 3, 32, 32)
    texts = ["a red circle", "a blue square", "a red circle"]
    edits = model.edit(texts, sources, [5, 6, 5], strength=0.6, num_inference_steps=4)
    assert edits.shape == (3, 3, 32, 32) and 0 <= edits.min() and edits.max() <= 1
    # an edit depends on its prompt, source and seed only
    alone = model.edit(texts[2:], sources[2:], [5], strength=0.6, num_inference_steps=4)
    assert torch.allclose(alone[0], edits[2], atol=1e-5)
    other_source = model.edit(texts[:1], sources[1:2], [5], 0.6, num_inference_steps=4)
    assert not torch.allclose(other_source[0], edits[0], atol=1e-3)

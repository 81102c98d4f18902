"""Slow end-to-end tests run only with SPO_SLOW=1; CI runs the short versions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import judge_training_args
from tiny_pipelines import build_tiny_sd

from spo.cli import main
from spo.toy.annotator import labelled_pairs
from spo.toy.render import split_prompts

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SPO_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: set SPO_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _write_pairs(path: Path, prompts, n: int, seed: int) -> list[dict]:
    rows = list(labelled_pairs(prompts, n, 0.05, 0.03, np.random.default_rng(seed)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads; on a busy machine extra threads cost minutes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory) -> Path:
    """Toy pairs (48 train, 16 validation), a tiny SD pipeline and a tiny CLIP config."""
    root = tmp_path_factory.mktemp("mini_world")
    train, evaluation = split_prompts()
    _write_pairs(root / "pairs/train.parquet", train, 48, 0)
    _write_pairs(root / "pairs/validation.parquet", evaluation, 16, 1)
    build_tiny_sd(root / "base_model")
    (root / "clip.json").write_text(json.dumps(TINY_CLIP))
    return root


@pytest.fixture(scope="module")
def four_prompts(mini_world) -> Path:
    """Four eval-style prompts, one per shape (the 2-process SPO runs)."""
    path = mini_world / "four_prompts.txt"
    shapes = ("a red circle", "a blue cross", "a green square", "a yellow star")
    path.write_text("".join(f"{s} on a white background\n" for s in shapes))
    return path


@pytest.fixture(scope="module")
def judge(mini_world, tmp_path_factory) -> Path:
    """A pixel SPM trained 2 steps on the mini world (the 2-process SPO runs' judge)."""
    out = tmp_path_factory.mktemp("judge")
    assert main(judge_training_args(mini_world, out, "max_steps=2")) == 0
    return out / "final"

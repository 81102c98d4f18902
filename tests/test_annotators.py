"""Group preferences: pairs (and SPO's prompts) of selected annotators, read whole, streamed and
as the trainers' stream, counted before any model loads; the two-group toy world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import dpo_args

from spo.annotators import check_selection, keeps, selected_prompts
from spo.cli import main
from spo.config.schemas import AnnotatorsConfig, ValidationImagesConfig
from spo.data import read_pairs
from spo.errors import ConfigError
from spo.evaluation.scorers import build_scorer
from spo.stream import open_pair_stream
from spo.toy.annotator import group_labelled_pairs
from spo.toy.oracle import GROUPS, evaluate, group_reward, size_taste
from spo.toy.render import Prompt, render

# Pick-a-Pic's schema with its user_id column: 12 pairs by 4 users (ids as numbers, as there)
USERS = [101, 202, 303, 404]


def _pickapic(path: Path, files: int = 1) -> Path:
    """12 pairs, pair i by user USERS[i % 4] about prompt 'prompt {i // 2}', in `files` files."""
    rows = [
        {
            "caption": f"prompt {i // 2}",
            "jpg_0": b"png-bytes-0",
            "jpg_1": b"png-bytes-1",
            "label_0": 1.0,
            "label_1": 0.0,
            "user_id": USERS[i % 4],
            "ranking_id": i,
        }
        for i in range(12)
    ]
    path.mkdir(parents=True, exist_ok=True)
    per = len(rows) // files
    for f in range(files):
        pq.write_table(pa.Table.from_pylist(rows[f * per : (f + 1) * per]), path / f"{f}.parquet")
    return path


def test_a_list_of_ids_keeps_exactly_those_rows_read_whole_and_streamed(tmp_path):
    source = str(_pickapic(tmp_path / "pairs"))
    sel = AnnotatorsConfig(ids=["202", "404"])
    want = [i for i in range(12) if USERS[i % 4] in (202, 404)]
    for streaming in (False, True):
        table = read_pairs(source, streaming=streaming, keep=keeps(sel))
        assert table["ranking_id"] == want, streaming
        assert set(table["user_id"]) == {202, 404}
        first = read_pairs(source, streaming=streaming, limit=2, keep=keeps(sel))
        assert first["ranking_id"] == want[:2]  # the first pairs of the selection
    # every row when nothing is selected
    assert len(read_pairs(source, keep=keeps(AnnotatorsConfig()))) == 12


def test_the_training_stream_keeps_the_selection_and_resumes_in_it(tmp_path):
    source = str(_pickapic(tmp_path / "pairs", files=2))
    sel = AnnotatorsConfig(ids=["101"])
    args = dict(seed=0, buffer=2, max_bad_share=0.5, keep=keeps(sel), extra_columns=("user_id",))
    stream = open_pair_stream(source, "train", None, **args)
    # one epoch of the selection is its 3 rows (pairs 0, 4 of file 0 and 8 = row 2 of file 1)
    epoch = [next(stream) for _ in range(3)]
    assert sorted((shard, row) for shard, row, _ in epoch) == [(0, 0), (0, 4), (1, 2)]
    assert all(data["user_id"] == 101 for _, _, data in epoch)
    state = stream.state()
    rest = [next(stream)[:2] for _ in range(4)]
    assert {r for r in rest} <= {(0, 0), (0, 4), (1, 2)}  # the next epochs: the same 3 rows
    again = open_pair_stream(source, "train", None, **args)
    again.restore(state)
    assert [next(again)[:2] for _ in range(4)] == rest


def test_counts_an_id_file_and_selections_that_keep_nothing(tmp_path):
    source = str(_pickapic(tmp_path / "pairs"))
    ids = tmp_path / "group.txt"
    ids.write_text("303\n\n101\n")
    picked = check_selection(AnnotatorsConfig(file=str(ids)), source, "train")
    assert (picked.kept, picked.total, picked.annotators) == (6, 12, 4)
    assert "6 of 12 pairs kept by user_id" in picked.line(AnnotatorsConfig(file=str(ids)), "x")
    assert check_selection(AnnotatorsConfig(), source, "train") is None
    with pytest.raises(ConfigError, match=r"user_id in \[999\] selects none of its 12 pairs"):
        check_selection(AnnotatorsConfig(ids=["999"]), source, "train")
    with pytest.raises(ConfigError, match="no column 'annotator'"):
        check_selection(AnnotatorsConfig(ids=["1"], column="annotator"), source, "train")
    with pytest.raises(ConfigError, match="annotator id file not found"):
        check_selection(AnnotatorsConfig(file=str(tmp_path / "none.txt")), source, "train")


def test_spo_prompts_of_a_group_are_its_pairs_prompts_once_each(tmp_path):
    source = str(_pickapic(tmp_path / "pairs"))
    # user 101 made pairs 0, 4, 8 (prompts 0, 2, 4); 202 made 1, 5, 9 (prompts 0, 2, 4)
    prompts = selected_prompts(AnnotatorsConfig(ids=["101", "202"]), source, "caption", "train")
    assert prompts == ["prompt 0", "prompt 2", "prompt 4"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("a\n")
    with pytest.raises(ConfigError, match="needs a table of pairs"):
        selected_prompts(AnnotatorsConfig(ids=["101"]), str(txt), "caption", "train")


def test_dpo_trains_on_a_group_and_says_how_many_pairs_it_kept(mini_world, tmp_path, capsys):
    """The mini world's pairs with an annotator column: two groups, by the pair's parity."""
    table = pq.read_table(mini_world / "pairs/train.parquet")
    groups = ["A" if i % 2 == 0 else "B" for i in range(table.num_rows)]
    pq.write_table(table.append_column("group", pa.array(groups)), tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    group = ["pairs.annotators.column=group", "pairs.annotators.ids=[A]", "max_steps=1"]
    args = dpo_args(mini_world, out, f"pairs.train={tmp_path / 'pairs.parquet'}", *group)
    assert main(args) == 0
    half = table.num_rows // 2
    assert f"{half} of {table.num_rows} pairs kept by group in [A] (2 annotators" in (
        capsys.readouterr().out
    )


# ------------------------------------------------------------------ the two-group toy world


def test_group_oracles_share_r_and_differ_by_the_size_taste():
    prompt = Prompt("blue", "triangle", "gray")
    assert size_taste(0.6, "large") == 0 and size_taste(1.4, "large") == pytest.approx(1)
    assert size_taste(1.0, "large") == pytest.approx(0.5) == size_taste(1.0, "small")
    assert size_taste(0.8, "small") == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    for scale, extent_range in ((0.6, (0.5, 0.7)), (1.4, (1.25, 1.45))):
        image = render(prompt, 1.0, rng, scale=scale)
        report = evaluate(image, prompt)
        assert extent_range[0] < report.extent < extent_range[1]
        for group in GROUPS:  # 0.8 R + 0.2 taste, by hand
            taste = size_taste(report.extent, group)
            assert group_reward(image, prompt, group) == pytest.approx(
                0.8 * report.reward + 0.2 * taste
            )
    with pytest.raises(ValueError, match="unknown group"):
        size_taste(1.0, "medium")


def test_group_pairs_are_labelled_by_both_groups_and_their_tastes_disagree():
    prompts = [Prompt("red", "circle", "white"), Prompt("green", "square", "black")]
    # a near-deterministic annotator (tau 1e-4): a label is the sign of the reward difference
    rows = list(group_labelled_pairs(prompts, 60, 1e-4, 0.0, np.random.default_rng(0)))
    assert len(rows) == 120 and [r["user_id"] for r in rows[:4]] == ["large", "small"] * 2
    large, small = rows[::2], rows[1::2]
    same = [
        a["jpg_1"] == b["jpg_1"] and a["pair"] == b["pair"]
        for a, b in zip(large, small, strict=True)
    ]
    assert all(same)
    # the groups share R, so where they disagree the taste decided: large picks the bigger
    # object (scale) and small the smaller one
    split = [(a, b) for a, b in zip(large, small, strict=True) if a["label_0"] != b["label_0"]]
    assert len(split) >= 5
    bigger_first = [a["scale_0"] > a["scale_1"] for a, _ in split]
    assert (
        np.mean(
            [(a["label_0"] == 1) == big for (a, _), big in zip(split, bigger_first, strict=True)]
        )
        > 0.8
    )
    assert (
        np.mean(
            [(b["label_0"] == 1) != big for (_, b), big in zip(split, bigger_first, strict=True)]
        )
        > 0.8
    )


def test_the_group_oracles_are_scorers_and_never_select(tmp_path):
    images = torch.from_numpy(
        np.stack([render(Prompt("red", "circle", "white"), 1.0, np.random.default_rng(i), s)
                  for i, s in ((0, 0.6), (1, 1.4))])
    ).permute(0, 3, 1, 2).float() / 255  # fmt: skip
    texts = ["a red circle on a white background"] * 2
    large = build_scorer("oracle_large")(images, texts)
    small = build_scorer("oracle_small")(images, texts)
    assert large[1] > large[0] and small[0] > small[1]
    with pytest.raises(ConfigError, match="is an oracle"):
        ValidationImagesConfig(
            prompts=texts[:1], scorers=["oracle_large", "toy_pickscore"], select_by="oracle_large"
        ).validate()

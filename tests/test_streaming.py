"""Streamed pairs (spo/stream.py): the order is a pure function of the files, the seed, the
shuffle buffer and the number of processes; a resumed stream goes on exactly where it stopped;
the trainers start without reading the whole split, resume to the weights of an uninterrupted
run, and train the same weights from a folder laid out like a hub repository as from its
parquet files given by a glob."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import dpo_args, judge_training_args, run_killed_after_first_checkpoint
from safetensors.torch import load_file

from spo.cli import main
from spo.config import DPOTrainConfig, command_config
from spo.data import REQUIRED_COLUMNS, load_pair_table, open_split, read_pairs
from spo.errors import ConfigError
from spo.stream import PairStream, StreamedPairs, open_pair_stream

LORA = "pytorch_lora_weights.safetensors"
SIZES = (5, 9, 7)  # rows of the three files of the small stream: uneven on purpose


def write_shards(root: Path, tables: list[pa.Table]) -> Path:
    """A folder laid out like a hub dataset repository: data/train-0000k-of-0000n.parquet."""
    (root / "data").mkdir(parents=True)
    for k, table in enumerate(tables):
        pq.write_table(table, root / f"data/train-{k:05d}-of-{len(tables):05d}.parquet")
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """21 rows in three files; row i's caption is str(i), labels alternate win / lose."""
    rows = [
        {"caption": str(i), "jpg_0": b"a", "jpg_1": b"b", "label_0": float(i % 2)}
        for i in range(sum(SIZES))
    ]
    for r in rows:
        r["label_1"] = 1.0 - r["label_0"]
    cuts = list(itertools.accumulate(SIZES, initial=0))
    tables = [pa.Table.from_pylist(rows[a:b]) for a, b in itertools.pairwise(cuts)]
    return write_shards(tmp_path_factory.mktemp("small"), tables)


@pytest.fixture(scope="module")
def hub_folder(mini_world, tmp_path_factory) -> Path:
    """The mini world's 48 training pairs in four files of 12, laid out like a hub repo."""
    table = pq.read_table(mini_world / "pairs/train.parquet")
    tables = [table.slice(12 * k, 12) for k in range(4)]
    return write_shards(tmp_path_factory.mktemp("hub_pairs"), tables)


def stream_of(source, seed=0, buffer=4, rank=0, world=1) -> PairStream:
    data = open_split(str(source), "train", None, "pairs", streaming=True, columns=REQUIRED_COLUMNS)
    stream = PairStream(data.decode(False), seed=seed, buffer=buffer, source=str(source))
    stream.assign(rank, world)
    return stream


def captions(stream: PairStream, n: int) -> list[str]:
    return [row["caption"] for _, _, row in itertools.islice(stream, n)]


# ------------------------------------------------------------------------------ the order


def test_each_epoch_reads_every_row_once_in_a_seeded_order(small):
    n = sum(SIZES)
    seen = captions(stream_of(small), 3 * n)
    epochs = [seen[i * n : (i + 1) * n] for i in range(3)]
    assert all(sorted(e, key=int) == [str(i) for i in range(n)] for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch its own permutation
    assert captions(stream_of(small), 3 * n) == seen  # the same seed, the same order
    assert captions(stream_of(small, seed=1), n) != epochs[0]
    # a block holds `buffer` consecutive rows of one file or the next, shuffled: the first
    # block of epoch 0 comes from that epoch's first file
    first_file = stream_of(small).shards(0)[0]
    start = sum(SIZES[:first_file])
    assert sorted(epochs[0][:4], key=int) == [str(start + i) for i in range(4)]


def test_a_restored_stream_goes_on_exactly_where_it_stopped(small):
    whole = stream_of(small)
    straight = captions(whole, 60)
    for k in (0, 1, 4, 5, 11, 20, 21, 22, 43):  # block, file and epoch boundaries among them
        first = stream_of(small)
        captions(first, k)
        second = stream_of(small)
        second.restore(first.state())
        assert captions(second, 60 - k) == straight[k:], k
        assert second.rows_read == whole.rows_read  # the block read again is not counted


def test_processes_read_their_own_files_and_together_every_row(small):
    n = sum(SIZES)
    for epoch in range(3):
        mine = [stream_of(small, rank=r, world=2).shards(epoch) for r in (0, 1)]
        assert sorted(mine[0] + mine[1]) == [0, 1, 2]
    rank0, rank1 = (stream_of(small, rank=r, world=2) for r in (0, 1))
    rows0 = [int(c) for c in captions(rank0, n)]
    rows1 = [int(c) for c in captions(rank1, n)]
    files = list(itertools.accumulate(SIZES, initial=0))
    file_of = [next(k for k in range(3) if files[k] <= i < files[k + 1]) for i in range(n)]
    first0, first1 = set(rank0.shards(0)), set(rank1.shards(0))
    assert {file_of[i] for i in rows0[: sum(SIZES[k] for k in first0)]} == first0
    assert {file_of[i] for i in rows1[: sum(SIZES[k] for k in first1)]} == first1
    with pytest.raises(ConfigError, match="3 data file\\(s\\) for 4 processes"):
        stream_of(small, world=4)


def test_the_same_files_stream_alike_from_a_folder_or_a_glob(small):
    by_folder = captions(stream_of(small), 50)
    assert captions(stream_of(f"{small}/data/*.parquet"), 50) == by_folder


def test_ties_are_skipped_and_bad_labels_stop_with_one_line(tmp_path):
    rows = [{"caption": str(i), "jpg_0": b"a", "jpg_1": b"b"} for i in range(6)]
    labels = [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (2.0, -1.0)]
    for r, (a, b) in zip(rows, labels, strict=True):
        r["label_0"], r["label_1"] = a, b
    root = write_shards(tmp_path / "ties", [pa.Table.from_pylist(rows)])
    pairs = StreamedPairs(stream_of(root, buffer=1), 8, seed=0, drop_ties=True)  # file order
    with pytest.raises(ConfigError, match="row 5 of data file 0 has label_0=2.0"):
        pairs.next_batch(4)  # three usable pairs, two ties, then the bad row
    assert pairs.ties == 2
    all_ties = [r | {"label_0": 0.5, "label_1": 0.5} for r in rows]
    root = write_shards(tmp_path / "all_ties", [pa.Table.from_pylist(all_ties)])
    pairs = StreamedPairs(stream_of(root, buffer=4), 8, seed=0, drop_ties=True)
    with pytest.raises(ConfigError, match="no usable pair in a whole pass"):
        pairs.next_batch(1)


def test_a_subset_of_a_stream_is_the_subset_of_the_table(hub_folder):
    streamed = read_pairs(str(hub_folder), streaming=True, limit=20)
    whole = load_pair_table(str(hub_folder)).select(range(20))
    assert streamed.to_dict() == whole.to_dict() and streamed.features == whole.features


def test_a_stream_is_checked_before_training(tmp_path, hub_folder, monkeypatch):
    table = pq.read_table(hub_folder / "data/train-00000-of-00004.parquet")
    no_jpg = write_shards(tmp_path / "no_jpg", [table.drop_columns(["jpg_1"])])
    with pytest.raises(ConfigError, match="missing column 'jpg_1' \\(Pick-a-Pic schema"):
        open_pair_stream(str(no_jpg), "train", None, seed=0, buffer=4, max_bad_share=0.01)
    broken = table.set_column(1, "jpg_0", pa.array([b"not an image"] * len(table)))
    junk = write_shards(tmp_path / "junk", [broken])
    with pytest.raises(ConfigError, match="undecodable image"):
        open_pair_stream(str(junk), "train", None, seed=0, buffer=4, max_bad_share=0.01)
    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it, before any model loads
    with pytest.raises(ConfigError, match="4 data file\\(s\\) for 8 processes"):
        open_pair_stream(str(hub_folder), "train", None, seed=0, buffer=4, max_bad_share=0.01)


def test_hub_names_stream_and_local_sources_do_not_unless_asked(monkeypatch):
    def cfg(*overrides):
        return command_config("train-dpo", None, list(overrides))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert cfg().pairs.streams("yuvalkirstain/pickapic_v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: datasets' cache is read whole
    assert not cfg().pairs.streams("yuvalkirstain/pickapic_v1")
    local = cfg().pairs
    assert not local.streams(local.train)
    assert cfg("pairs.streaming=true").pairs.streams(local.train)
    assert DPOTrainConfig().pairs.shuffle_buffer == 1000
    with pytest.raises(ConfigError, match="relabel_with=oracle relabels every pair"):
        cfg("pairs.streaming=true", "relabel_with=oracle")
    with pytest.raises(ConfigError, match="pairs.shuffle_buffer"):
        cfg("pairs.shuffle_buffer=0")


# ------------------------------------------------------------------------------ trainers


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: Path, b: Path, name: str) -> None:
    x, y = load_file(a / "final" / name), load_file(b / "final" / name)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_streamed_dpo_reads_as_it_trains_resumes_exactly_and_ignores_where_files_are(
    mini_world, hub_folder, tmp_path, capsys
):
    def args(source, out):
        extra = ("pairs.streaming=true", "pairs.shuffle_buffer=8", f"pairs.train={source}")
        return dpo_args(mini_world, out, *extra)

    straight, killed, glob = tmp_path / "straight", tmp_path / "killed", tmp_path / "glob"
    assert main(args(hub_folder, straight)) == 0
    said = capsys.readouterr().out
    assert "pairs: streaming" in said and "4 data file(s)" in said
    assert "latent cache: off (streaming" in said
    logged = {m["step"]: m for m in metrics(straight) if "data/rows_read" in m}
    assert logged[1]["data/rows_read"] == 8  # one shuffle block of the 48 pairs
    assert logged[4]["data/rows_read"] < 48
    assert "data/ties_dropped" in logged[4]

    run_killed_after_first_checkpoint(lambda: main(args(hub_folder, killed)))
    assert not (killed / "final" / LORA).exists()
    assert main(args(hub_folder, killed)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same(straight, killed, LORA)
    resumed = {m["step"]: m for m in metrics(killed) if "data/rows_read" in m}
    assert [resumed[s]["data/rows_read"] for s in (1, 2, 3, 4)] == [
        logged[s]["data/rows_read"] for s in (1, 2, 3, 4)
    ]

    assert main(args(f"{hub_folder}/data/train-*.parquet", glob)) == 0
    assert_same(straight, glob, LORA)


def test_streamed_spm_resumes_exactly(mini_world, hub_folder, tmp_path):
    def args(out):
        return judge_training_args(
            mini_world,
            out,
            f"pairs.train={hub_folder}",
            "pairs.streaming=true",
            "pairs.shuffle_buffer=8",
            "pairs.max_validation_pairs=4",
            "validation_timesteps=[0]",
            "batch_size=3",
            "max_steps=3",
            "checkpoint_every=1",
            "log_every=1",
        )

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(straight)) == 0
    logged = [m["data/rows_read"] for m in metrics(straight) if "data/rows_read" in m]
    assert logged == [8, 8, 16]  # blocks of 8 read as the steps of 3 pairs need them
    run_killed_after_first_checkpoint(lambda: main(args(killed)))
    assert main(args(killed)) == 0
    assert_same(straight, killed, "model.safetensors")

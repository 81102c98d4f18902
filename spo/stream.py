"""Training pairs read as a stream, in an order that a checkpoint resumes exactly.

Why not `IterableDataset.shuffle`: its shuffle buffer is not part of its state, so a resumed run
refills it and trains on another order. Here the order is a pure function of the data files,
the seed, `shuffle_buffer` and the number of processes W:

- epoch e permutes the shards (the data files, in the order `datasets` lists them: sorted) with
  a generator seeded by (seed, e);
- process r reads shards r, r + W, r + 2W, ... of that permutation one after the other (its own
  share: no row is read by two processes) and cuts what it reads into blocks of
  `shuffle_buffer` rows (an epoch's last block may be shorter);
- each block is yielded in the permutation drawn from (seed, e, r, block).

A position is (epoch, block, the shard and row where the block starts, rows taken from it):
what a checkpoint keeps. Resuming reads that one block again, skipping the shard's rows before
it (read, not decoded). Nothing depends on whether the files come from the Hub or from local
paths: the same files give the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from accelerate.utils import gather_object

from spo.annotators import keeps
from spo.data import (
    REQUIRED_COLUMNS,
    BadImageCounter,
    PairBatch,
    PairDataset,
    augmentation,
    bad_labels_message,
    caption_text,
    check_labels,
    check_pair_columns,
    open_split,
    pair_item,
    split_rows,
    valid_labels,
)
from spo.errors import ConfigError, TrainingError
from spo.runs import made_by
from spo.training.distributed import sum_over_ranks

PROBE_ROWS = 200  # rows of the first shard whose labels and images are checked before training


@dataclass
class StreamPosition:
    """Where a process is in its stream (see the module docstring)."""

    epoch: int = 0
    block: int = 0  # the block's number within this process's epoch
    shard: int = 0  # where the block starts: which of this process's shards of the epoch ...
    row: int = 0  # ... and which row of that shard
    taken: int = 0  # rows of the block already handed out
    rows_read: int = 0  # rows this process read from the source before this block


class PairStream:
    """One process's endless, resumable stream of rows of a streaming dataset, each with its
    shard and row number."""

    def __init__(
        self, data, *, seed: int, buffer: int, source: str, keep: Callable | None = None
    ) -> None:
        self.data = data
        self.keep = keep  # rows to keep (an annotator selection); row numbers count every row
        self.seed, self.buffer, self.source = seed, buffer, source
        self.num_shards = data.num_shards
        self.rank, self.world = 0, 1
        self.pos = StreamPosition()
        self.probed = 0  # rows checked before training (`open_pair_stream`)
        self._block: list[tuple[int, int, dict[str, Any]]] = []
        self._end = (0, 0)  # (shard, row) just after the block
        self._loaded = False
        self._reader: tuple[tuple[int, int, int], Iterator] | None = None  # (its next row, it)

    def check_world(self, world: int) -> None:
        """Every process needs a shard of its own."""
        if self.num_shards < world:
            raise ConfigError(
                f"{self.source}: {self.num_shards} data file(s) for {world} processes; streaming "
                "gives each process its own files (split the data into at least as many parquet "
                "files, or set pairs.streaming=false)"
            )

    def assign(self, rank: int, world: int) -> None:
        """This process's place among the run's processes."""
        self.check_world(world)
        self.rank, self.world = rank, world

    def shards(self, epoch: int) -> list[int]:
        """This process's shards in epoch `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_shards)
        return [int(k) for k in order[self.rank :: self.world]]

    def first_rows(self, n: int) -> list[dict[str, Any]]:
        """The first `n` rows of the first data file (the same on every process)."""
        return list(self.data.shard(num_shards=self.num_shards, index=0).take(n))

    def __iter__(self) -> PairStream:
        return self

    def __next__(self) -> tuple[int, int, dict[str, Any]]:
        """(shard, row number in the shard, row) of the next row."""
        if not self._loaded:
            self._load()
        while self.pos.taken >= len(self._block):
            shard, row = self._end
            p = self.pos
            read = p.rows_read + len(self._block)
            self.pos = StreamPosition(p.epoch, p.block + 1, shard, row, 0, read)
            self._load()
        self.pos.taken += 1
        return self._block[self.pos.taken - 1]

    @property
    def rows_read(self) -> int:
        """Rows this process has read from the source (a resume's second reading of its block
        not counted)."""
        return self.pos.rows_read + (len(self._block) if self._loaded else 0)

    def state(self) -> dict[str, int]:
        return dataclasses.asdict(self.pos)

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`: its block is read again."""
        self.pos = StreamPosition(**state)
        self._loaded, self._reader = False, None

    def _load(self) -> None:
        """Read the block at `pos` (moving to the next epoch at the end of one) and shuffle it."""
        while True:
            p = self.pos
            block = list(itertools.islice(self._rows(p.epoch, p.shard, p.row), self.buffer))
            if block:
                break
            if p.block == 0:
                raise TrainingError(
                    f"{self.source}: the data files of process {self.rank} hold no rows"
                )
            self.pos = StreamPosition(epoch=p.epoch + 1, rows_read=p.rows_read)
        self._end = (block[-1][0], block[-1][1] + 1)
        self._reader = ((p.epoch, *self._end), self._reader[1])  # where its next row is
        shards = self.shards(p.epoch)
        order = np.random.default_rng([self.seed, p.epoch, self.rank, p.block]).permutation(
            len(block)
        )
        self._block = [(shards[block[j][0]], block[j][1], block[j][2]) for j in order]
        self._loaded = True

    def _rows(self, epoch: int, shard: int, row: int) -> Iterator[tuple[int, int, dict]]:
        """(i, row, data) from row `row` of this process's shard number `shard` in `epoch` on,
        through the epoch's later shards; the reader of the previous block goes on if it is
        there already."""
        if self._reader is not None and self._reader[0] == (epoch, shard, row):
            return self._reader[1]
        reader = self._read(epoch, shard, row)
        self._reader = ((epoch, shard, row), reader)
        return reader

    def _read(self, epoch: int, shard: int, row: int) -> Iterator[tuple[int, int, dict]]:
        shards = self.shards(epoch)
        for i in range(shard, len(shards)):
            part = self.data.shard(num_shards=self.num_shards, index=shards[i])
            for n, data in enumerate(part.skip(row) if row else part, start=row):
                if self.keep is None or self.keep(data):
                    yield i, n, data
            row = 0


@dataclass
class StreamedRow:
    """One usable row of a stream, not decoded yet."""

    shard: int  # its data file (its number among the split's files)
    row: int  # its row in that file
    data: dict[str, Any]
    labels: np.ndarray
    crop_at: tuple[float, float]
    flip: bool
    swap: bool  # its images swapped to put the winner first
    weight: float


class StreamedPairs:
    """Decoded micro-batches drawn from a `PairStream`: the streaming counterpart of
    `PairDataset` with `micro_batch_rows`. Ties are skipped and counted with `drop_ties`; a row
    whose labels are not in {0, 0.5, 1} or do not sum to 1 stops the run with one line.
    Crops and flips are drawn from (seed, epoch, shard, row): a row's own."""

    def __init__(
        self,
        stream: PairStream,
        resolution: int = 0,
        *,
        seed: int,
        drop_ties: bool = False,
        winner_first: bool = False,
        random_crop: bool = False,
        random_flip: bool = False,
        weight_of: Callable[[str], float] | None = None,
    ) -> None:
        self.stream, self.resolution, self.seed = stream, resolution, seed
        self.drop_ties, self.winner_first = drop_ties, winner_first
        self.random_crop, self.random_flip = random_crop, random_flip
        self.weight_of = weight_of
        self.ties = 0

    def next_batch(self, n: int) -> PairBatch:
        """The next `n` usable pairs (an undecodable one is None in the count of `bad`)."""
        items = [
            pair_item(
                r.data,
                r.labels,
                self.resolution,
                crop_at=r.crop_at,
                flip=r.flip,
                swap=r.swap,
                weight=r.weight,
                index=r.row,
            )
            for r in self.next_records(n)
        ]
        return PairDataset.collate(items)

    def next_records(self, n: int) -> list[StreamedRow]:
        """The next `n` usable rows, undecoded (ties skipped with `drop_ties`), each with its
        data file, row number, crop, mirroring, swap and weight."""
        records = []
        since = self.stream.pos.epoch  # a whole epoch of ties in a row: no usable pair at all
        while len(records) < n:
            shard, row, data = next(self.stream)
            labels = np.array([data["label_0"], data["label_1"]], dtype=np.float64)
            if not valid_labels(labels[None])[0]:
                where = f"{self.stream.source}: row {row} of data file {shard}"
                raise ConfigError(bad_labels_message(where, labels))
            if self.drop_ties and labels[0] == labels[1]:
                self.ties += 1
                if self.stream.pos.epoch > since + 1:
                    raise ConfigError(
                        f"{self.stream.source}: no usable pair in a whole pass over this "
                        "process's data files (all ties; DPO drops ties)"
                    )
                continue
            since = self.stream.pos.epoch
            crop_at, flip = augmentation(
                [self.seed, self.stream.pos.epoch, shard, row], self.random_crop, self.random_flip
            )
            caption = caption_text(data["caption"])
            records.append(
                StreamedRow(
                    shard=shard,
                    row=row,
                    data=data,
                    labels=labels,
                    crop_at=crop_at,
                    flip=flip,
                    swap=self.winner_first and labels[0] < labels[1],
                    weight=self.weight_of(caption) if self.weight_of else 1.0,
                )
            )
        return records

    def state(self) -> dict[str, Any]:
        return {"position": self.stream.state(), "ties": self.ties}

    def gathered_state(self) -> list[dict[str, Any]]:
        """Every process's `state()` in rank order (a collective): what a checkpoint keeps."""
        return gather_object([self.state()])

    def restore(self, states: list[dict[str, Any]] | None, accelerator) -> None:
        """This process's part of a checkpoint's `gathered_state()` (None: a fresh run)."""
        if not states:
            return
        if len(states) != accelerator.num_processes:
            raise TrainingError(
                f"the checkpoint was streamed by {len(states)} processes; resume it with as many "
                f"(not {accelerator.num_processes}), or resume=none"
            )
        mine = states[accelerator.process_index]
        self.stream.restore(mine["position"])
        self.ties = mine["ties"]

    def metrics(self, accelerator) -> dict[str, int]:
        """Rows read (and ties skipped, with `drop_ties`) so far, summed over every process (a
        collective)."""
        read, ties = sum_over_ranks(accelerator, [self.stream.rows_read, self.ties])
        return {"data/rows_read": read} | ({"data/ties_dropped": ties} if self.drop_ties else {})


def stream_of_training_pairs(pairs, seed: int) -> PairStream:
    """`open_pair_stream` of a trainer's `pairs` config (train split, shuffle buffer, bad-image
    share)."""
    selection = pairs.annotators
    return open_pair_stream(
        pairs.train,
        pairs.train_split,
        made_by(pairs.train),
        seed=seed,
        buffer=pairs.shuffle_buffer,
        max_bad_share=pairs.max_bad_image_share,
        keep=keeps(selection),
        extra_columns=(selection.column,) if selection.active else (),
    )


def open_pair_stream(
    source: str,
    split: str,
    made_by: str | None,
    *,
    seed: int,
    buffer: int,
    max_bad_share: float,
    keep: Callable | None = None,
    extra_columns: tuple[str, ...] = (),
) -> PairStream:
    """A training split as a stream, checked before anything is spent on it: its columns,
    enough data files for the processes the launcher started, and the labels and images of the
    first PROBE_ROWS rows of its first file. `keep` keeps some rows only (reading
    `extra_columns` too: the annotator column it looks at)."""
    data = open_split(
        source,
        split,
        made_by,
        "pairs",
        streaming=True,
        columns=REQUIRED_COLUMNS + extra_columns,
        require=check_pair_columns,
    ).decode(False)
    stream = PairStream(data, seed=seed, buffer=buffer, source=source, keep=keep)
    stream.check_world(int(os.environ.get("WORLD_SIZE", "1")))
    first = stream.first_rows(PROBE_ROWS)
    if not first:
        raise ConfigError(f"{source}: no pairs")
    check_labels(np.array([[r["label_0"], r["label_1"]] for r in first], np.float64), source)
    BadImageCounter(max_bad_share, source, split_rows(data)).probe_rows(first)
    stream.probed = len(first)
    return stream


def describe(stream: PairStream, split: str) -> str:
    """The line a streaming run starts with."""
    return (
        f"pairs: streaming {stream.source} ({split}), {stream.num_shards} data file(s), "
        f"{stream.buffer} pairs shuffled together per process; the first {stream.probed} pairs "
        "of the first file were checked"
    )

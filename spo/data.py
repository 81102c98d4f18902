"""Preference pairs in the Pick-a-Pic schema, and prompts, read with `datasets`.

Why one module: the SPM trainer (ties kept) and the Diffusion-DPO trainer (ties dropped, winner
first) read the same sources: a hub dataset, local parquet files (a file, a folder laid out like
a hub repository, a glob), or a `save_to_disk` folder with the columns `caption, jpg_0, jpg_1`
(encoded image bytes) and `label_0, label_1` (in {0, 0.5, 1}, summing to 1), read whole or as a
stream (`open_split`; the resumable order is spo/stream.py's). Prompt sources read one column
alone, never the images. Everything cheap is checked before training starts, with one line
naming the source, column or row (a hub name is asked about first: spo/sources.py); images are
decoded lazily and an undecodable one is skipped and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from spo.errors import ConfigError
from spo.sources import LOCAL_FORMS, check_hub_dataset, is_local_path, read_text

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
VALID_LABELS = (0.0, 0.5, 1.0)
IMAGES = ("jpg_0", "jpg_1")


def load_pair_table(
    source: str, split: str = "train", made_by: str | None = None, what: str = "pairs"
):
    """A `datasets.Dataset` of pairs from a parquet file / folder / glob, a `save_to_disk`
    folder, a folder laid out like a hub repository, or a hub dataset name (then `split` picks
    the split), read whole.

    `made_by` names the command that writes a missing local source, for the error message.
    """
    return open_split(source, split, made_by, what, streaming=False)


def read_pairs(
    source: str,
    split: str = "train",
    made_by: str | None = None,
    *,
    streaming: bool = False,
    limit: int | None = None,
    keep: Callable[[dict], bool] | None = None,
):
    """The first `limit` pairs (all: None) of a split as a `datasets.Dataset`, of the rows
    `keep` keeps (an annotator selection, `spo.annotators.keeps`; None: every row). With
    `streaming` only those rows are read (into memory), not the whole split: a validation split
    or a `max_train_pairs` subset of a hub dataset without downloading the rest."""
    if not streaming:
        table = load_pair_table(source, split, made_by)
        if keep is not None:  # the predicate sees the row's columns but its images
            columns = [c for c in table.column_names if c not in IMAGES]
            rows = table.select_columns(columns)
            table = table.select([i for i, row in enumerate(rows) if keep(row)])
        return table.select(range(limit)) if limit is not None and limit < len(table) else table
    import datasets

    stream = open_split(source, split, made_by, "pairs", streaming=True)
    with _quiet_datasets(), _reading(source, "pairs"):
        rows = stream.decode(False)
        rows = filter(keep, rows) if keep is not None else rows
        rows = list(itertools.islice(rows, limit))
    return datasets.Dataset.from_list(rows, features=stream.features)


def load_columns(
    source: str,
    columns: Sequence[str],
    split: str = "train",
    made_by: str | None = None,
    what: str = "prompts",
) -> dict[str, list]:
    """Only `columns` of a dataset source (e.g. its captions), never its other columns: parquet
    (local or on the Hub) is read column by column, a save_to_disk folder is memory-mapped."""
    stream = open_split(source, split, made_by, what, streaming=True, columns=columns)
    values: dict[str, list] = {c: [] for c in columns}
    with _quiet_datasets(), _reading(source, what):
        for batch in stream.iter(batch_size=1000):
            for c in columns:
                values[c] += batch[c]
    return values


def open_split(
    source: str,
    split: str,
    made_by: str | None,
    what: str,
    *,
    streaming: bool,
    columns: Sequence[str] | None = None,
    require: Callable[[Sequence[str], str], None] | None = None,
):
    """One split of a source: a `datasets.Dataset` read whole, or an `IterableDataset` that
    reads as it is iterated (`streaming`, always with `columns`: only those are read, after
    `require(column names, source)` or a check that they exist). Every problem found before
    reading is one line naming the source; a hub name is checked first (`check_hub_dataset`:
    seconds, not datasets' retries)."""
    import datasets

    with _quiet_datasets(), _reading(source, what):
        args = _builder_args(source, made_by, what)
        if args is None:  # a save_to_disk folder
            table = _saved_split(datasets.load_from_disk(source), split, source)
            if columns:
                _check_columns(table.column_names, columns, source, require)
                table = table.select_columns(list(columns))
            if not streaming:
                return table
            return table.to_iterable_dataset(num_shards=max(1, len(table.cache_files)))
        path, kwargs = args
        builder = datasets.load_dataset_builder(path, **kwargs)
        split = _pick_split(builder, split, source)
        if not (streaming or columns):
            builder.download_and_prepare()
            return builder.as_dataset(split=split)
        stream = builder.as_streaming_dataset(split=split)
        if not columns:
            return stream
        _check_columns(list(stream.features or columns), columns, source, require)
        if "columns" not in {f.name for f in dataclasses.fields(builder.config)}:
            return stream.select_columns(list(columns))  # not parquet: read whole rows
        kwargs["columns"] = list(columns)
        return datasets.load_dataset_builder(path, **kwargs).as_streaming_dataset(split=split)


def split_rows(data) -> int | None:
    """Rows in a split when known without reading it (a table; a hub card's split sizes)."""
    if hasattr(data, "__len__"):
        return len(data)
    splits = data.info.splits
    info = splits.get(str(data.split)) if splits and data.split is not None else None
    return info.num_examples if info is not None and info.num_examples else None


@contextlib.contextmanager
def _quiet_datasets():
    """No "Generating train split" bars and no logged errors: loading a file is quick, and an
    error that follows (its reason included) must be the only line the user sees."""
    import datasets

    logging = datasets.utils.logging
    was_disabled = logging.is_progress_bar_enabled() is False
    verbosity = logging.get_verbosity()
    datasets.disable_progress_bars()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _reading(source: str, what: str):
    """Any error of `datasets` while opening or reading `source` becomes one line naming it
    (and, for a hub dataset, the local forms that work without the Hub)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the source and reason
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        hint = "" if is_local_path(source) else f"; {LOCAL_FORMS}"
        raise ConfigError(f"cannot read {what} from {source}: {reason}{hint}") from e


def _builder_args(source: str, made_by: str | None, what: str) -> tuple[str, dict] | None:
    """What `datasets.load_dataset_builder` opens `source` with, or None for a save_to_disk
    folder. A missing or unusable local source is one line; a hub name is asked about first."""
    path = Path(source)
    hint = f" (`{made_by}` writes it)" if made_by else ""
    if path.is_dir():
        saved = any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))
        return None if saved else (str(path), {})
    if source.endswith(".parquet") or "*" in source:
        if "*" not in source and not path.is_file():
            raise ConfigError(f"{what} file not found: {source}{hint}")
        return "parquet", {"data_files": source}
    if path.is_file():
        raise ConfigError(
            f"{source}: {what} are read from a parquet file (.parquet), a folder of them, a "
            "save_to_disk folder or a hub dataset; this file is none of these"
        )
    if is_local_path(source):
        raise ConfigError(f"{what} not found: {source}{hint}")
    check_hub_dataset(source, what)
    return source, {}


def _saved_split(loaded, split: str, source: str):
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise ConfigError(f"{source}: no split {split!r} (has {sorted(loaded)})")
    return loaded[split]


def _pick_split(builder, split: str, source: str) -> str:
    """`split`, or the only split of a source whose file names name none (its files are
    then all "train", whatever split the config asks for)."""
    splits = [str(s) for s in builder.config.data_files or {}]
    if not splits or split in splits:
        return split
    if splits == ["train"]:
        return "train"
    raise ConfigError(f"{source}: no split {split!r} (has {', '.join(splits)})")


def _check_columns(names: Sequence[str], columns: Sequence[str], source: str, require) -> None:
    if require is not None:
        require(names, source)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConfigError(f"{source}: no column {missing[0]!r} (has {', '.join(names)})")


def check_pair_table(table, source: str) -> np.ndarray:
    """Check columns and labels; return the labels as a float array (N, 2).

    Raises ConfigError naming the first missing column, or the first row whose labels are not
    in {0, 0.5, 1} or do not sum to 1.
    """
    check_pair_columns(table.column_names, source)
    if len(table) == 0:
        raise ConfigError(f"{source}: no pairs")
    if not any(caption_text(c).strip() for c in table["caption"]):
        raise ConfigError(f"{source}: every caption is empty or null; the pairs need their prompts")
    labels = np.stack(
        [np.asarray(table[c], dtype=np.float64) for c in ("label_0", "label_1")], axis=1
    )
    return check_labels(labels, source)


def caption_text(value: Any) -> str:
    """A row's caption as text: a null caption is the empty prompt, not the word "None"."""
    return "" if value is None else str(value)


def check_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """`labels` (N, 2) as they are, or one line naming the first row whose labels are not in
    {0, 0.5, 1} or do not sum to 1."""
    valid = valid_labels(labels)
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        raise ConfigError(bad_labels_message(f"{source}: row {row}", labels[row]))
    return labels


def check_pair_columns(names: Sequence[str], source: str) -> None:
    """One line naming the first Pick-a-Pic column that `names` lacks."""
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ConfigError(
            f"{source}: missing column {missing[0]!r} (Pick-a-Pic schema needs "
            f"{', '.join(REQUIRED_COLUMNS)}; has {', '.join(names)})"
        )


def valid_labels(labels: np.ndarray) -> np.ndarray:
    """Which rows of (N, 2) labels are in {0, 0.5, 1} and sum to 1."""
    return np.isin(labels, VALID_LABELS).all(axis=1) & np.isclose(labels.sum(axis=1), 1.0)


def bad_labels_message(where: str, labels) -> str:
    return (
        f"{where} has label_0={labels[0]}, label_1={labels[1]}; "
        "labels must be 0, 0.5 or 1 and sum to 1"
    )


def examples_per_prompt(captions: Sequence[str]) -> np.ndarray:
    """How many pairs share each pair's caption (PickScore weights examples by its inverse)."""
    counts = Counter(captions)
    return np.array([counts[c] for c in captions], dtype=np.float64)


def decode_image(data: Any) -> Image.Image:
    """Encoded bytes (or a datasets Image dict / PIL image) -> RGB PIL image; raises on junk."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, dict):
        data = data.get("bytes")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"not image bytes: {type(data).__name__}")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def to_pixels(
    image: Image.Image,
    resolution: int,
    crop_at: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
) -> Tensor:
    """Resize the shorter side to `resolution` (bicubic), crop a square, optionally mirror it
    -> (3, R, R) in [-1, 1]. `crop_at` places the crop in the spare width / height (0.5, 0.5:
    centre), so one random draw can crop both images of a pair the same way."""
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        image = image.resize(
            (max(resolution, round(w * scale)), max(resolution, round(h * scale))),
            Image.Resampling.BICUBIC,
        )
        w, h = image.size
        left = round(crop_at[0] * (w - resolution))
        top = round(crop_at[1] * (h - resolution))
        image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def augmentation(
    keys: Sequence[int], random_crop: bool, random_flip: bool
) -> tuple[tuple[float, float], bool]:
    """A pair's crop position and mirroring, drawn from a generator seeded by `keys`."""
    rng = np.random.default_rng(list(keys))
    crop_at = tuple(rng.uniform(size=2)) if random_crop else (0.5, 0.5)
    flip = bool(rng.integers(2)) if random_flip else False
    return crop_at, flip


def pair_item(
    row: dict[str, Any],
    labels,
    resolution: int,
    *,
    crop_at: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
    swap: bool = False,
    weight: float = 1.0,
    index: int = 0,
) -> dict[str, Any] | None:
    """A row's two images decoded, resized, cropped and mirrored alike (swapped if asked), or
    None when one does not decode (see `PairDataset.collate`)."""
    try:
        images = [to_pixels(decode_image(row[k]), resolution, crop_at, flip) for k in IMAGES]
    except Exception:  # PIL raises many kinds on corrupt bytes; the pair is skipped
        return None
    if swap:
        images, labels = images[::-1], labels[::-1]
    return {
        "pixels": torch.stack(images),
        "caption": caption_text(row["caption"]),
        "labels": torch.tensor(np.array(labels), dtype=torch.float32),
        "weight": weight,
        "index": index,
    }


@dataclass
class PairBatch:
    """A collated batch; `pixels` is (B, 2, 3, R, R) in [-1, 1], image 0 then image 1."""

    pixels: Tensor
    captions: list[str]
    labels: Tensor  # (B, 2) soft labels (label_0, label_1)
    weights: Tensor  # (B,) per-example loss weights
    indices: Tensor  # (B,) row numbers in the table
    bad: int  # pairs dropped from this batch because an image could not be decoded

    @classmethod
    def blank(cls, resolution: int, bad: int) -> PairBatch:
        """One blank tie pair standing in for a batch whose pairs were all undecodable: the
        trainers run it with weight 0, so that every process still runs the model (the
        gradient all-reduce and accelerate's accumulation count stay in step)."""
        return cls(
            pixels=torch.zeros(1, 2, 3, resolution, resolution),
            captions=[""],
            labels=torch.full((1, 2), 0.5),
            weights=torch.ones(1),
            indices=torch.zeros(1, dtype=torch.long),
            bad=bad,
        )


class PairDataset(Dataset):
    """Pairs with decoded, resized images; an undecodable pair yields None (see `collate`).

    `labels` (N, 2) may differ from the table's own (relabelled by a scorer); `weights` are the
    per-example loss weights (default 1). `winner_first` swaps each pair whose `label_0` is 0
    so that image 0 is the winner (DPO; ties must have been removed). `random_crop` and
    `random_flip` draw one crop and one flip per pair and apply them to both images, from a
    generator seeded by (seed, epoch, row): set `epoch` each epoch for fresh draws.
    """

    def __init__(
        self,
        table,
        resolution: int,
        labels: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        *,
        winner_first: bool = False,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.table = table.select_columns(["caption", "jpg_0", "jpg_1"])
        self.resolution = resolution
        self.labels = check_pair_table(table, "pairs") if labels is None else labels
        self.weights = np.ones(len(table)) if weights is None else weights
        self.winner_first = winner_first
        self.random_crop, self.random_flip = random_crop, random_flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        i = int(i)
        crop_at, flip = self.augmentation(i)
        return pair_item(
            self.table[i],
            self.labels[i],
            self.resolution,
            crop_at=crop_at,
            flip=flip,
            swap=self.swapped(i),
            weight=float(self.weights[i]),
            index=i,
        )

    def augmentation(self, i: int) -> tuple[tuple[float, float], bool]:
        """Row i's crop position and mirroring this epoch (both images of a pair alike)."""
        return augmentation([self.seed, self.epoch, int(i)], self.random_crop, self.random_flip)

    def swapped(self, i: int) -> bool:
        """Whether row i's images are swapped to put the winner first."""
        labels = self.labels[int(i)]
        return self.winner_first and labels[0] < labels[1]

    @staticmethod
    def collate(items: list[dict[str, Any] | None]) -> PairBatch:
        good = [it for it in items if it is not None]
        bad = len(items) - len(good)
        if not good:
            return PairBatch(
                torch.empty(0),
                [],
                torch.empty(0, 2),
                torch.empty(0),
                torch.empty(0, dtype=torch.long),
                bad,
            )
        return PairBatch(
            pixels=torch.stack([it["pixels"] for it in good]),
            captions=[it["caption"] for it in good],
            labels=torch.stack([it["labels"] for it in good]),
            weights=torch.tensor([it["weight"] for it in good], dtype=torch.float32),
            indices=torch.tensor([it["index"] for it in good], dtype=torch.long),
            bad=bad,
        )


def share_lower_bound(bad: int, seen: int, z: float = 3.0) -> float:
    """Wilson score lower bound of a share from `bad` of `seen` (z = 3: 99.9% one-sided):
    how low the true share can plausibly be, so that a few bad pairs in a small sample do not
    condemn a large data set, while a source of mostly broken images fails within 100 pairs."""
    if seen <= 0:
        return 0.0
    p, zz = bad / seen, z * z
    centre = p + zz / (2 * seen)
    margin = z * math.sqrt(p * (1 - p) / seen + zz / (4 * seen * seen))
    return max(0.0, (centre - margin) / (1 + zz / seen))


class BadImageCounter:
    """Counts skipped pairs and stops the run once their share is surely past `max_share`.

    "Surely": the Wilson lower bound of the share (`share_lower_bound`) exceeds it, or the bad
    pairs seen already exceed `max_share` of the whole data set (`total` rows).
    """

    def __init__(self, max_share: float, source: str, total: int | None = None) -> None:
        self.max_share, self.source, self.total = max_share, source, total
        self.seen = 0
        self.bad = 0
        self._pending = [0, 0]  # this process's (seen, bad) since the last `settle`

    def update(self, seen: int, bad: int, what: str = "pairs") -> None:
        """Add a batch's counts; raise a one-line ConfigError once the share is surely too
        high."""
        self.seen += seen
        self.bad += bad
        certain = self.total is not None and self.bad > self.max_share * self.total
        if certain or share_lower_bound(self.bad, self.seen) > self.max_share:
            raise ConfigError(
                f"{self.source}: {self.bad} of {self.seen} {what} have an undecodable image "
                f"({self.share:.1%}; more than max_bad_image_share={self.max_share:.1%} of the "
                "data set, with 99.9% confidence)"
            )

    def count(self, seen: int, bad: int) -> None:
        """A micro-batch's counts on this process, judged at the next `settle`."""
        self._pending[0] += seen
        self._pending[1] += bad

    def settle(self, total: Callable[[list[int]], list[int]] | None = None) -> None:
        """Add the counts since the last settle, summed over every process by `total` (so that
        all processes hold the same counts and stop together), and judge the share."""
        seen, bad = total(self._pending) if total is not None else self._pending
        self._pending = [0, 0]
        self.update(seen, bad)

    def probe(self, table, n: int = 200) -> None:
        """Decode `n` pairs spread over the whole table (a fixed sample) before any training,
        so that a source full of broken images fails at once rather than after hours; the
        sample's counts are not kept."""
        rows = np.random.default_rng(0).permutation(len(table))[:n]
        sample = table.select_columns(list(IMAGES)).select(sorted(rows.tolist()))
        self.probe_rows(sample, total=len(table))

    def probe_rows(self, rows, total: int | None = None) -> None:
        """Decode the images of `rows` (e.g. the first pairs of a stream) out of `total`; one
        line when too many fail."""
        seen = bad = 0
        for row in rows:
            seen += 1
            try:
                decode_image(row["jpg_0"])
                decode_image(row["jpg_1"])
            except Exception:  # any decoding failure makes the pair unusable
                bad += 1
        sample = BadImageCounter(self.max_share, self.source, total or self.total)
        sample.update(seen, bad, what="pairs sampled")

    @property
    def share(self) -> float:
        return self.bad / max(self.seen, 1)


def load_prompts(
    source: str,
    column: str = "caption",
    split: str = "train",
    made_by: str | None = None,
    strict_column: bool = False,
) -> list[str]:
    """Prompts from a txt file (one a line), json (a list of strings or of objects with
    `column`), jsonl, parquet, a `save_to_disk` folder or a hub dataset (`column` of `split`).
    Blank prompts are dropped; an empty result is a one-line ConfigError. With
    `strict_column` plain strings (txt lines, a json list of strings) do not count as
    `column` (used for optional columns such as a category). A dataset's images are never
    read, only `column` (`load_columns`)."""
    import json

    path = Path(source)
    if path.suffix in (".txt", ".json", ".jsonl") or (path.is_file() and path.suffix != ".parquet"):
        if not path.is_file():
            if made_by:
                hint = f" (`{made_by}` writes it)"
            elif path.suffix == ".txt":
                hint = (
                    f" (`spo prepare-prompts --out {source}` draws one from a pair dataset's "
                    "captions, Pick-a-Pic v1 train by default)"
                )
            else:
                hint = ""
            raise ConfigError(f"prompt file not found: {source}{hint}")
        text = read_text(path, "prompt file")
        try:
            if path.suffix == ".json":
                items = json.loads(text)
            elif path.suffix == ".jsonl":
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                items = text.splitlines()
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from e
        if not isinstance(items, list):
            raise ConfigError(f"{source}: expected a list of prompts")
        prompts = []
        for item in items:
            if strict_column and not isinstance(item, dict):
                raise ConfigError(f"{source}: plain prompts have no {column!r} column")
            if isinstance(item, dict):
                if column not in item:
                    raise ConfigError(f"{source}: an entry has no {column!r} key")
                item = item[column]
            prompts.append(str(item))
    else:
        prompts = [str(p) for p in load_columns(source, [column], split, made_by)[column]]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ConfigError(f"{source}: no prompts")
    return prompts

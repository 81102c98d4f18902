"""Every pair image's VAE posterior (mean, std), encoded once for DPO (docs/training.md).

Two homes. `LatentCache` holds a table's moments in memory for one run. `DiskLatentCache` writes
them to a folder for data of any size, streamed data included, and later runs with the same VAE,
resolution, mirroring and data reuse it: the folder's name is a hash of those facts.

On disk the data is cut into parts: a streamed split's data files (what `spo.stream` reads, so a
streamed row (file, row) is found directly), or blocks of `PART_ROWS` rows of a table. Each part
is two files written once, atomically, when the part is complete: `part-NNNNN.bin` (rows x
mirrors x 2 images x (mean, std) x latent, raw, in the VAE's dtype, read by memory map) and
`part-NNNNN.json` (its row count and which rows decoded). A killed build resumes at the first
missing part; with several processes each builds every W-th part, then waits for the others'
files (no collective, so no timeout, however long the build).

A training step samples its latents from the moments with its own generator, which draws
exactly what encoding the pixels would (`DiffusionModel.sample_latents`), and decodes no image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from spo.data import IMAGES, PairDataset, caption_text, decode_image, to_pixels
from spo.errors import ConfigError
from spo.models import DiffusionModel
from spo.runs import atomic_write_bytes
from spo.stream import StreamedRow

PART_ROWS = 4096  # a table's rows per part: what a killed build can lose
ENCODE_BATCH = 32  # pairs per VAE call while building
END: Any = object()  # the end of a part's rows
STORAGE = {2: np.int16, 4: np.int32, 8: np.int64}  # a float's bytes -> the words it is kept in


def moments_shape(model: DiffusionModel, flips: int) -> tuple[int, ...]:
    """One row's cached moments: mirrors x 2 images x (mean, std) x C x h x w."""
    size = model.resolution // model.vae_scale_factor
    return (flips, 2, 2, model.latent_channels, size, size)


def vae_dtype(model: DiffusionModel) -> torch.dtype:
    return next(model.vae.parameters()).dtype


def row_bytes(model: DiffusionModel, flips: int) -> int:
    """Bytes one pair takes in a cache: both images, each mirror, mean and std."""
    item = torch.finfo(vae_dtype(model)).bits // 8
    return int(np.prod(moments_shape(model, flips))) * item


def encode_rows(
    model: DiffusionModel, rows: Sequence[dict[str, Any] | None], flips: Sequence[bool]
) -> tuple[torch.Tensor, np.ndarray]:
    """The moments (N, mirrors, 2 images, 2, C, h, w) of rows holding `jpg_0` / `jpg_1`, on the
    CPU, and which rows hold them: a row that does not decode, or None (a row no training
    reads: outside the annotator selection), gets zeros and is never read."""
    decoded: list[tuple[int, list[Image.Image]]] = []
    for i, row in enumerate(rows):
        if row is None:
            continue
        try:
            decoded.append((i, [decode_image(row[k]) for k in IMAGES]))
        except Exception:  # PIL raises many kinds on corrupt bytes; skipped at batch time
            continue
    res = model.resolution
    moments = torch.zeros(len(rows), *moments_shape(model, len(flips)), dtype=vae_dtype(model))
    ok = np.zeros(len(rows), dtype=bool)
    if decoded:
        pixels = [to_pixels(im, res, flip=f) for _, ims in decoded for f in flips for im in ims]
        dist = model.posterior(torch.stack(pixels))
        rows_shape = (len(decoded), len(flips), 2, *dist.mean.shape[1:])
        both = torch.stack([dist.mean.reshape(rows_shape), dist.std.reshape(rows_shape)], dim=3)
        index = [i for i, _ in decoded]
        moments[index] = both.cpu()
        ok[index] = True
    return moments, ok


def pick(
    moments: torch.Tensor, flip: Sequence[int], swap: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """From rows' moments (B, mirrors, 2, 2, C, h, w): each row's mirror, winner first; returns
    (mean, std), each (B, 2, C, h, w)."""
    rows = torch.arange(len(flip))[:, None]
    order = torch.tensor([[1, 0] if s else [0, 1] for s in swap], dtype=torch.long)
    chosen = moments[rows, torch.tensor(flip, dtype=torch.long)[:, None], order]
    return chosen[:, :, 0], chosen[:, :, 1]


class LatentCache:
    """A table's moments in memory, both mirror images with `random_flip`, in table order."""

    def __init__(
        self,
        model: DiffusionModel,
        dataset: PairDataset,
        batch_size: int = ENCODE_BATCH,
        progress: bool = True,
    ) -> None:
        self.flips = (False, True) if dataset.random_flip else (False,)
        n = len(dataset)
        parts, oks = [], []
        chunks = range(0, n, batch_size)
        for start in tqdm(chunks, desc="latent cache", leave=False, disable=not progress):
            rows = [dataset.table[i] for i in range(start, min(n, start + batch_size))]
            moments, ok = encode_rows(model, rows, self.flips)
            parts.append(moments)
            oks.append(ok)
        self.moments = torch.cat(parts)
        self.ok = np.concatenate(oks)

    def blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        blank = torch.zeros(1, 2, *self.moments.shape[4:], dtype=self.moments.dtype)
        return blank, blank

    def batch(self, dataset: PairDataset, rows: list[int]):
        """The decodable rows' moments (mean, std), each (B, 2, C, h, w) winner first, their
        captions, and the number of rows skipped as undecodable."""
        good = [i for i in rows if self.ok[i]]
        flip = [self.flips.index(dataset.augmentation(i)[1]) for i in good]
        swap = [dataset.swapped(i) for i in good]
        captions = [caption_text(dataset.table[i]["caption"]) for i in good]
        return pick(self.moments[good], flip, swap), captions, len(rows) - len(good)


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's config (if any) and every tensor of its state dict."""
    h = hashlib.sha256(json.dumps(dict(getattr(module, "config", {})), sort_keys=True,
                                  default=str).encode())  # fmt: skip
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_fingerprint(source: str) -> list:
    """What identifies a data source: a local file or folder by every file's relative path,
    size and modification time; a Hub dataset by its name (with the revision it names)."""
    path = Path(source)
    if not path.exists():
        return [source]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    root = path if path.is_dir() else path.parent
    return [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _encode_into(
    out, model: DiffusionModel, rows: Iterable[dict[str, Any] | None], flips: Sequence[bool]
) -> np.ndarray:
    """Write the moments of `rows` to the open file `out`, ENCODE_BATCH rows per VAE call;
    returns which rows decoded."""
    ok: list[np.ndarray] = []
    batch: list[dict[str, Any] | None] = []
    for row in itertools.chain(rows, [END]):  # not a list: a part may not fit in memory
        if row is not END:
            batch.append(row)
        if batch and (len(batch) == ENCODE_BATCH or row is END):
            moments, good = encode_rows(model, batch, flips)
            out.write(moments.contiguous().view(torch.uint8).numpy().tobytes())
            ok.append(good)
            batch = []
    return np.concatenate(ok) if ok else np.zeros(0, dtype=bool)


class DiskLatentCache:
    """The moments of every row of a split, on disk under `root/<hash of facts>` (see the
    module docstring). `parts` is the number of parts; a part's rows are known once built."""

    def __init__(self, root: Path, facts: dict[str, Any], parts: int) -> None:
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
        self.folder = Path(root) / digest.hexdigest()[:16]
        self.facts, self.parts = facts, parts
        self.flips = int(facts["mirrors"])
        self.shape = tuple(facts["shape"])
        self.dtype = getattr(torch, facts["dtype"])
        self._maps: dict[int, tuple[np.memmap, np.ndarray]] = {}
        self.table_rows = np.zeros(0, dtype=np.int64)  # a table's: its dataset rows' split rows

    @classmethod
    def for_model(
        cls,
        root: str,
        model: DiffusionModel,
        *,
        data: dict[str, Any],
        random_flip: bool,
        parts: int,
    ) -> DiskLatentCache:
        """The cache of `model`'s VAE at the model's resolution for the data described by
        `data` (its source's fingerprint, split, annotator selection, part layout)."""
        flips = 2 if random_flip else 1
        facts = {
            "vae": module_digest(model.vae),
            "resolution": model.resolution,
            "mirrors": flips,
            "shape": list(moments_shape(model, flips)[1:]),
            "dtype": str(vae_dtype(model)).removeprefix("torch."),
            "data": data,
        }
        return cls(Path(root), facts, parts)

    def _files(self, part: int) -> tuple[Path, Path]:
        return self.folder / f"part-{part:05d}.bin", self.folder / f"part-{part:05d}.json"

    def missing(self) -> list[int]:
        """Parts not written yet."""
        return [p for p in range(self.parts) if not self._files(p)[1].is_file()]

    def build(
        self,
        model: DiffusionModel,
        read_part: Callable[[int], Iterable[dict[str, Any]]],
        *,
        rank: int = 0,
        world: int = 1,
        progress: bool = True,
        wait_seconds: float = 2.0,
    ) -> None:
        """Encode the missing parts whose number is `rank` mod `world` (each part's rows from
        `read_part(part)`), then wait until every other process's parts are there too."""
        self.folder.mkdir(parents=True, exist_ok=True)
        facts = json.dumps(self.facts, indent=2, sort_keys=True, default=str).encode()
        if rank == 0 and not (self.folder / "cache.json").is_file():
            atomic_write_bytes(self.folder / "cache.json", facts)
        mine = [p for p in self.missing() if p % world == rank]
        flips = (False, True) if self.flips == 2 else (False,)
        for part in tqdm(mine, desc="latent cache (disk)", disable=not progress):
            data_file, info_file = self._files(part)
            partial = data_file.with_name(f".{data_file.name}.tmp-{os.getpid()}")
            try:
                with open(partial, "wb") as out:
                    good = _encode_into(out, model, read_part(part), flips)
                os.replace(partial, data_file)
            finally:
                partial.unlink(missing_ok=True)  # an interrupted part starts again
            info = {"rows": int(len(good)), "bad_rows": np.flatnonzero(~good).tolist()}
            atomic_write_bytes(info_file, json.dumps(info).encode())
        while self.missing():  # the other processes' parts (the launcher stops us if one dies)
            time.sleep(wait_seconds)

    def _part(self, part: int) -> tuple[np.memmap, np.ndarray]:
        if part not in self._maps:
            data_file, info_file = self._files(part)
            info = json.loads(info_file.read_text())
            ok = np.ones(info["rows"], dtype=bool)
            ok[info["bad_rows"]] = False
            # raw words of the dtype's size (numpy has no bfloat16), viewed as it when read
            words = STORAGE[torch.finfo(self.dtype).bits // 8]
            shape = (info["rows"], self.flips, *self.shape)
            data = np.memmap(data_file, dtype=words, mode="r", shape=shape)
            self._maps[part] = (data, ok)
        return self._maps[part]

    def decodable(self, part: int, row: int) -> bool:
        data, ok = self._part(part)
        if row >= len(ok):
            raise ConfigError(
                f"latent cache {self.folder}: part {part} holds {len(ok)} rows, row {row} was "
                "asked for (the data changed without changing its files' sizes or times: "
                "delete the folder)"
            )
        return bool(ok[row])

    def moments(self, where: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The moments (B, mirrors, 2, 2, C, h, w) of rows given as (part, row)."""
        if not where:
            return torch.zeros(0, self.flips, *self.shape, dtype=self.dtype)
        rows = [torch.from_numpy(np.array(self._part(p)[0][r])) for p, r in where]
        return torch.stack(rows).view(self.dtype)

    def batch(self, dataset: PairDataset, rows: list[int]):
        """As `LatentCache.batch`, for a table whose dataset row i is the split's row
        `table_rows[i]` (DPO drops ties)."""
        where = {i: divmod(int(self.table_rows[i]), PART_ROWS) for i in rows}
        good = [i for i in rows if self.decodable(*where[i])]
        flip = [self.flip_index(dataset.augmentation(i)[1]) for i in good]
        swap = [dataset.swapped(i) for i in good]
        captions = [caption_text(dataset.table[i]["caption"]) for i in good]
        moments = self.moments([where[i] for i in good])
        return pick(moments, flip, swap), captions, len(rows) - len(good)

    def stream_batch(self, records: Sequence[StreamedRow]):
        """The same for rows of a stream: each found by its data file and row."""
        good = [r for r in records if self.decodable(r.shard, r.row)]
        moments = self.moments([(r.shard, r.row) for r in good])
        flip = [self.flip_index(r.flip) for r in good]
        captions = [caption_text(r.data["caption"]) for r in good]
        return pick(moments, flip, [r.swap for r in good]), captions, len(records) - len(good)

    def flip_index(self, flip: bool) -> int:
        return int(flip) if self.flips == 2 else 0

    def blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        blank = torch.zeros(1, 2, *self.shape[2:], dtype=self.dtype)
        return blank, blank

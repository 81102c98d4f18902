"""The disk latent cache (issue 26 item 3, spo/latent_cache.py): DPO trained from it equals
DPO trained from the in-memory cache; a later run reuses it without encoding anything; a
killed build resumes at its first missing part and ends with an uninterrupted build's
moments; streamed DPO finds each row by its data file and row and trains what encoding every
step trains; another resolution gets another folder."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import Killed, dpo_args
from safetensors.torch import load_file

from spo.cli import main
from spo.data import load_pair_table
from spo.latent_cache import DiskLatentCache
from spo.models import DiffusionModel

LORA = "final/pytorch_lora_weights.safetensors"


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / LORA)


def _assert_close(a: dict, b: dict) -> None:
    """The VAE sees its images in other batches (float rounding), nothing else differs."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_disk_cache_trains_the_in_memory_weights_and_is_reused(mini_world, tmp_path, capsys):
    folder = tmp_path / "latents"
    memory, disk, again = tmp_path / "memory", tmp_path / "disk", tmp_path / "again"
    assert main(dpo_args(mini_world, memory)) == 0
    assert "MB in memory" in capsys.readouterr().out
    assert main(dpo_args(mini_world, disk, f"latent_cache_dir={folder}")) == 0
    said = capsys.readouterr().out
    assert "latent cache: encoding 1 of 1 parts" in said and "GB for the whole split's" in said
    (cache,) = folder.iterdir()
    stamp = (cache / "part-00000.bin").stat().st_mtime_ns
    assert main(dpo_args(mini_world, again, f"latent_cache_dir={folder}")) == 0
    assert f"latent cache: reusing {cache}" in capsys.readouterr().out
    assert (cache / "part-00000.bin").stat().st_mtime_ns == stamp  # nothing encoded again
    _assert_close(_weights(disk), _weights(memory))
    assert all(torch.equal(x, _weights(again)[k]) for k, x in _weights(disk).items())


def test_killed_build_resumes_at_its_first_missing_part(mini_world, tmp_path):
    model = DiffusionModel.from_pretrained(str(mini_world / "base_model"))
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    rows = [table[i] for i in range(len(table))]

    def read_part(part: int):
        return rows[16 * part : 16 * (part + 1)]

    def cache(name: str) -> DiskLatentCache:
        data = {"rows": len(rows)}
        return DiskLatentCache.for_model(
            str(tmp_path / name), model, data=data, random_flip=True, parts=3
        )

    def dies_at_part_1(part: int):
        if part == 1:
            raise Killed
        return read_part(part)

    killed = cache("killed")
    with pytest.raises(Killed):
        killed.build(model, dies_at_part_1, progress=False)
    assert killed.missing() == [1, 2]
    assert not list(killed.folder.glob(".*tmp*"))  # the interrupted part left nothing
    built = []
    killed.build(model, lambda part: built.append(part) or read_part(part), progress=False)
    assert built == [1, 2] and killed.missing() == []

    fresh = cache("fresh")
    fresh.build(model, read_part, progress=False)
    where = [(p, r) for p in range(3) for r in range(16)]
    assert torch.equal(killed.moments(where), fresh.moments(where))
    assert killed.moments(where).abs().sum() > 0

    other = DiskLatentCache.for_model(
        str(tmp_path / "killed"), model.at_resolution(16), data={"rows": len(rows)},
        random_flip=True, parts=3,
    )  # fmt: skip
    assert other.folder != killed.folder


def test_streamed_dpo_reads_the_disk_cache_by_file_and_row(mini_world, tmp_path, capsys):
    table = pq.read_table(mini_world / "pairs/train.parquet")
    source = tmp_path / "pairs"
    (source / "data").mkdir(parents=True)
    for k in range(2):
        pq.write_table(table.slice(24 * k, 24), source / f"data/train-{k:05d}-of-00002.parquet")
    stream = ("pairs.streaming=true", "pairs.shuffle_buffer=8", f"pairs.train={source}")
    encoded, cached = tmp_path / "encoded", tmp_path / "cached"
    assert main(dpo_args(mini_world, encoded, *stream)) == 0
    assert main(dpo_args(mini_world, cached, *stream, f"latent_cache_dir={tmp_path / 'c'}")) == 0
    assert "latent cache: encoding 2 of 2 parts" in capsys.readouterr().out
    _assert_close(_weights(cached), _weights(encoded))

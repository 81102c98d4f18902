"""Captions without images, and `spo prepare-prompts`: prompt sources that are datasets are
read by their caption column alone (a file whose image columns cannot be read still gives its
captions, to `load_prompts`, to `spo compare` and to `spo prepare-prompts`), and the prompt
file the SPO configs name is drawn unique, seeded and written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_error_line

from spo.cli import main
from spo.commands.compare import load_prompt_set
from spo.config import CompareConfig
from spo.data import load_pair_table, load_prompts
from spo.errors import ConfigError

# 30 captions, 20 of them different once whitespace is collapsed
CAPTIONS = [f"a {'  ' if i % 3 else ' '}prompt number {i % 20}" for i in range(30)]


def unreadable_images(path: Path) -> Path:
    """A Pick-a-Pic-schema parquet file whose image column chunks are overwritten with junk:
    any reader that touches them fails, one that reads only the captions does not."""
    rows = [
        {"caption": c, "jpg_0": b"\x89PNG" * 5000, "jpg_1": b"\x89PNG" * 5000}
        | {"label_0": 1.0, "label_1": 0.0}
        for c in CAPTIONS
    ]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="none")
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for g in range(meta.num_row_groups):
        for j in range(meta.num_columns):
            column = meta.row_group(g).column(j)
            if column.path_in_schema.startswith("jpg_"):
                start = column.dictionary_page_offset or column.data_page_offset
                data[start : start + column.total_compressed_size] = b"\xff" * (
                    column.total_compressed_size
                )
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def captions_only(tmp_path_factory) -> Path:
    return unreadable_images(tmp_path_factory.mktemp("captions") / "pairs.parquet")


def test_captions_are_read_without_touching_the_image_columns(captions_only, tmp_path):
    with pytest.raises(ConfigError, match="cannot read pairs from"):
        load_pair_table(str(captions_only))  # the images really cannot be read
    expected = CAPTIONS  # as written: load_prompts only strips the ends
    assert load_prompts(str(captions_only)) == expected
    hub_style = tmp_path / "repo" / "data"
    hub_style.mkdir(parents=True)
    (hub_style / "validation-00000-of-00001.parquet").write_bytes(captions_only.read_bytes())
    other = [{"caption": "train", "jpg_0": b"", "jpg_1": b"", "label_0": 1.0, "label_1": 0.0}]
    pq.write_table(pa.Table.from_pylist(other), hub_style / "train-00000-of-00001.parquet")
    assert load_prompts(str(tmp_path / "repo"), split="validation") == expected
    # spo compare's prompts, with a category column the file does not have
    cfg = CompareConfig(prompts=str(captions_only), max_prompts=5)
    prompts = load_prompt_set(cfg)
    assert prompts.texts == expected[:5] and prompts.categories is None


def test_prepare_prompts_draws_different_seeded_prompts_atomically(captions_only, tmp_path, capsys):
    def prepare(out: Path, *extra: str) -> list[str]:
        argv = ["prepare-prompts", "--out", str(out), f"source={captions_only}", *extra]
        assert main(argv) == 0
        return out.read_text().splitlines()

    drawn = prepare(tmp_path / "a/prompts.txt", "num_prompts=12")
    summary = json.loads(capsys.readouterr().out.split("\n12 prompts written")[0])
    assert summary["captions_read"] == 30 and summary["different_captions"] == 20
    assert len(drawn) == 12 == len(set(drawn))
    assert set(drawn) <= {" ".join(c.split()) for c in CAPTIONS}
    assert prepare(tmp_path / "b.txt", "num_prompts=12") == drawn  # the same seed
    assert prepare(tmp_path / "c.txt", "num_prompts=12", "seed=1") != drawn
    assert sorted(prepare(tmp_path / "d.txt", "num_prompts=20")) == sorted(
        {" ".join(c.split()) for c in CAPTIONS}
    )
    assert load_prompts(str(tmp_path / "a/prompts.txt")) == drawn  # the SPO trainer reads it
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["prompts.txt"]  # no temp file left


def test_prepare_prompts_refuses_in_one_line_and_writes_nothing(captions_only, tmp_path, capsys):
    out = tmp_path / "prompts.txt"
    base = ["prepare-prompts", "--out", str(out), f"source={captions_only}"]
    assert main([*base, "num_prompts=21"]) == 2
    assert "only 20 different captions, fewer than num_prompts=21" in one_error_line(capsys)
    assert main([*base, "num_prompts=0"]) == 2
    assert "num_prompts" in one_error_line(capsys)
    assert main([*base, f"source={tmp_path / 'nope.parquet'}"]) == 2
    assert "not found" in one_error_line(capsys)
    assert main(["prepare-prompts", "--out", str(tmp_path), f"source={captions_only}"]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert not out.exists()


def test_a_missing_prompt_file_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_prompts("data/pickapic_4k_prompts.txt")
    assert "`spo prepare-prompts --out data/pickapic_4k_prompts.txt`" in str(e.value)

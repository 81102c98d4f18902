"""Faults inside one process: what a killed or crowded run leaves is cleaned up, a checkpoint
that does not load is skipped, a full disk is one line, diverged weights are never saved,
metrics are not duplicated by a resume, and micro-batches whose images are all undecodable
keep the optimiser in step (the multi-process half is in test_multiprocess.py)."""

from __future__ import annotations

import errno
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import dpo_args, judge_training_args, one_error_line

from spo.cli import main
from spo.errors import TrainingError
from spo.runs import clean_leftovers
from spo.training.checkpoints import Checkpointer

ROOT = Path(__file__).parents[1]


def steps_logged(out: Path) -> Counter:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Counter(r["step"] for r in rows if "train/loss" in r)


def test_leftovers_of_killed_writes_are_removed_and_a_moved_final_restored(tmp_path):
    (tmp_path / "checkpoints/.step-6.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints/.latest.x1y2.tmp").write_text("step-6")
    (tmp_path / ".config.yaml.abc.tmp").write_text("seed: 1")
    (tmp_path / ".final.tmp-9f").mkdir()
    (tmp_path / ".final.old-3c").mkdir()  # killed between moving final/ aside and replacing it
    (tmp_path / ".final.old-3c/model.safetensors").write_text("weights")
    (tmp_path / ".lock").write_text("")
    (tmp_path / "checkpoints/step-4").mkdir()
    done = clean_leftovers(tmp_path)
    assert sorted(done) == sorted(
        [".step-6.tmp", ".latest.x1y2.tmp", ".config.yaml.abc.tmp", ".final.tmp-9f"]
        + ["restored final"]
    )
    assert (tmp_path / "final/model.safetensors").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoints", "final"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-4"]


def test_a_resume_rewinds_the_metrics_and_falls_back_past_a_damaged_checkpoint(
    mini_world, tmp_path, capsys
):
    out = tmp_path / "run"
    args = dpo_args(mini_world, out, "max_steps=6")
    assert main(args) == 0
    assert set(steps_logged(out).values()) == {1}
    # the last step's checkpoint is damaged and final/ lost: the resume falls back to step 4
    # and logs steps 5 and 6 once more, not twice
    latest = out / "checkpoints" / (out / "checkpoints/latest").read_text()
    assert latest.name == "step-6"
    weights = latest / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "step-6 does not load" in said and "falling back to" in said and "step-4" in said
    assert "resumed from" in said
    assert steps_logged(out) == Counter({s: 1 for s in range(1, 7)})


def test_a_damaged_only_checkpoint_is_one_line(mini_world, tmp_path, capsys):
    out = tmp_path / "run"
    args = dpo_args(mini_world, out, "checkpoints_total_limit=1")
    assert main(args) == 0
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-4"]
    weights = out / "checkpoints/step-4/pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "step-4 does not load" in line and "resume=none starts afresh" in line


class _Accelerator:
    """What Checkpointer.save needs of an accelerator, in one process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, write=None):
        self.write = write

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        (self.write or (lambda f: (Path(f) / "model.bin").write_bytes(b"0" * 1000)))(folder)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "checkpoints", "dpo_training", total_limit=2)
    ckpt.save(_Accelerator(), 2, {})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=500))
    full = r"^disk full: checkpoint step-4 needs about 1 kB, 500 bytes free"
    with pytest.raises(TrainingError, match=full):
        ckpt.save(_Accelerator(), 4, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-2"]
    monkeypatch.undo()

    def enospc(folder):
        (Path(folder) / "half").write_bytes(b"0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TrainingError, match="^disk full while writing checkpoint step-4") as e:
        ckpt.save(_Accelerator(enospc), 4, {})
    assert "The last good checkpoint is" in str(e.value) and "(step 2)" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-2"]


def test_room_is_made_by_dropping_old_checkpoints_first(tmp_path, monkeypatch):
    """A disk with room for two checkpoints holds a run with checkpoints_total_limit=2: the
    oldest goes before the new one is written (never the newest)."""
    ckpt = Checkpointer(tmp_path / "checkpoints", "dpo_training", total_limit=2)
    ckpt.save(_Accelerator(), 2, {})
    ckpt.save(_Accelerator(), 4, {})
    usage = shutil.disk_usage(tmp_path)

    def disk_usage(path):  # a disk of 3000 bytes: 1000 free beside two checkpoints
        have = sum(f.stat().st_size for f in (tmp_path / "checkpoints").rglob("*.bin"))
        return usage._replace(free=3000 - have)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    ckpt.save(_Accelerator(), 6, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-4",
        "step-6",
    ]


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", "dpo_training", total_limit=2)
    ckpt.save(_Accelerator(), 2, {}, [torch.ones(3)])
    with pytest.raises(TrainingError, match="not finite at step 4; not saved") as e:
        ckpt.save(_Accelerator(), 4, {}, [torch.tensor([1.0, float("nan")])])
    assert "The last good checkpoint is" in str(e.value) and "(step 2)" in str(e.value)
    assert not (tmp_path / "checkpoints/step-4").exists()


@pytest.fixture(scope="module")
def half_broken_pairs(mini_world, tmp_path_factory) -> Path:
    """The mini world's pairs with every third pair's first image undecodable."""
    table = pq.read_table(mini_world / "pairs/train.parquet").to_pylist()
    for i, row in enumerate(table):
        if i % 3 == 0:
            row["jpg_0"] = b"not an image"
    path = tmp_path_factory.mktemp("broken") / "pairs.parquet"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table), path)
    return path


def test_an_all_undecodable_micro_batch_keeps_the_optimiser_in_step(
    mini_world, half_broken_pairs, tmp_path, monkeypatch
):
    """One pair per micro-batch, two micro-batches per step, a third of the pairs broken: every
    optimiser step of the run is a real one (a skipped micro-batch used to shift accelerate's
    accumulation count, so later steps mixed micro-batches of two steps)."""
    calls = []
    real = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    out = tmp_path / "dpo"
    extra = ["batch_size=1", "gradient_accumulation_steps=2", "max_steps=8", "latent_cache=false"]
    extra += [f"pairs.train={half_broken_pairs}", "pairs.max_bad_image_share=0.5"]
    assert main(dpo_args(mini_world, out, *extra)) == 0
    assert len(calls) == 8
    summary = json.loads((out / "final/train_summary.json").read_text())
    assert summary["step"] == 8
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["train/bad_pairs"] > 0  # the broken pairs were met and counted


def test_an_all_undecodable_judge_micro_batch_is_stepped_over(
    mini_world, half_broken_pairs, tmp_path
):
    out = tmp_path / "spm"
    extra = ["batch_size=1", "max_steps=6", f"pairs.train={half_broken_pairs}"]
    extra += ["pairs.max_bad_image_share=0.5", "validation_timesteps=[0]"]
    assert main(judge_training_args(mini_world, out, *extra)) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/bad_pairs", 0) for r in logged) > 0


def test_a_run_that_made_no_step_writes_no_result(mini_world, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(dpo_args(mini_world, out, "max_minutes=0.00001")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bars, then the error
    line = err[-1]
    assert [x for x in err if "error" in x] == [line]
    assert "DPO made no optimiser step (the time budget max_minutes=1e-05 ran out first)" in line
    assert not any((out / "final").iterdir())

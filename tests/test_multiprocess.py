"""Two real CPU processes (`torchrun --nproc_per_node 2`, accelerate on CPU): every trainer
runs, checkpoints, is killed and resumes to the weights of the uninterrupted run (so a run
repeats bitwise too); a non-finite loss on one rank stops both; a launch whose
processes each think they are alone is refused; two runs cannot share a run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    dpo_args,
    judge_training_args,
    launches_resume_exactly,
    one_error_line,
    spo_args,
    torchrun,
)
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_sd3

from spo.cli import main
from spo.runs import RunLock


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / "final" / name)


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def flow_latent_judge(mini_world, sd3, tmp_path_factory) -> Path:
    """A transformer latent judge trained (one process) on the tiny SD3 pipeline."""
    out = tmp_path_factory.mktemp("flow_latent_judge")
    assert main(_flow_judge_args(mini_world, sd3, out)) == 0
    return out / "final"


def _flow_judge_args(world: Path, sd3: Path, out: Path, *extra: str) -> list[str]:
    return judge_training_args(
        world,
        out,
        f"base_model={sd3}",
        "latent.projection_dim=8",
        *extra,
        config="latent_judge.yaml",
    )


def _cases(world: Path, judge: Path, prompts: Path, sd3=None, flow_judge=None):
    """(args builder, weights file) per trainer; each run has a checkpoint before its end."""
    spo_extra = (f"prompts={prompts}", "checkpoint_every=1", "batch_size=1")
    return {
        "dpo": (lambda out: dpo_args(world, out), "pytorch_lora_weights.safetensors"),
        "flow-dpo": (
            lambda out: dpo_args(world, out, f"base_model={sd3}", "beta=100"),
            "pytorch_lora_weights.safetensors",
        ),
        # 15 validation pairs: the two processes' shards differ in size
        "spm": (
            lambda out: judge_training_args(world, out, "pairs.max_validation_pairs=15"),
            "model.safetensors",
        ),
        "spo": (
            lambda out: spo_args(
                world,
                judge,
                out,
                *spo_extra,
                "gradient_accumulation_steps=2",
            ),
            "pytorch_lora_weights.safetensors",
        ),
        # the transformer judge's last kept block has outputs no score reads (its text branch)
        "flow-latent-judge": (
            lambda out: _flow_judge_args(world, sd3, out, "pairs.max_validation_pairs=15"),
            "model.safetensors",
        ),
        "flow-spo-latent": (
            lambda out: spo_args(
                world,
                flow_judge,
                out,
                "policy.lora_targets=[attn.to_q,attn.to_k,attn.to_v,attn.to_out.0]",
                *spo_extra,
                config="spo_flow_latent.yaml",
                base=sd3,
            ),
            "pytorch_lora_weights.safetensors",
        ),
    }


FLOW_TRAINERS = ("flow-dpo", "flow-latent-judge", "flow-spo-latent")


@pytest.mark.parametrize(
    "trainer",
    ["dpo", "spm", "spo", *(pytest.param(t, marks=pytest.mark.slow) for t in FLOW_TRAINERS)],
)
def test_two_processes_resume_to_the_same_weights(
    trainer, mini_world, judge, four_prompts, tmp_path, request
):
    sd3 = request.getfixturevalue("sd3") if trainer in FLOW_TRAINERS else None
    latent = trainer == "flow-spo-latent"
    flow_judge = request.getfixturevalue("flow_latent_judge") if latent else None
    args, name = _cases(mini_world, judge, four_prompts, sd3, flow_judge)[trainer]
    # No separate repeat of the straight run: the killed run retraces its steps before the
    # kill and the resumed one after it, so their equality needs a run that repeats bitwise.
    launches_resume_exactly(args, tmp_path, name)


def test_two_processes_train_the_spm_on_the_released_loss_of_the_gathered_batch(tmp_path):
    """The SPM trainer's loss over 2 processes (split 3 + 3 or 4 + 2) leaves DDP the gradient
    of the released criterion on the whole batch computed in one process, as the release's
    differentiable all_gather does; every process logs the whole batch's loss."""
    import spm_loss_worker as worker

    from preference_model.losses import preference_loss

    done = torchrun([str(tmp_path / "out.pt")], script=Path(worker.__file__))
    assert done.returncode == 0, done.stderr[-2000:]
    results = torch.load(tmp_path / "out.pt")
    weight = results.pop("initial_weight")[0].requires_grad_(True)
    features, labels, weights = worker.batch()
    scores = (features @ weight.T).view(-1, 2)
    loss, _ = preference_loss(scores[:, 0], scores[:, 1], labels, weights)
    loss.backward()
    for name, (grad, logged) in results.items():
        assert torch.allclose(grad, weight.grad, atol=1e-6), name
        assert logged == pytest.approx(loss.item(), rel=1e-6), name


def test_a_non_finite_loss_on_one_rank_stops_both(mini_world, tmp_path):
    out = tmp_path / "nan"
    run = torchrun(dpo_args(mini_world, out, "max_steps=6"), fault="nan_on_rank_1")
    assert run.returncode != 0  # and no hang: both ranks left the collective
    errors = [line for line in run.stderr.splitlines() if line.startswith("spo: error:")]
    # one line per rank that got to print it before torchrun stopped the other
    assert 1 <= len(errors) <= 2, run.stderr[-2000:]
    assert all("non-finite DPO loss at step 2 on rank 1" in e for e in errors)
    assert all("last good checkpoint is" in e and "(step 2)" in e for e in errors)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2"]
    assert not (out / "final/pytorch_lora_weights.safetensors").exists()


def test_a_world_of_lonely_rank_zeros_is_refused(mini_world, tmp_path):
    """Without ACCELERATE_USE_CPU on a CPU host, each process believes it is rank 0 of 1: both
    refuse in one line before anything is created."""
    run = torchrun(dpo_args(mini_world, tmp_path / "x"), cpu=False)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("spo: error:")]
    assert errors and "each sees a world of 1" in errors[0]  # two ranks may share a line
    assert not (tmp_path / "x").exists()


def test_a_second_run_on_a_folder_in_use_is_refused(mini_world, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = RunLock(out)
    holder.acquire()
    try:
        assert main(dpo_args(mini_world, out)) == 2
        assert "is in use by another run (pid" in one_error_line(capsys)
        assert not (out / "config.yaml").exists()
    finally:
        holder.release()
    # workers of a killed launcher that still hold the folder
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)"
    )
    orphan = subprocess.Popen(
        [sys.executable, "-c", code, str(out / RunLock.RANKS)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert orphan.stdout.readline().strip() == "held"
        assert main(dpo_args(mini_world, out)) == 2
        line = one_error_line(capsys)
        assert f"still written by pid {orphan.pid} of an earlier run" in line
    finally:
        orphan.kill()
        orphan.wait()
    assert main(dpo_args(mini_world, out, "max_steps=1")) == 0  # the kernel dropped its lock


@pytest.mark.slow
def test_two_processes_stream_their_own_files_and_resume_to_the_same_weights(mini_world, tmp_path):
    """Streamed pairs (tests/test_streaming.py runs the one-process case): each process reads
    its own data files; killed after its first checkpoint, the run resumes to the weights of
    the uninterrupted one. 3 launches of 2 processes: about 80 s on 2 idle cores."""
    table = pq.read_table(mini_world / "pairs/train.parquet")
    (tmp_path / "pairs/data").mkdir(parents=True)
    for k in range(4):
        pq.write_table(
            table.slice(12 * k, 12), tmp_path / f"pairs/data/train-{k:05d}-of-00004.parquet"
        )
    extra = (f"pairs.train={tmp_path / 'pairs'}", "pairs.streaming=true", "pairs.shuffle_buffer=8")
    name = "pytorch_lora_weights.safetensors"
    straight = torchrun(dpo_args(mini_world, tmp_path / "a", *extra))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = torchrun(dpo_args(mini_world, tmp_path / "k", *extra), fault="kill_after_checkpoint")
    assert killed.returncode != 0
    state = json.loads((tmp_path / "k/checkpoints/step-2/trainer_state.json").read_text())
    assert len(state["stream"]) == 2  # one position per process
    resumed = torchrun(dpo_args(mini_world, tmp_path / "k", *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert_equal(weights(tmp_path / "a", name), weights(tmp_path / "k", name))

"""How a run behaves for a user of accelerate and diffusers habits: the launcher's mixed
precision, a progress bar for a time budget, a finished run that is not trained again, a
changed config that is not resumed silently, one metric naming for every trainer, the tracker
getting the config and the validation images, and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import dpo_args, judge_training_args, one_error_line, spo_args
from safetensors.torch import load_file

import spo
from spo.cli import main
from spo.errors import ConfigError

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Runs with different mixed precision in one process need a fresh accelerate state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def assert_same(a: dict, b: dict) -> None:
    """Equal tensors (the files' bytes may differ: safetensors orders its metadata freely)."""
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixed_precision_comes_from_the_launcher_unless_the_config_sets_it(
    mini_world, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets
    assert main(dpo_args(mini_world, tmp_path / "a", "max_steps=1")) == 0
    summary = json.loads((tmp_path / "a/final/train_summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    assert main(dpo_args(mini_world, tmp_path / "b", "max_steps=1", "mixed_precision=no")) == 0
    said = capsys.readouterr().out
    assert "mixed_precision=no from the config overrides the launcher's bf16" in said
    summary = json.loads((tmp_path / "b/final/train_summary.json").read_text())
    assert summary["mixed_precision"] == "no"


def test_fp16_configs_on_a_cpu_are_one_line_before_any_data_or_model(tmp_path, capsys):
    """configs/sd15/dpo_lora.yaml names hub models and data; on a CPU it must stop at once."""
    out = tmp_path / "x"
    config = ROOT / "configs/sd15/dpo_lora.yaml"
    assert main(["train-dpo", "--config", str(config), "--out", str(out)]) == 2
    assert "mixed_precision=fp16 needs a GPU" in one_error_line(capsys)
    spm = ROOT / "configs/sd15/spm.yaml"
    assert main(["train-preference-model", "--config", str(spm), "--out", str(out)]) == 2
    assert "needs a GPU" in one_error_line(capsys)
    assert not out.exists()


def test_a_time_budget_shows_the_budget_not_a_step_count(mini_world, tmp_path, capsys):
    args = dpo_args(mini_world, tmp_path / "t", "max_steps=1000000", "max_minutes=0.1")
    args.append("latent_cache=false")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "s of budget" in err and "1000000" not in err


def test_a_finished_run_is_not_trained_again(mini_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(dpo_args(mini_world, out)) == 0
    state = json.loads((out / "checkpoints/step-4/trainer_state.json").read_text())
    assert state["finished"] and state["final_written"]  # the last step is checkpointed
    before = (out / "metrics.jsonl").read_text()
    weights = load_file(out / "final/pytorch_lora_weights.safetensors")
    capsys.readouterr()
    assert main(dpo_args(mini_world, out)) == 0
    said = capsys.readouterr().out
    assert "already finished (final/ written); nothing to do" in said
    assert "result written" not in said  # it did nothing, and says only that (issue 21)
    assert (out / "metrics.jsonl").read_text() == before
    assert_same(load_file(out / "final/pytorch_lora_weights.safetensors"), weights)
    # killed while writing final/: the rerun writes it from the last step's checkpoint,
    # training no step again
    (out / "final/pytorch_lora_weights.safetensors").unlink()
    state["final_written"] = False
    (out / "checkpoints/step-4/trainer_state.json").write_text(json.dumps(state))
    assert main(dpo_args(mini_world, out)) == 0
    steps = [r["step"] for r in metrics(out) if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    assert_same(load_file(out / "final/pytorch_lora_weights.safetensors"), weights)
    # more steps asked for: it trains on from step 4
    assert main(dpo_args(mini_world, out, "max_steps=6")) == 0
    steps = [r["step"] for r in metrics(out) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_changed_config_is_not_resumed_silently(mini_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(dpo_args(mini_world, out, "max_steps=2")) == 0
    recorded = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(dpo_args(mini_world, out, "max_steps=2", "optim.lr=0.01", "beta=100")) == 2
    line = one_error_line(capsys)
    assert "holds a run trained with another config" in line
    assert "beta: 2000.0 -> 100.0" in line and "optim.lr: 0.001 -> 0.01" in line
    assert (out / "config.yaml").read_text() == recorded
    assert main(dpo_args(mini_world, out, "max_steps=2", "optim.lr=0.01", "resume=none")) == 0


def test_every_trainer_names_its_metrics_alike(mini_world, tmp_path):
    assert main(judge_training_args(mini_world, tmp_path / "spm", "max_steps=2")) == 0
    assert main(dpo_args(mini_world, tmp_path / "dpo", "max_steps=2")) == 0
    judge = tmp_path / "spm/final"
    assert main(spo_args(mini_world, judge, tmp_path / "spo", "max_epochs=1")) == 0
    for run in ("spm", "dpo", "spo"):
        keys = {k for row in metrics(tmp_path / run) for k in row} - {"step", "time"}
        assert "train/loss" in keys and "train/lr" in keys, run
        assert all(k.startswith(("train/", "val/", "data/")) for k in keys), (run, keys)


def test_the_tracker_gets_the_config_and_the_validation_images(mini_world, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    extra = [
        "tracker=tensorboard",
        "validation_images.prompts=[a red circle on a white background]",
    ]
    extra += ["validation_images.num_inference_steps=2", "max_steps=2"]
    assert main(dpo_args(mini_world, out, *extra)) == 0
    from tensorboard.plugins.hparams import plugin_data_pb2

    tags = {"images": set(), "scalars": set()}
    hparams: set[str] = set()
    for path in sorted(out.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags().get(kind, []))
        try:
            start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:
            continue
        hparams |= set(
            plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
        )
    assert "val/images" in tags["images"]
    assert "train/loss" in tags["scalars"]
    assert {"beta", "optim.lr", "policy.lora_rank", "seed", "base_model"} <= hparams


def test_the_python_api_validates_like_the_cli(mini_world, tmp_path):
    cfg = spo.load_config(
        "train-dpo",
        ROOT / "configs/toy/dpo.yaml",
        {
            "base_model": str(mini_world / "base_model"),
            "pairs.train": str(mini_world / "pairs/train.parquet"),
            "max_steps": 2,
            "batch_size": 2,
            "validation_images.prompts": [],
        },
        out=tmp_path / "api",
    )
    assert cfg.max_steps == 2 and cfg.out == str(tmp_path / "api")
    summary = spo.train_dpo(cfg)
    assert summary["step"] == 2
    assert (tmp_path / "api/final/pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ConfigError, match="unknown config key 'optim.lerning_rate'"):
        spo.load_config("train-dpo", None, {"optim.lerning_rate": 1.0})
    cfg.optim.max_grad_norm = float("nan")  # edited by hand: checked as the CLI would
    with pytest.raises(ConfigError, match="optim.max_grad_norm': must be a finite number"):
        spo.train_dpo(cfg)
    assert {"train_spo", "train_dpo", "train_preference_model", "compare"} <= set(spo.__all__)


def test_validation_images_under_bf16_beside_a_float32_lora(mini_world, tmp_path):
    """Frozen weights in bf16 (the launcher's or the config's precision), LoRA in float32: the
    validation sampler used to hand float32 latents to the bf16 VAE and fail ("Input type
    (float) and bias type (c10::BFloat16) should be the same")."""
    extra = [
        "mixed_precision=bf16",
        "max_steps=1",
        "validation_images.prompts=[a red circle on a white background]",
    ]
    extra += ["validation_images.num_inference_steps=2"]
    assert main(dpo_args(mini_world, tmp_path / "bf16", *extra)) == 0
    assert (tmp_path / "bf16/validation/step-1.png").is_file()

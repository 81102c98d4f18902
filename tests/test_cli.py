"""The `spo` CLI contract: one-line errors, exit code 2, nothing created before validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spo import cli
from spo.config import ToyWorldConfig, command_config, load_config
from spo.runs import RunDir

COMMANDS = ["toy-world", "train-preference-model", "train-dpo", "train-spo", "compare", "demo"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run every test in an empty folder, so a stray default `runs/` would be seen."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def single_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def assert_nothing_created(tmp_path: Path, *keep: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_unknown_key_override(tmp_path, capsys):
    assert cli.main(["toy-world", "--out", "run", "trian_pairs=5"]) == 2
    line = single_error_line(capsys)
    assert line.startswith("spo: error: unknown config key 'trian_pairs'")
    assert "did you mean 'train_pairs'?" in line
    assert_nothing_created(tmp_path)


def test_unknown_key_in_config_file(tmp_path, capsys):
    (tmp_path / "w.yaml").write_text("seed: 1\ntie_delt: 0.1\n")
    assert cli.main(["toy-world", "--config", "w.yaml", "--out", "run"]) == 2
    line = single_error_line(capsys)
    assert line.startswith("spo: error: unknown config key 'tie_delt' in w.yaml")
    assert "did you mean 'tie_delta'?" in line
    assert_nothing_created(tmp_path, "w.yaml")


def test_malformed_override(tmp_path, capsys):
    assert cli.main(["toy-world", "--out", "run", "train_pairs"]) == 2
    line = single_error_line(capsys)
    assert line == "spo: error: malformed override 'train_pairs': expected key=value"
    assert_nothing_created(tmp_path)


def test_wrong_type_override(tmp_path, capsys):
    assert cli.main(["toy-world", "--out", "run", "seed=abc"]) == 2
    line = single_error_line(capsys)
    assert line.startswith("spo: error:") and "'seed'" in line and "expected int" in line
    assert_nothing_created(tmp_path)


def test_missing_config(tmp_path, capsys):
    assert cli.main(["toy-world", "--config", "missing.yaml", "--out", "run"]) == 2
    assert single_error_line(capsys) == "spo: error: config file not found: missing.yaml"
    assert_nothing_created(tmp_path)


def test_invalid_value_rejected_before_run_folder(tmp_path, capsys):
    assert cli.main(["toy-world", "--out", "run", "train_pairs=0"]) == 2
    line = single_error_line(capsys)
    assert line.startswith("spo: error:") and "'train_pairs'" in line
    assert_nothing_created(tmp_path)


def test_unwritable_out(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    out = str(Path("file.txt") / "run")
    assert cli.main(["toy-world", "--out", out]) == 2
    line = single_error_line(capsys)
    assert line.startswith(f"spo: error: cannot write to output folder {out}: ")
    assert_nothing_created(tmp_path, "file.txt")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_rejects_an_unknown_key_before_work(tmp_path, capsys, command):
    assert cli.main([command, "--out", "run", "no_such_key=1"]) == 2
    line = single_error_line(capsys)
    assert line.startswith("spo: error: unknown config key 'no_such_key' in override")
    assert_nothing_created(tmp_path)


def test_unknown_command_and_flag_are_one_line(tmp_path, capsys):
    assert cli.main(["frobnicate"]) == 2
    assert single_error_line(capsys).startswith("spo: error:")
    assert cli.main(["toy-world", "--nope"]) == 2
    assert single_error_line(capsys).startswith("spo: error: unrecognized arguments: --nope")
    assert_nothing_created(tmp_path)


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "toy-world" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_toy_world_happy_path_calls_build_world(tmp_path, monkeypatch, capsys):
    """Stand-in build_world: checks the wiring without the real (heavy) toy world."""
    calls: list[tuple[ToyWorldConfig, RunDir]] = []
    from spo.commands import toy_world

    monkeypatch.setattr(toy_world, "build_world", lambda cfg, run: calls.append((cfg, run)))

    (tmp_path / "w.yaml").write_text("train_pairs: 9\nseed: 4\n")
    argv = ["toy-world", "--config", "w.yaml", "seed=5", "--out", "myrun", "grid_prompts=2"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""
    ((cfg, run),) = calls
    assert (cfg.train_pairs, cfg.seed, cfg.grid_prompts, cfg.out) == (9, 5, 2, "myrun")
    assert run.root == Path("myrun") and run.metrics_path.is_file()
    assert not run.checkpoints.exists() and not run.final.exists()  # a world has neither
    assert load_config(ToyWorldConfig, run.root / "config.yaml") == cfg


def test_python_dash_m_spo_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "spo", "demo", "--quick", "budget_minutes=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    expected = "spo: error: invalid value 0.0 for config key 'budget_minutes': must be > 0"
    assert proc.stderr.strip() == expected


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_subcommand_help_lists_its_config_keys_and_a_real_example(capsys, name):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--print-config" in out
    for key in cli.config_keys(name):
        assert key in out
    example = cli.COMMANDS[name].example
    assert f"(e.g. {example})" in " ".join(out.split())
    command_config(name, None, [example])  # a key the command has, with a valid value
    assert ("train_pairs" in out) == (name == "toy-world")


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_command", lambda *a: pytest.fail("the command ran"))
    argv = ["train-dpo", "--config", "toy/dpo", "mixed_precision=no", "beta=100", "--out", "x"]
    assert cli.main([*argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert_nothing_created(tmp_path)
    out = captured.out
    assert out.startswith("# `spo train-dpo`: the Diffusion-DPO baseline")
    assert "\nbeta: 100.0  # the paper's SD1.5 value" in out
    assert "\nmixed_precision: 'no'  # no | fp16 | bf16" in out
    assert "\n  lr: 0.001  # peak learning rate" in out  # a section's keys, indented
    (tmp_path / "printed.yaml").write_text(out)
    expected = command_config("train-dpo", "toy/dpo", argv[3:5], "x")
    assert command_config("train-dpo", "printed.yaml", []) == expected


def test_print_config_still_rejects_a_bad_config(tmp_path, capsys):
    assert cli.main(["train-dpo", "--print-config", "beta=-1"]) == 2
    assert single_error_line(capsys).startswith("spo: error: invalid value -1.0 for config key")

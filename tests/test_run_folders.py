"""Run folders belong to their command (issue 21): each names the command that made it, no
command writes into another's, a user's own non-empty folder is used only when asked, and the
other checks every command shares before it creates anything (text files, Hub names)."""

from __future__ import annotations

import pytest
from helpers import one_error_line

from spo import cli
from spo.config import COMMAND_CONFIGS, dump_config
from spo.errors import ConfigError
from spo.runs import check_out, prepare_run_dir, run_folder_command
from spo.sources import check_hub_model, read_text

RUN_FOLDER_COMMANDS = [name for name, c in cli.COMMANDS.items() if c.out == "run folder"]


@pytest.mark.parametrize("command", RUN_FOLDER_COMMANDS)
def test_a_run_folder_names_its_command_and_takes_only_that_command(command, tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, COMMAND_CONFIGS[command]())
    assert run_folder_command(out) == command
    check_out(command, out)  # the same command again: a resume
    for other in RUN_FOLDER_COMMANDS:
        if other != command:
            with pytest.raises(ConfigError, match=f"is a run folder of `spo {command}`"):
                check_out(other, out)


@pytest.mark.parametrize("command", RUN_FOLDER_COMMANDS)
def test_a_folder_from_before_the_marker_is_known_by_its_config(command, tmp_path):
    """config.yaml alone (written by older versions) still says which command made it."""
    (tmp_path / "config.yaml").write_text(dump_config(COMMAND_CONFIGS[command]()))
    assert run_folder_command(tmp_path) == command


def test_a_users_folder_is_used_only_when_asked(tmp_path, monkeypatch, capsys):
    from spo.commands import toy_world

    built = []
    monkeypatch.setattr(toy_world, "build_world", lambda cfg, run: built.append(run.root))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert cli.main(["toy-world", "--out", str(out)]) == 2
    assert "is not empty (notes.txt) and is no spo run folder" in one_error_line(capsys)
    assert built == [] and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert cli.main(["toy-world", "--out", str(out), "--use-existing-out"]) == 0
    assert built == [out] and (out / "notes.txt").read_text() == "mine\n"
    assert run_folder_command(out) == "toy-world"
    assert cli.main(["toy-world", "--out", str(out)]) == 0  # now its own run folder


def test_the_demo_folder_holds_its_stages_and_refuses_a_stage_of_another_command(tmp_path):
    root = tmp_path / "toy"
    prepare_run_dir(root / "world", COMMAND_CONFIGS["toy-world"]())  # stages run by hand first
    prepare_run_dir(root / "dpo", COMMAND_CONFIGS["train-dpo"]())
    check_out("demo", root)
    prepare_run_dir(root, COMMAND_CONFIGS["demo"]())
    check_out("train-dpo", root / "dpo")  # a stage inside the demo's folder
    check_out("train-dpo", root / "dpo_lr2")  # another run beside the stages
    with pytest.raises(ConfigError, match="lies inside"):
        check_out("prepare-prompts", root / "prompts.txt")
    prepare_run_dir(root / "spo", COMMAND_CONFIGS["train-preference-model"]())
    with pytest.raises(ConfigError, match="spo/? is a run folder of `spo train-preference-model`"):
        check_out("demo", root)


def test_leftover_locks_do_not_make_a_folder_non_empty(tmp_path):
    (tmp_path / ".lock").write_text("")
    (tmp_path / ".lock.ranks").write_text("")
    (tmp_path / ".config.yaml.x1.tmp").write_text("")
    check_out("train-dpo", tmp_path)


def test_an_undecodable_text_file_is_one_line_naming_file_line_and_column(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red circle\nan \xe9clair\n")
    with pytest.raises(ConfigError) as err:
        read_text(path, "prompt file")
    assert str(err.value) == (
        f"prompt file {path}: line 2, column 4 is not UTF-8 text (byte 0xe9); save it as UTF-8"
    )
    path.write_bytes("\ufeffa caf\u00e9\n".encode())  # UTF-8 with a byte-order mark
    assert read_text(path) == "a caf\u00e9\n"


def test_a_hub_model_in_the_local_cache_is_not_asked_about(monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, file: f"/cache/{repo}/{file}"
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: asked.append(a))
    check_hub_model("org/model", "base model")
    assert asked == []


def test_an_offline_hub_model_missing_from_the_cache_is_one_line(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, file: None)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        check_hub_model("org/model", "base model")

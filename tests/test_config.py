"""Config loading, the run folder contract and the atomic write helpers."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spo.config import COMMAND_CONFIGS, CompareConfig, ToyWorldConfig, dump_config, load_config
from spo.errors import ConfigError
from spo.runs import RunDir, atomic_dir, atomic_write_bytes, prepare_run_dir, run_folder_command

REPO = Path(__file__).resolve().parents[1]


@dataclass
class OptimCfg:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class NestedCfg:
    out: str = "runs/x"
    steps: int = 10
    optim: OptimCfg = field(default_factory=OptimCfg)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# load_config


def test_defaults_load_as_dataclass_instance():
    cfg = load_config(ToyWorldConfig, None)
    assert type(cfg) is ToyWorldConfig
    assert cfg == ToyWorldConfig()
    assert cfg.train_pairs == 3000 and cfg.annotator_tau == 0.05 and cfg.out == "runs/toy/world"


def test_shipped_yaml_matches_defaults():
    assert load_config(ToyWorldConfig, REPO / "configs/toy/world.yaml") == ToyWorldConfig()


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = write(tmp_path / "c.yaml", "train_pairs: 12\nannotator_tau: 1e-3\n")
    cfg = load_config(ToyWorldConfig, path)
    assert cfg.train_pairs == 12
    assert cfg.annotator_tau == pytest.approx(1e-3) and isinstance(cfg.annotator_tau, float)
    assert cfg.validation_pairs == 500


def test_dotted_override_wins_over_yaml_and_out_wins_over_both(tmp_path):
    path = write(tmp_path / "c.yaml", "train_pairs: 12\nseed: 3\nout: from_yaml\n")
    cfg = load_config(ToyWorldConfig, path, ["train_pairs=7", "out=from_override"], out="cli")
    assert (cfg.train_pairs, cfg.seed, cfg.out) == (7, 3, "cli")
    cfg = load_config(ToyWorldConfig, path, ["out=from_override"])
    assert cfg.out == "from_override"


def test_later_override_wins():
    assert load_config(ToyWorldConfig, None, ["seed=1", "seed=2"]).seed == 2


def test_int_override_of_float_field_becomes_float():
    cfg = load_config(ToyWorldConfig, None, ["guidance_scale=7"])
    assert cfg.guidance_scale == 7.0 and isinstance(cfg.guidance_scale, float)


def test_nested_dataclass_yaml_and_dotted_override(tmp_path):
    path = write(tmp_path / "n.yaml", "optim:\n  lr: 0.5\n")
    cfg = load_config(NestedCfg, path, ["optim.betas=[0.1, 0.2]", "steps=3"])
    assert type(cfg.optim) is OptimCfg
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == [0.1, 0.2] and cfg.steps == 3
    assert load_config(NestedCfg, None, ["optim.lr=2e-5"]).optim.lr == pytest.approx(2e-5)


def test_unknown_key_in_yaml_names_file_and_closest_key(tmp_path):
    path = write(tmp_path / "world.yaml", "trian_pairs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, path)
    msg = one_line(err)
    assert "'trian_pairs'" in msg and str(path) in msg and "did you mean 'train_pairs'?" in msg


def test_unknown_nested_key_in_yaml(tmp_path):
    path = write(tmp_path / "n.yaml", "optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(NestedCfg, path)
    assert "'optim.lrr'" in one_line(err) and "did you mean 'optim.lr'?" in str(err.value)


def test_unknown_key_in_override():
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, None, ["validation_pair=4"])
    msg = one_line(err)
    assert "override 'validation_pair=4'" in msg and "did you mean 'validation_pairs'?" in msg


def test_unknown_nested_key_in_override():
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'\?"):
        load_config(NestedCfg, None, ["optim.lrate=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim'\?"):
        load_config(NestedCfg, None, ["optm.lr=1"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(NestedCfg, None, ["steps.x=1"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(NestedCfg, None, ["zzzzzz=1"])
    assert "valid keys: out, steps, optim" in one_line(err)


@pytest.mark.parametrize("token", ["seed", "=3", "", "a..b=1", "optim.=1"])
def test_malformed_override(token):
    with pytest.raises(ConfigError) as err:
        load_config(NestedCfg, None, [token])
    assert one_line(err) == f"malformed override '{token}': expected key=value"


@pytest.mark.parametrize(
    ("token", "expected"),
    [("train_pairs=abc", "int"), ("train_pairs=5.5", "int"), ("annotator_tau=hot", "float")],
)
def test_wrong_type_in_override_names_key_value_and_type(token, expected):
    key, value = token.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, None, [token])
    msg = one_line(err)
    assert f"'{key}'" in msg and value in msg and f"expected {expected}" in msg


def test_wrong_type_in_yaml_names_file(tmp_path):
    path = write(tmp_path / "c.yaml", "seed: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, path)
    msg = one_line(err)
    assert "'seed'" in msg and "abc" in msg and "expected int" in msg and str(path) in msg


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, path)
    assert one_line(err) == f"config file not found: {path}"


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "hello\n", "a: [1\n", "seed: 1\nseed: 2\n"])
def test_non_mapping_or_broken_yaml_names_the_file(tmp_path, text):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, path)
    assert str(path) in one_line(err)


def test_empty_yaml_means_defaults(tmp_path):
    path = write(tmp_path / "e.yaml", "# nothing set\n")
    assert load_config(ToyWorldConfig, path) == ToyWorldConfig()


@pytest.mark.parametrize(
    "override",
    [
        "train_pairs=0",
        "validation_pairs=-1",
        "grid_prompts=0",
        "grid_images_per_prompt=0",
        "annotator_tau=0",
        "tie_delta=-0.1",
        "num_inference_steps=0",
        "seed=-1",
        "guidance_scale=nan",
    ],
)
def test_validate_rejects_nonsense(override):
    cfg = load_config(ToyWorldConfig, None, [override])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert f"'{override.split('=')[0]}'" in one_line(err)


def test_validate_accepts_defaults_and_zero_tie_delta():
    ToyWorldConfig().validate()
    ToyWorldConfig(tie_delta=0.0, num_inference_steps=1).validate()


def test_registry():
    assert COMMAND_CONFIGS["toy-world"] is ToyWorldConfig


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config(NestedCfg, None, ["optim.lr=0.25", "steps=4"])
    assert "lr: 0.25" in dump_config(cfg)
    atomic_write_bytes(tmp_path / "sub" / "c.yaml", dump_config(cfg).encode())
    assert load_config(NestedCfg, tmp_path / "sub" / "c.yaml") == cfg
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.yaml"]  # no temp file left


@dataclass
class TextCfg:
    name: str = "x"
    maybe: str | None = "y"
    names: list[str] = field(default_factory=list)
    flag: bool = False
    nested: NestedCfg = field(default_factory=NestedCfg)


# YAML 1.1 reads these as booleans or numbers; a string key must keep them as written.
AMBIGUOUS_TEXT = ["no", "NO", "off", "On", "yes", "y", "0123", "1e5", "12:30", "0x1F", ".inf"]


@pytest.mark.parametrize("text", AMBIGUOUS_TEXT)
def test_string_key_keeps_the_override_text(text):
    cfg = load_config(TextCfg, None, [f"name={text}", f"maybe={text}", f"nested.out={text}"])
    assert (cfg.name, cfg.maybe, cfg.nested.out) == (text, text, text)
    assert load_config(TextCfg, None, [f"names=[{text}, b]"]).names == [text, "b"]


@pytest.mark.parametrize("text", AMBIGUOUS_TEXT)
def test_string_key_keeps_the_yaml_text(tmp_path, text):
    path = write(tmp_path / "t.yaml", f"name: {text}\nmaybe: {text}\nnames: [{text}]\n")
    cfg = load_config(TextCfg, path)
    assert (cfg.name, cfg.maybe, cfg.names) == (text, text, [text])


def test_mixed_precision_no_is_valid():
    """The issue's case: `spo train-dpo mixed_precision=no` was "False" and rejected."""
    cfg = load_config(COMMAND_CONFIGS["train-dpo"], None, ["mixed_precision=no", "resume=NO"])
    assert (cfg.mixed_precision, cfg.resume) == ("no", "NO")
    cfg.validate()


def test_null_quotes_and_real_booleans_still_parse(tmp_path):
    cfg = load_config(TextCfg, None, ["maybe=null", "flag=true", 'name="a b"'])
    assert (cfg.maybe, cfg.flag, cfg.name) == (None, True, "a b")
    path = write(tmp_path / "t.yaml", "maybe: ~\nflag: true\nname: 'no'\n")
    cfg = load_config(TextCfg, path)
    assert (cfg.maybe, cfg.flag, cfg.name) == (None, True, "no")
    assert load_config(TextCfg, None, ["flag=false"]).flag is False


def test_string_key_takes_text_that_is_not_yaml():
    cfg = load_config(TextCfg, None, ["name=@home", "maybe=*x"])
    assert (cfg.name, cfg.maybe) == ("@home", "*x")


def test_override_that_is_not_yaml_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(NestedCfg, None, ["optim.betas=[0.1"])
    assert one_line(err).startswith("invalid value '[0.1' for config key 'optim.betas'")
    with pytest.raises(ConfigError, match="'steps'.*not YAML"):
        load_config(NestedCfg, None, ["steps=@"])


def test_yaml_float_without_a_dot(tmp_path):
    path = write(tmp_path / "n.yaml", "optim:\n  betas: [1e-3, 2E+2]\n")
    assert load_config(NestedCfg, path).optim.betas == [1e-3, 200.0]


# ---------------------------------------------------------------------------------------------
# run folder


def test_prepare_run_dir_creates_the_layout_and_a_loadable_config(tmp_path):
    cfg = load_config(ToyWorldConfig, None, ["train_pairs=11"], out=str(tmp_path / "a" / "run"))
    run = prepare_run_dir(cfg.out, cfg, folders=("checkpoints", "final"), metrics=True)
    assert isinstance(run, RunDir) and run.root == tmp_path / "a" / "run"
    assert run.checkpoints.is_dir() and run.final.is_dir()
    assert run.metrics_path.is_file() and run.metrics_path.read_text() == ""
    assert run.checkpoints == run.root / "checkpoints" and run.final == run.root / "final"
    loaded = load_config(ToyWorldConfig, run.root / "config.yaml")
    assert loaded == cfg and loaded.train_pairs == 11
    assert sorted(p.name for p in run.root.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "final",
        "metrics.jsonl",
        "spo_run.json",
    ]
    assert run_folder_command(run.root) == "toy-world"


def test_a_run_folder_holds_only_what_its_command_asks_for(tmp_path):
    """compare and benchmark keep no checkpoints, final/ or metrics (issue 21)."""
    run = prepare_run_dir(tmp_path / "run", CompareConfig())
    assert sorted(p.name for p in run.root.iterdir()) == ["config.yaml", "spo_run.json"]
    assert run_folder_command(run.root) == "compare"


def test_prepare_run_dir_fails_fast_on_unwritable_out(tmp_path):
    blocker = write(tmp_path / "file.txt", "x")
    for out in (blocker / "run", blocker):
        with pytest.raises(ConfigError) as err:
            prepare_run_dir(out, ToyWorldConfig())
        assert one_line(err).startswith(f"cannot write to output folder {out}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_log_metrics_appends_json_lines(tmp_path):
    run = prepare_run_dir(tmp_path / "run", ToyWorldConfig())
    run.log_metrics(1, loss=0.5, name="a")
    run.log_metrics(2, loss=float("nan"), acc=1)
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)  # strict JSON: NaN written as null
    assert first["step"] == 1 and first["loss"] == 0.5 and first["name"] == "a"
    assert second["step"] == 2 and second["loss"] is None and second["acc"] == 1
    assert math.isfinite(first["time"]) and second["time"] >= first["time"] > 1.6e9
    # a second prepare (resume) keeps the history
    prepare_run_dir(tmp_path / "run", ToyWorldConfig())
    assert len(run.metrics_path.read_text().splitlines()) == 2


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_dir_keeps_old_on_error_and_replaces_on_success(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "w.txt").write_text("v1")
    assert (final / "w.txt").read_text() == "v1"

    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "w.txt").write_text("half")
        (tmp / "extra.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in final.iterdir()) == ["w.txt"]
    assert (final / "w.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # temporary folder removed

    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_config_dataclass_fields_all_have_defaults():
    # `spo toy-world` with no --config must work from the dataclass alone.
    for f in dataclasses.fields(ToyWorldConfig):
        assert f.default is not dataclasses.MISSING

"""Every key that `spo <command> --print-config` shows is read when the command runs.

Why: a key the command never reads is a setting that silently does nothing (a user sets
`pairs.validation` for DPO and nothing happens). Each command's `run(cfg)` runs in-process at
tiny settings on a config whose dataclass instances record which of their fields are read
(`Recorder`); the keys read are compared with the keys --print-config shows.

What does not count as reading a key: code that touches every field without using it
(`dataclasses.asdict` / `fields` / the generated `__repr__` / `__eq__`, `copy`, omegaconf, the
config loader, dumper and `--print-config` printer in spo/config/, the schemas' own
`validate` checks, and the training loop's flattening of the config into hyperparameters and
resume-change lists). A read counts when no such frame is on the stack between the command's
`run` and the read, so `cfg.pairs.streams(...)` called by a command counts as reading
`pairs.streaming`, and the same call made by `validate` does not.

Keys only read on a branch (push_to_hub, full fine-tuning, streaming, the latent judge, an
hf_clip backbone, validation images) are covered by tiny runs that take that branch, not by
exemptions; the Hub calls are faked. The demo runs its own code with its stages stubbed (each
stage is a command checked here on its own; the real demo takes minutes).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import omegaconf
import pytest
import yaml
from helpers import compare_args, judge_training_args, spo_args

import spo.config
from spo.cli import COMMANDS
from spo.config import COMMAND_CONFIGS, command_config, commented_yaml

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG_DIR = Path(spo.config.__file__).resolve().parent
LOOP_FILE = str(CONFIG_DIR.parent / "training" / "loop.py")

# ------------------------------------------------------------------------------------------
# Which frames read a config without using it
# ------------------------------------------------------------------------------------------

_GENERIC_FILES = {str(Path(m.__file__).resolve()) for m in (dataclasses, copy)}
_GENERIC_DIRS = (str(Path(omegaconf.__file__).resolve().parent), str(CONFIG_DIR))
# Functions of spo/config/schemas.py that run a command's code, not a check: their reads count.
_SCHEMA_FILE = str(CONFIG_DIR / "schemas.py")
_SCHEMA_CHECKS = {"validate", "_validate_loop", "_validate_hub", "require_finite", "_require"}
# The training loop's dumps of the whole config (tracker hyperparameters, resume changes).
_LOOP_DUMPERS = {"_flat", "hyperparameters", "config_changes"}

_verdicts: dict[types.CodeType, bool] = {}


def _is_generic(code: types.CodeType) -> bool:
    """Whether a read made under this code object touches the config without using it."""
    name, file = code.co_name, code.co_filename
    if file == "<string>":  # dataclass-generated __repr__ / __eq__ / __init__
        return name.startswith("__")
    file = str(Path(file).resolve())
    if file in _GENERIC_FILES:
        return True
    if file == _SCHEMA_FILE:
        return name in _SCHEMA_CHECKS
    if file.startswith(_GENERIC_DIRS):
        return True
    return file == LOOP_FILE and name in _LOOP_DUMPERS


def _generic_caller(frame: types.FrameType | None) -> bool:
    """Whether any frame from `frame` up to the recorded run is generic (see the docstring)."""
    while frame is not None:
        code = frame.f_code
        if code is _recorded_run.__code__:
            return False
        verdict = _verdicts.get(code)
        if verdict is None:
            verdict = _verdicts[code] = _is_generic(code)
        if verdict:
            return True
        frame = frame.f_back
    return False


# ------------------------------------------------------------------------------------------
# The recorder
# ------------------------------------------------------------------------------------------


class Recorder:
    """Makes a loaded config record the dotted key of every field the command reads.

    Each dataclass instance in the config (sections, and the items of lists of sections such
    as `compare`'s `models`, whose keys are `models.<field>`) gets as its `__class__` a
    subclass, made here, whose `__getattribute__` notes the key. The subclass keeps the
    original's name, fields, docstring and methods, so `isinstance`, `dataclasses.fields`,
    `dataclasses.replace` and `load_config(type(cfg), ...)` work as before."""

    def __init__(self) -> None:
        self.reads: set[str] = set()
        self._classes: dict[tuple[type, str], type] = {}

    def wrap(self, obj: Any, prefix: str = "") -> Any:
        """Make `obj` (a dataclass instance) and every section in it record; returns `obj`."""
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            items = value if isinstance(value, list) else [value]
            for item in items:
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    self.wrap(item, f"{prefix}{f.name}.")
        obj.__class__ = self._recording_class(type(obj), prefix)
        return obj

    def _recording_class(self, cls: type, prefix: str) -> type:
        key = (cls, prefix)
        if key not in self._classes:
            names = frozenset(f.name for f in dataclasses.fields(cls))
            reads, read = self.reads, cls.__getattribute__

            def __getattribute__(obj: Any, name: str) -> Any:
                if name in names and not _generic_caller(sys._getframe(1)):
                    reads.add(prefix + name)
                return read(obj, name)

            namespace = {
                "__getattribute__": __getattribute__,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            }
            self._classes[key] = type(cls.__name__, (cls,), namespace)
        return self._classes[key]


def _recorded_run(run: Callable[[Any], int], cfg: Any) -> int:
    """Call `run(cfg)`; the stack walk of `_generic_caller` stops at this frame."""
    return run(cfg)


def shown_keys(cfg: Any) -> set[str]:
    """The leaf keys `--print-config` shows for `cfg` (a list of sections: `name.<field>`)."""

    def flat(value: Any, prefix: str) -> set[str]:
        if isinstance(value, dict):
            return set().union(*(flat(v, f"{prefix}{k}.") for k, v in value.items()))
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return set().union(*(flat(v, prefix) for v in value))
        return {prefix[:-1]}

    return flat(yaml.safe_load(commented_yaml(cfg)), "")


# ------------------------------------------------------------------------------------------
# Tiny runs of every command
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What the command lines are built from."""

    world: Path  # conftest's mini world (tiny SD pipeline, toy pairs, tiny CLIP config)
    tmp: Path  # this test's folder
    judge: Path  # an SPM folder for train-spo and benchmark (the toy SPM, untrained)
    hf_clip: Path  # a tiny transformers CLIP folder, and its tokenizer in `tokenizer/`


Argv = Callable[[Ctx, str], list[str]]  # (ctx, variant name) -> `spo ...` arguments


@dataclass(frozen=True)
class Variant:
    """One tiny run of a command; `hub`: with push_to_hub, the Hub calls faked."""

    name: str
    argv: Argv
    hub: bool = False


@dataclass(frozen=True)
class Check:
    """A command and its tiny runs: together they must read every key it shows."""

    command: str
    variants: tuple[Variant, ...]


TINY_HF_CLIP = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "max_position_embeddings": 16,
        "vocab_size": 49408,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": 16,
}


def _out(c: Ctx, variant: str) -> str:
    return str(c.tmp / variant)


def toy_world(c: Ctx, v: str) -> list[str]:
    small = ["train_pairs=6", "validation_pairs=4", "grid_prompts=1", "grid_images_per_prompt=1"]
    groups = ["group_pairs=6", "group_validation_pairs=4"]
    return ["toy-world", "--out", _out(c, v), *small, *groups, "num_inference_steps=2"]


def spm_pixel(c: Ctx, v: str) -> list[str]:
    """The pixel SPM on an hf_clip backbone (the only one that reads backbone.tokenizer),
    relabelled, validated periodically, past its warm-up (else lr_schedule is never asked)."""
    return judge_training_args(
        c.world,
        Path(_out(c, v)),
        "backbone.family=hf_clip",
        f"backbone.model={c.hf_clip}",
        f"backbone.tokenizer={c.hf_clip / 'tokenizer'}",
        "optim.warmup_steps=1",
        "max_steps=2",
        "validation_every=1",
        "validation_pairs_periodic=4",
        "pairs.max_validation_pairs=4",
        "pairs.relabel_tie_gap=0.1",
        "validation_timesteps=[0]",
    )


def grouped(c: Ctx, split: str) -> Path:
    """The mini world's pairs of `split` with a `group` column (A, B, A, ...): annotators."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.tmp / f"grouped_{split}.parquet"
    if not path.is_file():
        table = pq.read_table(c.world / f"pairs/{split}.parquet")
        groups = pa.array(["A" if i % 2 == 0 else "B" for i in range(table.num_rows)])
        pq.write_table(table.append_column("group", groups), path)
    return path


GROUP_A = ("pairs.annotators.column=group", "pairs.annotators.ids=[A]")


def spm_latent_streamed(c: Ctx, v: str) -> list[str]:
    """The latent judge (its `latent` section), on streamed pairs (`shuffle_buffer`) of one
    annotator group."""
    return judge_training_args(
        c.world,
        Path(_out(c, v)),
        f"pairs.train={grouped(c, 'train')}",
        f"pairs.validation={grouped(c, 'validation')}",
        *GROUP_A,
        "judge=latent",
        "latent.projection_dim=16",
        "max_steps=2",
        "pairs.streaming=true",
        "pairs.shuffle_buffer=8",
        "pairs.max_validation_pairs=4",
        "validation_timesteps=[0]",
    )


VALIDATION_IMAGES = (
    "validation_images.prompts=[a red circle on a white background]",
    "validation_images.num_inference_steps=2",
    "validation_images.every=1",
)


def dpo(c: Ctx, v: str, *extra: str) -> list[str]:
    """test_bad_inputs' tiny DPO run, with validation images (their keys are read only when
    there are prompts) and past the warm-up."""
    return [
        "train-dpo",
        "--out",
        _out(c, v),
        f"base_model={c.world / 'base_model'}",
        f"pairs.train={c.world / 'pairs/train.parquet'}",
        "batch_size=2",
        "max_steps=2",
        "log_every=1",
        "checkpoint_every=1",
        "optim.warmup_steps=1",  # past the warm-up: the lr schedule is asked
        *VALIDATION_IMAGES,
        *extra,
    ]


def dpo_full_streamed(c: Ctx, v: str) -> list[str]:
    """Full fine-tuning (`policy.reference_offload`), streamed pairs, pushed to the Hub."""
    extra = ("policy.mode=full", "pairs.streaming=true", "pairs.shuffle_buffer=8")
    group = (f"pairs.train={grouped(c, 'train')}", *GROUP_A)  # one annotator group's pairs
    return dpo(c, v, *extra, *group, "push_to_hub=true", "hub_model_id=spo-tests/dpo")


def spo_lora(c: Ctx, v: str) -> list[str]:
    """On the prompts of one annotator group's pairs."""
    group = (f"prompts={grouped(c, 'train')}", "prompt_annotators.column=group")
    group += ("prompt_annotators.ids=[A]", "max_prompts=4")
    return spo_args(c.world, c.judge, Path(_out(c, v)), *VALIDATION_IMAGES, "max_epochs=1", *group)


def spo_full(c: Ctx, v: str) -> list[str]:
    """Full fine-tuning, one step, pushed to the Hub (`hub_model_id`)."""
    return spo_args(
        c.world,
        c.judge,
        Path(_out(c, v)),
        "max_epochs=1",
        "max_steps=1",
        "policy.mode=full",
        "push_to_hub=true",
        "hub_model_id=spo-tests/spo",
    )


def spo_flow(c: Ctx, v: str) -> list[str]:
    """A flow model (the tiny SD3 pipeline): its SDE step reads `sampler.noise_level`."""
    from tiny_pipelines import build_tiny_sd3

    base = c.tmp / "sd3"
    if not base.exists():
        build_tiny_sd3(base)
    return spo_args(
        c.world,
        c.judge,
        Path(_out(c, v)),
        "max_epochs=1",
        "max_steps=1",
        "policy.lora_targets=[attn.to_q]",
        base=base,
    )


def compare(c: Ctx, v: str) -> list[str]:
    prompts = c.tmp / "prompts.jsonl"
    prompts.write_text(
        '{"caption": "a red circle on a white background", "category": "circle"}\n'
        '{"caption": "a green cross on a black background", "category": "cross"}\n'
    )
    model = f"{{name: base, pipeline: {c.world / 'base_model'}}}"
    small = ("images_per_prompt=1", "num_inference_steps=2", "bootstrap=10", "grid_prompts=1")
    return compare_args(Path(_out(c, v)), prompts, [model], *small)


def compare_edit(c: Ctx, v: str) -> list[str]:
    """SDEdit of two sources from a folder with its prompts file (the toy layouts' format)."""
    from PIL import Image

    layouts = c.tmp / "layouts"
    layouts.mkdir(exist_ok=True)
    for name, colour in (("0.png", (200, 30, 30)), ("1.png", (30, 200, 30))):
        Image.new("RGB", (16, 16), colour).save(layouts / name)
    prompts = layouts / "captions.txt"
    prompts.write_text("a red circle on a white background\na green cross on a black background\n")
    model = f"{{name: base, pipeline: {c.world / 'base_model'}}}"
    small = ("images_per_prompt=1", "num_inference_steps=4", "bootstrap=10", "grid_prompts=1")
    edit = ("task=edit", f"edit.sources={layouts}", f"edit.prompts_file={prompts}")
    edit += ("edit.strength=0.5", "edit.fidelity_blocks=4")
    return compare_args(Path(_out(c, v)), prompts, [model], *small, *edit)


def compare_edit_table(c: Ctx, v: str) -> list[str]:
    """SDEdit of the sources in a parquet table's image and prompt columns."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 30, 200)).save(buffer, format="PNG")
    rows = [{"picture": buffer.getvalue(), "caption": "a blue square on a gray background"}]
    table = c.tmp / "sources.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    model = f"{{name: base, pipeline: {c.world / 'base_model'}}}"
    small = ("images_per_prompt=1", "num_inference_steps=4", "bootstrap=10", "grid_prompts=1")
    edit = ("task=edit", f"edit.sources={table}", "edit.image_column=picture")
    return compare_args(Path(_out(c, v)), table, [model], *small, *edit)


def prepare_prompts(c: Ctx, v: str) -> list[str]:
    source = f"source={c.world / 'pairs/train.parquet'}"
    return ["prepare-prompts", "--out", str(c.tmp / "prompts.txt"), source, "num_prompts=4"]


def benchmark(c: Ctx, v: str) -> list[str]:
    """The mini world's pipeline and the toy SPM: the tiny preset's random models are slower."""
    small = ["prompts=1", "num_steps=2", "repeats=1", "dpo_lora_batch=1", "dpo_full_batch=1"]
    models = [f"pipeline={c.world / 'base_model'}", f"spm={c.judge}"]
    return ["benchmark", "--out", _out(c, v), *small, *models]


def demo(c: Ctx, v: str) -> list[str]:
    return ["demo", "--quick", "--out", _out(c, v)]


CHECKS = [
    Check("toy-world", (Variant("world", toy_world),)),
    Check(
        "train-preference-model",
        (Variant("pixel", spm_pixel), Variant("latent-streamed", spm_latent_streamed)),
    ),
    Check(
        "train-dpo",
        (Variant("lora", dpo), Variant("full-streamed-hub", dpo_full_streamed, hub=True)),
    ),
    Check(
        "train-spo",
        (
            Variant("lora", spo_lora),
            Variant("full-hub", spo_full, hub=True),
            Variant("flow", spo_flow),
        ),
    ),
    Check(
        "compare",
        (
            Variant("base", compare),
            Variant("edit", compare_edit),
            Variant("edit-table", compare_edit_table),
        ),
    ),
    Check("prepare-prompts", (Variant("draw", prepare_prompts),)),
    Check("benchmark", (Variant("tiny", benchmark),)),
    Check("demo", (Variant("quick", demo),)),
]


def load(argv: list[str]) -> tuple[str, Any]:
    """(command, its validated config) of `spo` arguments, as `spo.cli.main` loads them."""
    command, rest = argv[0], argv[1:]
    config = out = None
    overrides = []
    while rest:
        token, rest = rest[0], rest[1:]
        if token in ("--config", "--out"):
            value, rest = rest[0], rest[1:]
            config, out = (value, out) if token == "--config" else (config, value)
        elif token == "--quick":
            overrides.append("quick=true")
        else:
            overrides.append(token)
    return command, command_config(command, config, overrides, out)


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """An Accelerator made by one run must not leak into the next."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers CLIP folder, its tokenizer in a folder of its own."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from spo.toy.text import build_tokenizer

    folder = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig.from_dict(TINY_HF_CLIP)).save_pretrained(folder)
    build_tokenizer(model_max_length=16).save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained toy SPM folder: the judge of train-spo and of benchmark."""
    import preference_model

    folder = tmp_path_factory.mktemp("judge") / "spm"
    preference_model.toy_spm().save(folder)
    return folder


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """push_to_hub without a network: the token check passes, uploads are recorded."""
    import spo.training.loop

    pushed: list[str] = []

    def push(folder: Path, repo_id: str) -> str:
        pushed.append(repo_id)
        return repo_id

    monkeypatch.setattr(spo.training.loop, "check_hub_token", lambda: None)
    monkeypatch.setattr(spo.training.loop, "push_folder", push)
    return pushed


@pytest.fixture
def stub_demo_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The demo's stages replaced by stubs (the real ones take minutes and are each checked
    here as their own command): the demo's own code still runs, reading its own keys; the
    compare stub writes the results.json the demo's headline is made from."""
    import spo.commands.demo as demo_module

    ran: list[str] = []

    def stub(stage: str) -> Callable[[Any], int]:
        def run(cfg: Any) -> int:
            ran.append(stage)
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            if stage.startswith("compare"):
                entry = {"mean": 0.5, "ci95": [0.4, 0.6]}
                results = {"scores": {"base": {"oracle": entry}}, "win_rates": {}}
                (out / "results.json").write_text(json.dumps(results))
            return 0

        return run

    runners = {stage: stub(stage) for stage in demo_module.RUNNERS}
    monkeypatch.setattr(demo_module, "RUNNERS", runners)
    return ran


# ------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------


def test_every_command_is_checked() -> None:
    """A new command must get its tiny runs here."""
    assert {c.command for c in CHECKS} == set(COMMANDS) == set(COMMAND_CONFIGS)


def test_recorder_records_leaf_reads_and_ignores_generic_code(tmp_path: Path) -> None:
    """The recorder itself: a command's read counts, a dump, validate() or a section alone
    does not, and the config still behaves as its own class (a resumed trainer reloads its
    recorded config.yaml with `load_config(type(cfg), ...)`)."""
    from spo.config import CompareConfig, DPOTrainConfig, dump_config, load_config

    recorder = Recorder()
    cfg = recorder.wrap(command_config("train-dpo", None, [], None))

    def command(cfg: DPOTrainConfig) -> int:
        (tmp_path / "config.yaml").write_text(dump_config(cfg))
        assert isinstance(load_config(type(cfg), tmp_path / "config.yaml"), DPOTrainConfig)
        dataclasses.asdict(cfg)
        copy.deepcopy(cfg)
        cfg.validate()
        repr(cfg)
        assert isinstance(cfg, DPOTrainConfig) and type(cfg).__name__ == "DPOTrainConfig"
        assert dataclasses.replace(cfg.optim, lr=1.0).lr == 1.0
        assert cfg.pairs.streams(cfg.pairs.train) is False
        return cfg.beta > 0

    assert _recorded_run(command, cfg)
    # optim.lr: read from the copy `replace` made, which records like the original
    expected = {"pairs", "pairs.streaming", "pairs.train", "beta", "optim", "optim.lr"}
    assert recorder.reads == expected

    compare_recorder = Recorder()
    cmp = compare_recorder.wrap(command_config("compare", None, [], None))
    assert _recorded_run(lambda c: [m.lora for m in c.models] and c.base_model, cmp) == "base"
    assert compare_recorder.reads == {"models", "models.lora", "models.name", "base"}
    assert isinstance(cmp, CompareConfig)


@pytest.mark.parametrize("check", CHECKS, ids=[c.command for c in CHECKS])
def test_every_shown_config_key_is_read(
    check: Check,
    mini_world: Path,
    judge: Path,
    hf_clip: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Run every variant of `check` with a recording config; no shown key may go unread."""
    monkeypatch.chdir(tmp_path)  # a stray default `runs/...` lands here, not in the repo
    ctx = Ctx(mini_world, tmp_path, judge, hf_clip)
    module = importlib.import_module(COMMANDS[check.command].module)
    stubbed = request.getfixturevalue("stub_demo_stages") if check.command == "demo" else None
    shown: set[str] = set()
    read: set[str] = set()
    for variant in check.variants:
        pushed = request.getfixturevalue("fake_hub") if variant.hub else None
        command, cfg = load(variant.argv(ctx, variant.name))
        assert command == check.command
        shown |= shown_keys(cfg)
        recorder = Recorder()
        reset_accelerate()
        assert _recorded_run(module.run, recorder.wrap(cfg)) == 0, variant.name
        read |= recorder.reads
        if pushed is not None:
            assert pushed, f"{variant.name}: push_to_hub did not upload"
    if stubbed is not None:
        assert stubbed == list(module.STAGES), "the demo did not reach every stage"
    assert shown, "no keys shown"
    unread = sorted(shown - read)
    assert not unread, (
        f"`spo {check.command} --print-config` shows keys that the command never reads "
        f"(runs: {', '.join(v.name for v in check.variants)}): {', '.join(unread)}"
    )

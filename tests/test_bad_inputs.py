"""Bad input to every `spo` command: one `spo: error:` line, exit code 2, nothing changed, and
no model loaded.

Each case runs `spo.cli.main(argv)` once and checks the CLI contract:

1. the exit code is 2;
2. stderr is exactly one line starting `spo: error:` (no traceback);
3. nothing that existed before was changed (the shared mini world, this module's input files
   and the case's own tmp folder are snapshot before and after), and an `--out` folder that did
   not exist is not created (nor anything added to one that did: another command's run folder,
   a folder no command made);
4. no model was loaded: every model-loading entry point raises AssertionError("model loaded")
   and records the call, so an input that is only caught by a loader (or not at all) fails.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import judge_training_args, spo_args
from safetensors.torch import save_file
from tiny_pipelines import build_tiny_flux, build_tiny_sd3

from spo.cli import COMMANDS, main
from spo.config import COMMAND_CONFIGS, dump_config
from spo.runs import prepare_run_dir

ROOT = Path(__file__).parents[1]
TOY = ROOT / "configs/toy"


@dataclass(frozen=True)
class Ctx:
    """What a case's command line is built from."""

    world: Path  # the shared mini world (conftest `mini_world`); must stay untouched
    inputs: Path  # this module's input files (good and bad); must stay untouched
    tmp: Path  # the case's own folder (its `out` lives here)

    @property
    def out(self) -> Path:
        return self.tmp / "out"


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    out_exists: bool = False  # `out` exists (with a file in it) before the run
    setup: Callable[[Ctx], None] | None = None  # more preparation of the case's folder
    skip_as_root: bool = False  # permissions do not stop root
    hub_unreachable: bool = False  # the Hub's address answers nothing (a closed local port)


# ------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------


def toy_world(c: Ctx, *extra: str) -> list[str]:
    return ["toy-world", "--out", str(c.out), *extra]


def spm_train(c: Ctx, *extra: str) -> list[str]:
    return judge_training_args(c.world, c.out, *extra)


def dpo(c: Ctx, *extra: str) -> list[str]:
    return [
        "train-dpo",
        "--config",
        str(TOY / "dpo.yaml"),
        "--out",
        str(c.out),
        f"base_model={c.world / 'base_model'}",
        f"pairs.train={c.world / 'pairs/train.parquet'}",
        "batch_size=2",
        "max_steps=2",
        "checkpoint_every=1",
        *extra,
    ]


def spo(c: Ctx, *extra: str, spm: str = "spm") -> list[str]:
    return spo_args(c.world, c.inputs / spm, c.out, *extra)


def edit(c: Ctx, *extra: str) -> list[str]:
    """The editing comparison of two good layouts (each case spoils one input)."""
    return compare(c, "task=edit", f"edit.sources={c.inputs / 'layouts'}", *extra)


def compare(c: Ctx, *extra: str) -> list[str]:
    return [
        "compare",
        "--config",
        str(TOY / "compare.yaml"),
        "--out",
        str(c.out),
        f"prompts={c.inputs / 'prompts.jsonl'}",
        f"models=[{{name: base, pipeline: {c.world / 'base_model'}}}]",
        "scorers=[oracle]",
        "images_per_prompt=1",
        "num_inference_steps=2",
        "bootstrap=10",
        "grid_prompts=1",
        *extra,
    ]


def prepare_prompts(c: Ctx, *extra: str) -> list[str]:
    return [
        "prepare-prompts",
        "--out",
        str(c.out),
        f"source={c.world / 'pairs/train.parquet'}",
        "num_prompts=4",
        *extra,
    ]


def demo(c: Ctx, *extra: str) -> list[str]:
    return ["demo", "--quick", "--out", str(c.out), *extra]


def benchmark(c: Ctx, *extra: str) -> list[str]:
    return ["benchmark", "--out", str(c.out), "prompts=1", "num_steps=2", "repeats=1", *extra]


def under_file(c: Ctx) -> str:
    """An `--out` whose parent is a regular file: unwritable, also for root."""
    return f"--out={c.inputs / 'a_file' / 'run'}"


def make_read_only_parent(c: Ctx) -> None:
    (c.tmp / "ro").mkdir()
    (c.tmp / "ro").chmod(0o555)


def in_read_only(c: Ctx) -> str:
    return f"--out={c.tmp / 'ro' / 'run'}"


def ids_and_file(c: Ctx) -> tuple[str, str]:
    return "pairs.annotators.ids=[1]", f"pairs.annotators.file={c.inputs / 'pairs.txt'}"


def spm_model(c: Ctx, folder: str) -> str:
    return f"'spm:{c.inputs / folder}'"


ASTRONAUT = "a photo of an astronaut riding a horse"
LATIN1 = "a red circle on a white background\ncaf\xe9 au lait on a black background\n"

# Every command that makes a run folder, with its command line in a case (`out` is its --out).
RUN_COMMANDS: dict[str, Callable[..., list[str]]] = {
    "toy-world": toy_world,
    "train-preference-model": spm_train,
    "train-dpo": dpo,
    "train-spo": spo,
    "compare": compare,
    "demo": demo,
    "benchmark": benchmark,
}


def run_folder_of(command: str, legacy: bool = False) -> Callable[[Ctx], None]:
    """`out` made a run folder of `command` as the command makes it (its marker and config;
    `legacy`: config.yaml alone, as before the marker), holding a result the user keeps."""

    def setup(c: Ctx) -> None:
        cfg = COMMAND_CONFIGS[command]()
        if legacy:
            (c.out / "config.yaml").write_text(dump_config(cfg))
        else:
            prepare_run_dir(c.out, cfg)
        (c.out / "result.json").write_text('{"kept": true}\n')

    return setup


def user_folder(c: Ctx) -> None:
    """`out` is a folder of the user's own: not empty, made by no command."""
    (c.out / "thesis.tex").write_text("\\documentclass{article}\n")


def inside_run(c: Ctx, *path: str) -> str:
    return "--out=" + str(c.out.joinpath(*path))


def matrix_cases() -> list[Case]:
    """Every run-folder command with another command's run folder as --out, and
    prepare-prompts writing its file into each command's folder."""
    cases = []
    for command, argv in RUN_COMMANDS.items():
        for owner in RUN_COMMANDS:
            if owner != command:
                cases.append(
                    C(
                        f"out-{command}-into-{owner}-run",
                        lambda c, argv=argv: argv(c),
                        out_exists=True,
                        setup=run_folder_of(owner),
                    )
                )
        cases.append(
            C(
                f"out-prepare-prompts-into-{command}-run",
                lambda c: prepare_prompts(c, inside_run(c, "prompts.txt")),
                out_exists=True,
                setup=run_folder_of(command),
            )
        )
        cases.append(
            C(
                f"out-{command}-into-a-user-folder",
                lambda c, argv=argv: argv(c),
                out_exists=True,
                setup=user_folder,
            )
        )
        cases.append(
            C(
                f"out-{command}-under-sys",
                lambda c, argv=argv: argv(c, "--out=/sys/spo-run"),
            )
        )
    return cases


C = Case
CASES: list[Case] = [
    # --- the command line itself --------------------------------------------------------------
    C("cli-unknown-command", lambda c: ["frobnicate", "--out", str(c.out)]),
    C("cli-unknown-flag", lambda c: dpo(c, "--no-such-flag")),
    # --- toy-world ----------------------------------------------------------------------------
    C("toy-world-unknown-key", lambda c: toy_world(c, "trian_pairs=5")),
    C("toy-world-train-pairs-0", lambda c: toy_world(c, "train_pairs=0")),
    C("toy-world-config-not-found", lambda c: toy_world(c, f"--config={c.inputs / 'nope.yaml'}")),
    C("toy-world-config-invalid-yaml", lambda c: toy_world(c, f"--config={c.inputs / 'bad.yaml'}")),
    C("toy-world-config-is-a-list", lambda c: toy_world(c, f"--config={c.inputs / 'list.yaml'}")),
    C("toy-world-out-under-file", lambda c: toy_world(c, under_file(c))),
    # --- train-preference-model ---------------------------------------------------------------
    C("spm-fp16-on-cpu", lambda c: spm_train(c, "mixed_precision=fp16")),
    C("spm-pairs-train-txt", lambda c: spm_train(c, f"pairs.train={c.inputs / 'pairs.txt'}")),
    C(
        "spm-pairs-validation-missing",
        lambda c: spm_train(c, f"pairs.validation={c.inputs / 'no.parquet'}"),
    ),
    C("spm-base-model-missing", lambda c: spm_train(c, f"base_model={c.inputs / 'no_model'}")),
    C(
        "spm-base-model-missing-toy-path",
        lambda c: spm_train(c, f"base_model={c.inputs / 'runs/toy/world/base_model'}"),
    ),
    C(
        "spm-base-model-not-a-pipeline",
        lambda c: spm_train(c, f"base_model={c.inputs / 'empty_dir'}"),
    ),
    C("spm-resume-missing", lambda c: spm_train(c, f"resume={c.inputs / 'no_checkpoint'}")),
    C("spm-max-steps-negative", lambda c: spm_train(c, "max_steps=-3")),
    C(
        "spm-annotator-selects-no-pair",
        lambda c: spm_train(
            c, f"pairs.train={c.inputs / 'users.parquet'}", "pairs.annotators.ids=[7]"
        ),
    ),
    C("spm-annotators-ids-and-file", lambda c: spm_train(c, *ids_and_file(c))),
    C(
        "dpo-annotator-selects-no-pair",
        lambda c: dpo(c, f"pairs.train={c.inputs / 'users.parquet'}", "pairs.annotators.ids=[7]"),
    ),
    C(
        "dpo-annotator-column-missing",
        lambda c: dpo(c, "pairs.annotators.ids=[1]"),  # the mini world's pairs have no user_id
    ),
    C(
        "dpo-annotator-file-missing",
        lambda c: dpo(c, f"pairs.annotators.file={c.inputs / 'no_ids.txt'}"),
    ),
    C(
        "spo-prompt-annotators-on-a-prompt-file",
        lambda c: spo(c, f"prompts={c.inputs / 'pairs.txt'}", "prompt_annotators.ids=[1]"),
    ),
    C(
        "spo-prompt-annotator-selects-no-pair",
        lambda c: spo(c, f"prompts={c.inputs / 'users.parquet'}", "prompt_annotators.ids=[7]"),
    ),
    C(
        "spm-backbone-json-missing",
        lambda c: spm_train(c, f"backbone.model={c.inputs / 'no_clip.json'}"),
    ),
    # --- train-dpo ----------------------------------------------------------------------------
    C("dpo-fp16-on-cpu", lambda c: dpo(c, "mixed_precision=fp16")),
    C("dpo-lora-targets-nonexistent", lambda c: dpo(c, "policy.lora_targets=[nonexistent]")),
    C("dpo-validation-steps-0", lambda c: dpo(c, "validation_images.num_inference_steps=0")),
    C("dpo-max-minutes-0", lambda c: dpo(c, "max_minutes=0")),
    C("dpo-max-minutes-neg5", lambda c: dpo(c, "max_minutes=-5")),
    C("dpo-max-grad-norm-nan", lambda c: dpo(c, "optim.max_grad_norm=nan")),
    C("dpo-beta-scale-inf", lambda c: dpo(c, "beta_scale=inf")),
    C("dpo-lr-negative", lambda c: dpo(c, "optim.lr=-1")),
    C("dpo-batch-size-0", lambda c: dpo(c, "batch_size=0")),
    C("dpo-max-steps-abc", lambda c: dpo(c, "max_steps=abc")),
    C(
        "dpo-unknown-key-in-config-file",
        lambda c: dpo(c, f"--config={c.inputs / 'typo.yaml'}"),
    ),
    C("dpo-pairs-train-txt", lambda c: dpo(c, f"pairs.train={c.inputs / 'pairs.txt'}")),
    C("dpo-pairs-train-missing", lambda c: dpo(c, f"pairs.train={c.inputs / 'no.parquet'}")),
    C(
        "dpo-pairs-missing-columns",
        lambda c: dpo(c, f"pairs.train={c.inputs / 'columns.parquet'}"),
    ),
    C(
        "dpo-pairs-undecodable",
        lambda c: dpo(c, f"pairs.train={c.inputs / 'undecodable.parquet'}"),
    ),
    C("dpo-base-model-missing", lambda c: dpo(c, f"base_model={c.inputs / 'no_model'}")),
    C(
        "dpo-resume-missing",
        lambda c: dpo(c, f"resume={c.inputs / 'no_checkpoint'}"),
        out_exists=True,
        setup=run_folder_of("train-dpo"),
    ),
    C(
        "dpo-relabel-with-truncated-spm",
        lambda c: dpo(c, f"relabel_with=spm:{c.inputs / 'spm_truncated'}"),
    ),
    C(
        "dpo-validation-prompts-file-missing",
        lambda c: dpo(c, f"validation_images.prompts_file={c.inputs / 'no_prompts.txt'}"),
    ),
    C("dpo-out-under-file", lambda c: dpo(c, under_file(c))),
    C("dpo-shuffle-buffer-0", lambda c: dpo(c, "pairs.shuffle_buffer=0")),
    C("dpo-compile-unknown", lambda c: dpo(c, "speed.compile=everything")),
    C("dpo-latent-cache-dir-blank", lambda c: dpo(c, "latent_cache_dir=' '")),
    C(
        "dpo-latent-cache-dir-under-file",
        lambda c: dpo(c, f"latent_cache_dir={c.inputs / 'pairs.txt'}/cache"),
    ),
    C(
        "dpo-relabel-while-streaming",
        lambda c: dpo(c, "pairs.streaming=true", "relabel_with=oracle"),
    ),
    C(
        "dpo-out-in-read-only-dir",
        lambda c: dpo(c, in_read_only(c)),
        setup=make_read_only_parent,
        skip_as_root=True,
    ),
    # --- train-spo ----------------------------------------------------------------------------
    C("spo-truncated-spm", lambda c: spo(c, spm="spm_truncated")),
    C("spo-fp16-on-cpu", lambda c: spo(c, "mixed_precision=fp16")),
    C("spo-compile-unknown", lambda c: spo(c, "speed.compile=max-autotune")),
    C("spo-lora-targets-nonexistent", lambda c: spo(c, "policy.lora_targets=[nonexistent]")),
    C(
        "spo-validation-steps-0",
        lambda c: spo(
            c,
            "validation_images.prompts=[a red circle on a white background]",
            "validation_images.num_inference_steps=0",
        ),
    ),
    C("spo-max-prompts-0", lambda c: spo(c, "max_prompts=0")),
    C("spo-max-prompts-neg1", lambda c: spo(c, "max_prompts=-1")),
    C("spo-sampler-guidance-nan", lambda c: spo(c, "sampler.guidance_scale=nan")),
    C("spo-max-minutes-0", lambda c: spo(c, "max_minutes=0")),
    C("spo-max-minutes-neg5", lambda c: spo(c, "max_minutes=-5")),
    C("spo-max-grad-norm-nan", lambda c: spo(c, "optim.max_grad_norm=nan")),
    C("spo-spm-missing", lambda c: spo(c, spm="no_spm")),
    C("spo-spm-is-a-pipeline", lambda c: spo(c, f"spm={c.world / 'base_model'}")),
    C("spo-prompts-empty", lambda c: spo(c, f"prompts={c.inputs / 'empty.txt'}")),
    C("spo-base-model-missing", lambda c: spo(c, f"base_model={c.inputs / 'no_model'}")),
    C(
        "spo-resume-missing",
        lambda c: spo(c, f"resume={c.inputs / 'no_checkpoint'}"),
        out_exists=True,
        setup=run_folder_of("train-spo"),
    ),
    C("spo-out-under-file", lambda c: spo(c, under_file(c))),
    # --- compare ------------------------------------------------------------------------------
    C(
        "compare-truncated-spm",
        lambda c: compare(c, f"scorers=[oracle, {spm_model(c, 'spm_truncated')}]"),
    ),
    C("compare-max-prompts-0", lambda c: compare(c, "max_prompts=0")),
    C(
        "compare-oracle-outside-toy-grammar",
        lambda c: compare(c, f"prompts={c.inputs / 'astronaut.txt'}"),
    ),
    C("compare-guidance-nan", lambda c: compare(c, "guidance_scale=nan")),
    C(
        "compare-pipeline-missing",
        lambda c: compare(c, f"models=[{{name: a, pipeline: {c.inputs / 'no_model'}}}]"),
    ),
    C(
        "compare-lora-missing",
        lambda c: compare(
            c,
            f"models=[{{name: a, pipeline: {c.world / 'base_model'}, "
            f"lora: {c.inputs / 'no_lora'}}}]",
        ),
    ),
    C("compare-prompts-missing", lambda c: compare(c, f"prompts={c.inputs / 'no_prompts.txt'}")),
    C(
        "compare-duplicate-model-names",
        lambda c: compare(
            c,
            f"models=[{{name: a, pipeline: {c.world / 'base_model'}}}, "
            f"{{name: a, pipeline: {c.world / 'base_model'}}}]",
        ),
    ),
    C("compare-unknown-scorer", lambda c: compare(c, "scorers=[oracle, nope]")),
    C("compare-edit-strength-0", lambda c: edit(c, "edit.strength=0")),
    C("compare-edit-strength-above-1", lambda c: edit(c, "edit.strength=1.5")),
    C("compare-edit-task-unknown", lambda c: compare(c, "task=inpaint")),
    C(
        "compare-edit-source-undecodable",
        lambda c: edit(c, f"edit.sources={c.inputs / 'layouts_undecodable'}"),
    ),
    C(
        "compare-edit-prompts-not-one-per-image",
        lambda c: edit(c, f"edit.prompts_file={c.inputs / 'pairs.txt'}"),
    ),
    C(
        "compare-edit-table-row-undecodable",
        lambda c: edit(c, f"edit.sources={c.inputs / 'columns.parquet'}"),
    ),
    C("compare-out-under-file", lambda c: compare(c, under_file(c))),
    # --- prepare-prompts ----------------------------------------------------------------------
    C("prepare-prompts-num-0", lambda c: prepare_prompts(c, "num_prompts=0")),
    C(
        "prepare-prompts-source-missing",
        lambda c: prepare_prompts(c, f"source={c.inputs / 'no.parquet'}"),
    ),
    C(
        "prepare-prompts-too-few-captions",
        lambda c: prepare_prompts(c, f"source={c.inputs / 'prompts.jsonl'}"),
    ),
    C("prepare-prompts-out-under-file", lambda c: prepare_prompts(c, under_file(c))),
    # --- demo ---------------------------------------------------------------------------------
    C("demo-budget-0", lambda c: demo(c, "budget_minutes=0")),
    C("demo-spm-precision-unknown", lambda c: demo(c, "spm_precision=fp16")),
    C("demo-unknown-key", lambda c: demo(c, "budget_minute=1")),
    C("demo-out-under-file", lambda c: demo(c, under_file(c))),
    # --- benchmark ----------------------------------------------------------------------------
    C("bench-preset-nonexistent", lambda c: benchmark(c, "--preset", "sd3")),
    C("bench-baseline-unknown", lambda c: benchmark(c, "--baseline", "original")),
    C("bench-peak-tflops-nan", lambda c: benchmark(c, "peak_tflops=nan")),
    C("bench-pipeline-missing", lambda c: benchmark(c, f"pipeline={c.inputs / 'no_model'}")),
    C("bench-truncated-spm", lambda c: benchmark(c, f"spm={c.inputs / 'spm_truncated'}")),
    C("bench-out-under-file", lambda c: benchmark(c, under_file(c))),
    # --- a folder that another run's command only reads is never written into -----------------
    C(
        "out-compare-inside-a-dpo-result",
        lambda c: compare(c, inside_run(c, "final", "report")),
        out_exists=True,
        setup=run_folder_of("train-dpo"),
    ),
    C(
        "out-spo-inside-its-spm",
        lambda c: spo(c, inside_run(c, "final")),
        out_exists=True,
        setup=run_folder_of("train-preference-model"),
    ),
    C(
        "out-dpo-into-a-legacy-spm-run",
        lambda c: dpo(c),
        out_exists=True,
        setup=run_folder_of("train-preference-model", legacy=True),
    ),
    C(
        "out-toy-world-into-a-legacy-dpo-run",
        lambda c: toy_world(c),
        out_exists=True,
        setup=run_folder_of("train-dpo", legacy=True),
    ),
    # --- judges are typed where they are used --------------------------------------------------
    C(
        "compare-latent-judge-as-spm-scorer",
        lambda c: compare(c, f"scorers=[oracle, {spm_model(c, 'latent_judge')}]"),
    ),
    C(
        "dpo-relabel-with-latent-judge",
        lambda c: dpo(c, f"relabel_with=spm:{c.inputs / 'latent_judge'}"),
    ),
    C(
        "dpo-validation-scorer-latent-judge",
        lambda c: dpo(c, f"validation_images.scorers=[spm:{c.inputs / 'latent_judge'}]"),
    ),
    C("dpo-best-by-the-oracle", lambda c: dpo(c, "validation_images.select_by=oracle")),
    C("dpo-best-by-an-unlisted-scorer", lambda c: dpo(c, "validation_images.select_by=hpsv2")),
    C(
        "dpo-patience-without-best",
        lambda c: dpo(c, "validation_images.select_by=null", "validation_images.patience=2"),
    ),
    C(
        "dpo-validation-scorer-twice",
        lambda c: dpo(c, "validation_images.scorers=[oracle,toy_pickscore,oracle]"),
    ),
    C("bench-latent-judge-as-spm", lambda c: benchmark(c, f"spm={c.inputs / 'latent_judge'}")),
    C("spo-pixel-judge-given-latent", lambda c: spo(c, "judge=latent")),
    C("spo-latent-judge-given-pixel", lambda c: spo(c, spm="latent_judge")),
    C("spo-judge-of-another-family", lambda c: spo(c, spm="spm_sdxl")),
    # --- text files that are not UTF-8 ---------------------------------------------------------
    C("spo-prompts-latin1", lambda c: spo(c, f"prompts={c.inputs / 'latin1.txt'}")),
    C("compare-prompts-latin1", lambda c: compare(c, f"prompts={c.inputs / 'latin1.txt'}")),
    C(
        "prepare-prompts-source-latin1",
        lambda c: prepare_prompts(c, f"source={c.inputs / 'latin1.txt'}"),
    ),
    C(
        "dpo-validation-prompts-file-latin1",
        lambda c: dpo(c, f"validation_images.prompts_file={c.inputs / 'latin1.txt'}"),
    ),
    C("dpo-config-file-latin1", lambda c: dpo(c, f"--config={c.inputs / 'latin1.yaml'}")),
    # --- Hub-shaped names the Hub cannot serve -------------------------------------------------
    C(
        "hub-spm-base-model",
        lambda c: spm_train(c, "base_model=no-org/no-model"),
        hub_unreachable=True,
    ),
    C("hub-dpo-base-model", lambda c: dpo(c, "base_model=no-org/no-model"), hub_unreachable=True),
    C("hub-dpo-vae", lambda c: dpo(c, "vae=no-org/no-vae"), hub_unreachable=True),
    C("hub-spo-base-model", lambda c: spo(c, "base_model=no-org/no-model"), hub_unreachable=True),
    C(
        "hub-compare-pipeline",
        lambda c: compare(c, "models=[{name: a, pipeline: no-org/no-model}]"),
        hub_unreachable=True,
    ),
    C(
        "hub-bench-pipeline",
        lambda c: benchmark(c, "pipeline=no-org/no-model"),
        hub_unreachable=True,
    ),
    # --- keys a command never read, and the smaller things -------------------------------------
    C(
        "dpo-pairs-validation-is-no-dpo-key",
        lambda c: dpo(c, f"pairs.validation={c.inputs / 'no.parquet'}"),
    ),
    C("dpo-max-validation-pairs-is-no-dpo-key", lambda c: dpo(c, "pairs.max_validation_pairs=4")),
    C("compare-grid-prompts-neg1", lambda c: compare(c, "grid_prompts=-1")),
    C("out-prepare-prompts-under-sys", lambda c: prepare_prompts(c, "--out=/sys/spo-prompts.txt")),
    C(
        "dpo-captions-all-null",
        lambda c: dpo(c, f"pairs.train={c.inputs / 'null_captions.parquet'}"),
    ),
    C(
        "spm-captions-all-null",
        lambda c: spm_train(c, f"pairs.train={c.inputs / 'null_captions.parquet'}"),
    ),
    # --- model families -------------------------------------------------------------------
    C(
        "compare-flow-lora-on-an-sd-pipeline",
        lambda c: compare(
            c,
            f"models=[{{name: a, pipeline: {c.world / 'base_model'}, "
            f"lora: {c.inputs / 'flow_lora'}}}]",
        ),
    ),
    C(
        "compare-sd-lora-on-an-sd3-pipeline",
        lambda c: compare(
            c, f"models=[{{name: a, pipeline: {c.inputs / 'sd3'}, lora: {c.inputs / 'sd_lora'}}}]"
        ),
    ),
    C(
        "compare-sd3-lora-on-a-flux-pipeline",
        lambda c: compare(
            c, f"models=[{{name: a, pipeline: {c.inputs / 'flux'}, lora: {c.inputs / 'sd3_lora'}}}]"
        ),
    ),
    # configs/sd35/dpo_lora.yaml says model_family: sd3 (test_configs checks every real config
    # names its family)
    C(
        "dpo-sd3-config-on-a-flux-folder",
        lambda c: dpo(c, "model_family=sd3", f"base_model={c.inputs / 'flux'}"),
    ),
    C("dpo-model-family-unknown", lambda c: dpo(c, "model_family=sd4")),
    C("dpo-resolution-not-a-multiple-of-16", lambda c: dpo(c, "resolution=100")),
    C("spo-noise-level-zero", lambda c: spo(c, "sampler.noise_level=0")),
    C("spo-noise-level-above-one", lambda c: spo(c, "sampler.noise_level=1.5")),
    C(
        "spo-unet-spm-for-a-flow-policy",
        lambda c: spo(c, f"base_model={c.inputs / 'sd3'}", spm="spm_sdxl"),
    ),
    C(
        "spm-latent-blocks-beyond-the-transformer",
        lambda c: spm_train(c, f"base_model={c.inputs / 'sd3'}", "judge=latent", "latent.blocks=2"),
    ),
    C(
        "spm-latent-feature-guidance-on-a-flow-model",
        lambda c: spm_train(
            c, f"base_model={c.inputs / 'sd3'}", "judge=latent", "latent.cfg_scale=7.5"
        ),
    ),
    C(
        "spm-latent-blocks-on-a-unet-model",
        lambda c: spm_train(c, "judge=latent", "latent.blocks=2"),
    ),
    *matrix_cases(),
]


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def _pairs_table(jpg: bytes, n: int = 8) -> pa.Table:
    rows = [
        {
            "caption": "a red circle on a white background",
            "jpg_0": jpg,
            "jpg_1": jpg,
            "label_0": 1.0,
            "label_1": 0.0,
        }
        for _ in range(n)
    ]
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Input files for the cases: a toy SPM folder, the same with its weights cut in half, and
    bad pair, prompt and config files."""
    import preference_model

    root = tmp_path_factory.mktemp("bad_inputs")
    preference_model.toy_spm().save(root / "spm")
    (root / "spm_truncated").mkdir()
    for name in os.listdir(root / "spm"):
        data = (root / "spm" / name).read_bytes()
        if name == "model.safetensors":
            data = data[: len(data) // 2]
        (root / "spm_truncated" / name).write_bytes(data)

    (root / "prompts.jsonl").write_text(
        '{"caption": "a red circle on a white background", "category": "circle"}\n'
        '{"caption": "a green cross on a black background", "category": "cross"}\n'
    )
    (root / "astronaut.txt").write_text(ASTRONAUT + "\n")
    # edit sources: two layouts with their prompts, and the same with one file that is no image
    for name in ("layouts", "layouts_undecodable"):
        (root / name).mkdir()
        (root / name / "a.png").write_bytes(_png())
        (root / name / "b.png").write_bytes(_png() if name == "layouts" else b"not a png")
        (root / name / "prompts.txt").write_text(
            "a red circle on a white background\na green cross on a black background\n"
        )
    (root / "empty.txt").write_text("\n   \n")
    (root / "pairs.txt").write_text("a red circle on a white background\n")
    pq.write_table(
        pa.Table.from_pylist([{"caption": "a red circle", "image": b"x"}] * 4),
        root / "columns.parquet",
    )
    pq.write_table(_pairs_table(b"this is not an image"), root / "undecodable.parquet")
    users = _pairs_table(_png()).append_column("user_id", pa.array([1, 2] * 4))
    pq.write_table(users, root / "users.parquet")
    (root / "bad.yaml").write_text("seed: [1, 2\nout: x\n")
    (root / "list.yaml").write_text("- seed\n- out\n")
    (root / "typo.yaml").write_text("optim:\n  lerning_rate: 0.1\n")
    (root / "a_file").write_text("a regular file\n")
    (root / "empty_dir").mkdir()
    (root / "latin1.txt").write_bytes(LATIN1.encode("latin-1"))
    (root / "latin1.yaml").write_bytes("# r\xe9glages\nseed: 1\n".encode("latin-1"))
    null_captions = _pairs_table(_png()).set_column(0, "caption", pa.nulls(8, pa.string()))
    pq.write_table(null_captions, root / "null_captions.parquet")
    # a latent judge's folder as far as its kind goes: its config file and whole weights
    (root / "latent_judge").mkdir()
    (root / "latent_judge" / "latent_judge_config.json").write_text('{"kind": "latent_judge"}')
    shutil.copy(root / "spm" / "model.safetensors", root / "latent_judge" / "model.safetensors")
    # the toy SPM as if trained on an SDXL model
    shutil.copytree(root / "spm", root / "spm_sdxl")
    config = json.loads((root / "spm_sdxl" / "spm_config.json").read_text())
    config["trained_on"] = {
        "source": "x",
        "family": "sdxl",
        "resolution": 1024,
        "latent_channels": 4,
    }
    (root / "spm_sdxl" / "spm_config.json").write_text(json.dumps(config))
    # a tiny SD3 pipeline, and LoRA files named for each family's denoiser
    build_tiny_sd3(root / "sd3")
    for name, component in (("flow_lora", "transformer"), ("sd_lora", "unet")):
        (root / name).mkdir()
        weights = {f"{component}.blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8)}
        save_file(weights, root / name / "pytorch_lora_weights.safetensors")
    # a tiny FLUX pipeline, and a transformer LoRA whose policy.json says it was trained on SD3
    build_tiny_flux(root / "flux")
    shutil.copytree(root / "flow_lora", root / "sd3_lora")
    (root / "sd3_lora" / "policy.json").write_text('{"mode": "lora", "family": "sd3"}')
    return root


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------
# No model may load
# ------------------------------------------------------------------------------------------


def _model_loaders() -> list[tuple[object, str, str]]:
    """(owner, attribute, label) of every model-loading entry point. Functions imported by
    name (`from x import build_scorer`) are patched in every `spo` / `preference_model`
    module that holds them."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import preference_model.latent
    import preference_model.model
    import spo.architectures
    import spo.evaluation.scorers
    from preference_model.model import StepAwarePreferenceModel
    from spo.models import DiffusionModel

    for command in COMMANDS.values():
        importlib.import_module(command.module)
    found: list[tuple[object, str, str]] = [
        (DiffusionModel, "from_pretrained", "DiffusionModel.from_pretrained"),
        (StepAwarePreferenceModel, "from_open_clip", "StepAwarePreferenceModel.from_open_clip"),
        (StepAwarePreferenceModel, "from_hf_clip", "StepAwarePreferenceModel.from_hf_clip"),
        (diffusers.DiffusionPipeline, "from_pretrained", "DiffusionPipeline.from_pretrained"),
        (
            diffusers.StableDiffusionPipeline,
            "from_pretrained",
            "StableDiffusionPipeline.from_pretrained",
        ),
        (UNet2DConditionModel, "from_pretrained", "UNet2DConditionModel.from_pretrained"),
        (AutoencoderKL, "from_pretrained", "AutoencoderKL.from_pretrained"),
    ]
    functions = {
        "preference_model.load": preference_model.model.load,
        "load_latent_judge": preference_model.latent.load_latent_judge,
        "build_scorer": spo.evaluation.scorers.build_scorer,
        "spo.architectures.build_pipeline": spo.architectures.build_pipeline,
        "spo.architectures.build_spm": spo.architectures.build_spm,
    }
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("spo", "preference_model")):
            continue
        for attr, value in list(vars(module).items()):
            for label, original in functions.items():
                if value is original:
                    found.append((module, attr, f"{label} (as {name}.{attr})"))
    return found


@pytest.fixture
def loaded_models(monkeypatch) -> list[str]:
    """Every model loader raises AssertionError("model loaded: ..."); the calls are recorded
    too, in case a caller swallows the error."""
    import preference_model

    calls: list[str] = []

    def forbid(label: str):
        def loader(*args, **kwargs):
            calls.append(label)
            raise AssertionError(f"model loaded: {label}")

        return loader

    for owner, attr, label in _model_loaders():
        fake = forbid(label)
        # on a class (a classmethod there): a staticmethod takes the same arguments
        monkeypatch.setattr(owner, attr, staticmethod(fake) if isinstance(owner, type) else fake)
    # `import preference_model; preference_model.load(...)` resolves through __getattr__.
    monkeypatch.setattr(preference_model, "load", forbid("preference_model.load"), raising=False)
    return calls


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """An Accelerator made by one case (e.g. with fp16) must not leak into the next."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, "<dir>" for every folder, under `root`."""
    result = {}
    if not root.exists():
        return result
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            result[rel] = "<dir>"
        else:
            result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changed = [p for p in before if p in after and before[p] != after[p]]
    removed = [p for p in before if p not in after]
    added = [p for p in after if p not in before]
    return (
        [f"changed {p}" for p in changed]
        + [f"removed {p}" for p in removed]
        + [f"added {p}" for p in added]
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    case: Case, mini_world, inputs, tmp_path, monkeypatch, capsys, loaded_models
):
    if case.skip_as_root and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ctx = Ctx(mini_world, inputs, tmp_path)
    if case.hub_unreachable:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port
    if case.out_exists:
        ctx.out.mkdir()
        (ctx.out / "metrics.jsonl").write_text('{"step": 1}\n')
    if case.setup is not None:
        case.setup(ctx)
    cwd = tmp_path / "cwd"  # a stray default `runs/...` would appear here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = case.argv(ctx)  # before the snapshots: spo_args writes the world's prompts.txt once
    before = {name: snapshot(p) for name, p in (("world", mini_world), ("inputs", inputs))}
    before_tmp = snapshot(tmp_path)
    capsys.readouterr()

    problems: list[str] = []
    try:
        code = main(argv)
    except BaseException as e:  # noqa: BLE001 -- every escape is a finding, reported below
        code = None
        if not (isinstance(e, AssertionError) and loaded_models):  # else: said below
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            problems.append(f"main raised {type(e).__name__}: {first}")
    err = capsys.readouterr().err

    if code is not None and code != 2:
        problems.append(f"exit code {code}, expected 2")
    lines = err.strip().splitlines()
    if "Traceback" in err:
        problems.append("stderr has a traceback")
    if (len(lines) != 1 or not lines[0].startswith("spo: error: ")) and code is not None:
        shown = " | ".join(line.strip() for line in lines[-3:])
        problems.append(f"stderr is {len(lines)} line(s), not one 'spo: error:' line: {shown}")
    if loaded_models:
        problems.append(f"model loaded: {', '.join(loaded_models)}")

    for name, root in (("world", mini_world), ("inputs", inputs)):
        diff = changes(before[name], snapshot(root))
        if diff:
            problems.append(f"{name} folder modified: {', '.join(diff[:5])}")
    after_tmp = snapshot(tmp_path)
    modified = [d for d in changes(before_tmp, after_tmp) if not d.startswith("added ")]
    if modified:
        problems.append(f"existing files modified: {', '.join(modified[:5])}")
    stray = [p for p in after_tmp if p not in before_tmp and not p.startswith("out")]
    if stray:
        problems.append(f"created outside --out: {', '.join(stray[:5])}")
    if not case.out_exists and ctx.out.exists():
        problems.append("created the --out folder")
    elif case.out_exists:
        added = [p for p in after_tmp if p not in before_tmp]
        if added:
            problems.append(f"added to the existing --out: {', '.join(added[:5])}")

    assert not problems, "; ".join(problems)

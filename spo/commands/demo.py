"""`spo demo`: the whole story on a CPU, each stage the real command with its shipped toy config.

world -> spm -> dpo, spo (the same wall-clock training budget each) -> compare. Before a stage
runs, its equivalent command line is printed, so any stage can be rerun by hand. A finished
stage leaves `.demo_stage.json` in its folder naming the stages it was built on; a rerun skips
it while those are unchanged, resumes a stage that was interrupted (the trainers resume from
their checkpoints), and reruns a stage whose folder was deleted together with every stage
after it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
import uuid
from pathlib import Path

from spo.commands import compare, toy_world, train_dpo, train_preference_model, train_spo
from spo.config import TOY_CONFIGS, DemoConfig, command_config
from spo.errors import INPUT_ERRORS, TrainingError
from spo.evaluation.stats import format_ci
from spo.runs import atomic_write_bytes, check_writable, prepare_run_dir

STAGES = ("world", "spm", "dpo", "spo", "compare")
MARKER = ".demo_stage.json"
RUNNERS = {
    "world": toy_world.run,
    "spm": train_preference_model.run,
    "dpo": train_dpo.run,
    "spo": train_spo.run,
    "compare": compare.run,
}

# Smoke-test sizes for `--quick` (CI): every stage runs its real code path in seconds.
QUICK = {
    "world": ["train_pairs=300", "validation_pairs=64", "grid_prompts=2",
              "grid_images_per_prompt=1"],
    "spm": ["max_steps=10", "batch_size=8", "validation_every=0", "checkpoint_every=5",
            "pairs.max_validation_pairs=32"],
    "dpo": ["max_steps=10", "batch_size=4", "checkpoint_every=5", "validation_images.every=5",
            "validation_images.num_inference_steps=10"],
    "spo": ["max_epochs=1", "max_prompts=8", "sample_batch_size=8", "batch_size=8",
            "sampler.num_steps=10", "sampler.divert_step=2", "validation_images.every=2",
            "validation_images.num_inference_steps=10"],
    "compare": ["images_per_prompt=1", "num_inference_steps=10", "bootstrap=200"],
}  # fmt: skip


def stage_args(cfg: DemoConfig, stage: str) -> list[str]:
    """The `spo` arguments of one stage, chained through cfg.out."""
    root = Path(cfg.out)
    world = root / "world"
    inputs = [f"base_model={world / 'base_model'}"]
    validation = [
        f"validation_images.prompts_file={world / 'prompts/eval.txt'}",
        "validation_images.prompts=[]",
        "validation_images.scorer=oracle",
    ]
    budget = [f"max_minutes={cfg.budget_minutes}", "max_steps=1000000"]
    args = {
        "world": ["toy-world"],
        "spm": [
            "train-preference-model",
            *inputs,
            f"pairs.train={world / 'pairs/train.parquet'}",
            f"pairs.validation={world / 'pairs/validation.parquet'}",
        ],
        "dpo": [
            "train-dpo",
            *inputs,
            f"pairs.train={world / 'pairs/train.parquet'}",
            *validation,
            "validation_images.every=50",
            *budget,
        ],
        "spo": [
            "train-spo",
            *inputs,
            f"spm={root / 'spm/final'}",
            f"prompts={world / 'prompts/train.txt'}",
            *validation,
            "validation_images.every=15",
            "max_epochs=1000",
            *budget,
        ],
        "compare": [
            "compare",
            f"prompts={world / 'prompts/eval.txt'}",
            "models=["
            f"{{name: base, pipeline: {world / 'base_model'}}}, "
            f"{{name: dpo, pipeline: {world / 'base_model'}, lora: {root / 'dpo/final'}}}, "
            f"{{name: spo, pipeline: {world / 'base_model'}, lora: {root / 'spo/final'}}}]",
            f"scorers=[oracle, 'spm:{root / 'spm/final'}', toy_pickscore]",
        ],
    }[stage]
    command, rest = args[0], args[1:]
    head = [command, "--config", TOY_CONFIGS[command], "--out", str(root / stage)]
    if cfg.quick:
        rest = rest + QUICK[stage]
    return head + last_values(rest)


def last_values(overrides: list[str]) -> list[str]:
    """`key=value` overrides with each key once, at its first place, with its last value (the
    printed command line then reads as what runs: no `max_steps=1000000 max_steps=10`)."""
    values: dict[str, str] = {}
    for token in overrides:
        key = token.partition("=")[0]
        values[key] = token
    return list(values.values())


def _marker(root: Path, stage: str) -> dict | None:
    path = root / stage / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def run(cfg: DemoConfig) -> int:
    """`spo demo`: run it, print the headline table and where the report is."""
    report = run_demo(cfg)
    table = report["headline"]
    print("\n| " + " | ".join(table[0]) + " |\n|" + " --- |" * len(table[0]))
    for row in table[1:]:
        print("| " + " | ".join(row) + " |")
    seconds = ", ".join(
        f"{s} {v['seconds']} s" + (" (done before)" if v["skipped"] else "")
        for s, v in report["stages"].items()
    )
    print(f"\nstages: {seconds}")
    print(
        f"report: {cfg.out}/compare/report.html; reward vs compute: "
        f"{cfg.out}/compare/reward_vs_compute.png"
    )
    return 0


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or skip) every stage; return {stage: seconds or "skipped"} and the headline."""
    root = Path(cfg.out)
    check_writable(root)
    prepare_run_dir(root, cfg)
    done: dict[str, str] = {}  # stage -> marker id of the current, finished stage
    report: dict = {"stages": {}}
    for stage in STAGES:
        upstream = {s: done[s] for s in STAGES[: STAGES.index(stage)]}
        marker = _marker(root, stage)
        if marker and marker.get("upstream") == upstream and marker.get("quick") == cfg.quick:
            print(f"[demo] {stage}: done, skipped ({root / stage})", flush=True)
            done[stage] = marker["id"]
            report["stages"][stage] = {"seconds": marker["seconds"], "skipped": True}
            continue
        if marker is not None:  # built on other inputs: start this stage afresh
            shutil.rmtree(root / stage)
        args = stage_args(cfg, stage)
        print(f"[demo] {stage}: $ spo {shlex.join(args)}", flush=True)
        start = time.time()
        command, _, config, _, out, *overrides = args
        try:
            RUNNERS[stage](command_config(command, config, overrides, out))
        except INPUT_ERRORS as e:
            raise TrainingError(f"demo stage {stage} failed: {e}; `spo demo` reruns it") from e
        seconds = round(time.time() - start, 1)
        new = {"id": uuid.uuid4().hex, "upstream": upstream, "quick": cfg.quick}
        new |= {"seconds": seconds, "command": "spo " + shlex.join(args)}
        atomic_write_bytes(root / stage / MARKER, json.dumps(new, indent=2).encode())
        done[stage] = new["id"]
        report["stages"][stage] = {"seconds": seconds, "skipped": False}
        print(f"[demo] {stage}: finished in {seconds} s", flush=True)

    results = json.loads((root / "compare/results.json").read_text())
    report["headline"] = headline(results)
    atomic_write_bytes(root / "demo.json", json.dumps(report, indent=2).encode())
    return report


def headline(results: dict) -> list[list[str]]:
    """The demo's table: per model, each scorer's mean [95% CI], and the oracle win rate vs
    base."""
    models = list(results["scores"])
    scorers = list(results["scores"][models[0]])
    rows = [["model", *scorers, "oracle win rate vs base"]]
    for m in models:
        cells = []
        for s in scorers:
            e = results["scores"][m][s]
            cells.append(format_ci(e, spec=".3f"))
        win = results["win_rates"].get("oracle", {}).get(f"{m} vs base")
        rate = format_ci(win, "rate", ".2f") if win else ""
        rows.append([m, *cells, rate])
    return rows

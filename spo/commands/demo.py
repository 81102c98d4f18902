"""`spo demo`: the whole story on a CPU, each stage the real command with its shipped toy config.

world -> spm -> dpo, spo (the same wall-clock training budget each) -> compare (generation) ->
compare_edit (SDEdit of the world's colour layouts, the same three models). Before a stage
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

STAGES = ("world", "spm", "dpo", "spo", "compare", "compare_edit")
# `flow=true`: the same story on the toy flow base model (a tiny SD3; method.md, flow models)
FLOW_STAGES = ("spm_flow", "dpo_flow", "spo_flow", "compare_flow")
MARKER = ".demo_stage.json"
RUNNERS = {
    "world": toy_world.run,
    "spm": train_preference_model.run,
    "dpo": train_dpo.run,
    "spo": train_spo.run,
    "compare": compare.run,
    "compare_edit": compare.run,
}
# a flow stage runs its UNet twin's command with the flow toy config of the same name
FLOW_TWIN = {stage: stage.removesuffix("_flow") for stage in FLOW_STAGES}
# stages whose toy config is named after the stage, not after its command's default
OWN_CONFIG = FLOW_STAGES + ("compare_edit",)

# Smoke-test sizes for `--quick` (CI): every stage runs its real code path in seconds.
QUICK = {
    "world": ["train_pairs=300", "validation_pairs=64", "grid_prompts=2",
              "grid_images_per_prompt=1", "group_pairs=40", "group_validation_pairs=16"],
    "spm": ["max_steps=10", "batch_size=8", "validation_every=0", "checkpoint_every=5",
            "pairs.max_validation_pairs=32"],
    "dpo": ["max_steps=10", "batch_size=4", "checkpoint_every=5", "validation_images.every=5",
            "validation_images.num_inference_steps=10"],
    "spo": ["max_epochs=1", "max_prompts=8", "sample_batch_size=8", "batch_size=8",
            "sampler.num_steps=10", "sampler.divert_step=2", "validation_images.every=2",
            "validation_images.num_inference_steps=10"],
    "compare": ["images_per_prompt=1", "num_inference_steps=10", "bootstrap=200"],
    "compare_edit": ["images_per_prompt=1", "num_inference_steps=10", "bootstrap=200",
                     "max_prompts=8"],
}  # fmt: skip


def stages(cfg: DemoConfig) -> tuple[str, ...]:
    """The demo's stages in order: the UNet story, then the flow one when asked."""
    return STAGES + (FLOW_STAGES if cfg.flow else ())


def stage_args(cfg: DemoConfig, stage: str) -> list[str]:
    """The `spo` arguments of one stage, chained through cfg.out. A flow stage is its UNet
    twin on the flow base model, with the flow toy config and the flow stages' results."""
    root = Path(cfg.out)
    world = root / "world"
    twin = FLOW_TWIN.get(stage, stage)
    flow = "_flow" if stage in FLOW_STAGES else ""
    name = "flow_" if flow else ""  # the flow comparison's model names: flow_base, ...
    base = world / ("flow_base_model" if flow else "base_model")
    inputs = [f"base_model={base}"]
    validation = [
        f"validation_images.prompts_file={world / 'prompts/eval.txt'}",
        "validation_images.prompts=[]",
    ]
    budget = [f"max_minutes={cfg.budget_minutes}", "max_steps=1000000"]
    models = [  # a comparison's: the base model and its DPO and SPO results
        "models=["
        f"{{name: {name}base, pipeline: {base}}}, "
        f"{{name: {name}dpo, pipeline: {base}, lora: {root / f'dpo{flow}/final'}}}, "
        f"{{name: {name}spo, pipeline: {base}, lora: {root / f'spo{flow}/final'}}}]",
        f"scorers=[oracle, 'spm:{root / f'spm{flow}/final'}', toy_pickscore]",
    ]
    bf16 = spm_bfloat16(cfg.spm_precision)
    args = {
        "world": ["toy-world", f"flow_base_report={str(cfg.flow).lower()}"],
        "spm": [
            "train-preference-model",
            *inputs,
            f"pairs.train={world / 'pairs/train.parquet'}",
            f"pairs.validation={world / 'pairs/validation.parquet'}",
            *(["base_dtype=bfloat16", "mixed_precision=bf16"] if bf16 else []),
            f"max_steps={cfg.spm_max_steps}",
            "validation_every=0",
        ],
        "dpo": [
            "train-dpo",
            *inputs,
            f"pairs.train={world / 'pairs/train.parquet'}",
            *validation,
            "validation_images.every=100",
            *budget,
        ],
        "spo": [
            "train-spo",
            *inputs,
            f"spm={root / f'spm{flow}/final'}",
            f"prompts={world / 'prompts/train.txt'}",
            *validation,
            "validation_images.every=15",
            "max_epochs=1000",
            *budget,
        ],
        "compare": [
            "compare",
            f"prompts={world / 'prompts/eval.txt'}",
            *models,
        ],
        # 2 edits per layout (the toy config's 4 in toy_replication.py --edit)
        "compare_edit": [
            "compare",
            f"edit.sources={world / 'edit/layouts'}",
            "images_per_prompt=2",
            *models,
        ],
    }[twin]
    command, rest = args[0], args[1:]
    config = f"toy/{stage}" if stage in OWN_CONFIG else TOY_CONFIGS[command]
    head = [command, "--config", config, "--out", str(root / stage)]
    if cfg.quick:
        rest = rest + QUICK[twin]
    return head + last_values(rest)


def spm_bfloat16(precision: str) -> bool:
    """Whether the SPM stage runs in bfloat16 (`spm_precision`; auto: where this machine's
    accelerate device computes it natively, a CPU with AVX-512 BF16 / AMX or a GPU with bf16;
    elsewhere bfloat16 is emulated and slower than float32)."""
    if precision != "auto":
        return precision == "bfloat16"
    import torch
    from accelerate.utils import parse_flag_from_env

    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
    for title, key in (
        ("generation", "headline"),
        ("editing (SDEdit of the colour layouts)", "edit_headline"),
        ("toy flow world", "flow_headline"),
    ):
        table = report.get(key)
        if table is None:
            continue
        print(f"\n{title}:\n| " + " | ".join(table[0]) + " |\n|" + " --- |" * len(table[0]))
        for row in table[1:]:
            print("| " + " | ".join(row) + " |")
    seconds = ", ".join(
        f"{s} {v['seconds']} s" + (" (done before)" if v["skipped"] else "")
        for s, v in report["stages"].items()
    )
    print(f"\nstages: {seconds}")
    print(
        f"report: {cfg.out}/compare/report.html (editing: {cfg.out}/compare_edit/report.html); "
        f"validation scores against training time and chain KL: "
        f"{cfg.out}/compare/proxy_vs_gold.png"
    )
    return 0


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or skip) every stage; return {stage: seconds or "skipped"} and the headline."""
    root = Path(cfg.out)
    check_writable(root)
    prepare_run_dir(root, cfg)
    done: dict[str, str] = {}  # stage -> marker id of the current, finished stage
    report: dict = {"stages": {}}
    order = stages(cfg)
    for stage in order:
        upstream = {s: done[s] for s in order[: order.index(stage)]}
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
            RUNNERS[FLOW_TWIN.get(stage, stage)](command_config(command, config, overrides, out))
        except INPUT_ERRORS as e:
            raise TrainingError(f"demo stage {stage} failed: {e}; `spo demo` reruns it") from e
        seconds = round(time.time() - start, 1)
        new = {"id": uuid.uuid4().hex, "upstream": upstream, "quick": cfg.quick}
        new |= {"seconds": seconds, "command": "spo " + shlex.join(args)}
        atomic_write_bytes(root / stage / MARKER, json.dumps(new, indent=2).encode())
        done[stage] = new["id"]
        report["stages"][stage] = {"seconds": seconds, "skipped": False}
        print(f"[demo] {stage}: finished in {seconds} s", flush=True)

    report["headline"] = headline(json.loads((root / "compare/results.json").read_text()))
    edits = json.loads((root / "compare_edit/results.json").read_text())
    report["edit_headline"] = headline(edits)
    if cfg.flow:
        flow_results = json.loads((root / "compare_flow/results.json").read_text())
        report["flow_headline"] = headline(flow_results, base="flow_base")
    atomic_write_bytes(root / "demo.json", json.dumps(report, indent=2).encode())
    return report


def headline(results: dict, base: str = "base") -> list[list[str]]:
    """The demo's table: per model, each scorer's mean [95% CI], and the oracle win rate vs
    `base`."""
    models = list(results["scores"])
    scorers = list(results["scores"][models[0]])
    rows = [["model", *scorers, "oracle win rate vs base"]]
    for m in models:
        cells = []
        for s in scorers:
            e = results["scores"][m][s]
            cells.append(format_ci(e, spec=".3f"))
        win = results["win_rates"].get("oracle", {}).get(f"{m} vs {base}")
        rate = format_ci(win, "rate", ".2f") if win else ""
        rows.append([m, *cells, rate])
    return rows

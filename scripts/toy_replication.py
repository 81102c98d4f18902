"""The toy-world replication study: SPO vs Diffusion-DPO vs base over seeds, SPO's ablations,
and the same on the toy flow base model.

Usage (after `spo toy-world` or `spo demo`, whose world (and SPM, for the UNet arms) it reuses):
    python scripts/toy_replication.py --demo runs/toy --out runs/replication [--seeds 0 1 2]
        [--budget-minutes 3.5] [--jobs 1] [--images-per-prompt 16] [--arms dpo,spo,...]

Every arm is the demo's own training command (`spo.commands.demo.stage_args`) with the same
wall-clock budget per run, plus its seed and the ablated setting. Runs go one after another with 2
CPU threads like the demo (`--jobs`/`--threads` can change that, but on 2 cores two 1-thread runs
side by side each got less than half the work done, so the default is sequential). A judge an
arm needs (the SPM without time conditioning, the latent judges, the flow SPM) is trained once,
with the demo's judge command and its toy config. The flow arms (flow-dpo, flow-spo,
flow-spo-latent) are the demo's flow stages on the world's flow base model. Then one
`spo compare` per base model generates `--images-per-prompt` images per held-out eval prompt
for it and every trained run of its arms (the same noise for all) and scores them with the
oracle and that world's SPM at t = 0. Finished runs are skipped on a rerun.

Statistics (written to OUT/replication.json and OUT/replication.md): per arm the mean over the
seeds' images with a 95% bootstrap interval over prompts, each seed's mean and its paired
t-interval against the base, the win rate against base, and the paired difference to the
world's default SPO arm (seed i against seed i).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spo.commands.demo import stage_args
from spo.config import DemoConfig
from spo.evaluation.provenance import best_validation, validation_curves, validation_rows
from spo.evaluation.stats import (
    format_ci,
    mean_ci,
    paired_difference_ci,
    seed_mean_ci,
    win_rate_ci,
)

GROUP_PAIRS = (
    "pairs.train={world}/pairs/groups_train.parquet",
    "pairs.validation={world}/pairs/groups_validation.parquet",
)
GROUP_A = ("pairs.annotators.ids=[small]",)  # group A: the annotators who like small objects
GROUP_ORACLES = ("oracle_small", "oracle_large", "oracle")
GROUP_VALIDATION = (f"validation_images.scorers=[toy_pickscore, {', '.join(GROUP_ORACLES)}]",)
# judge runs an arm may need -> (demo stage, toy config, extra overrides), trained once first
JUDGES: dict[str, tuple[str, str, list[str]]] = {
    "spm-no-time": ("spm", "spm.yaml", ["time_conditioning=false"]),
    "latent-judge": ("spm", "latent_judge.yaml", []),
    "flow-spm": ("spm_flow", "spm_flow.yaml", []),
    "flow-latent-judge": ("spm_flow", "latent_judge_flow.yaml", []),
    # the two-group world (pairs/groups_*: every pair labelled by both groups): a judge of
    # everyone's labels and one of group A's (the `small` group) alone
    "spm-groups-all": ("spm", "spm.yaml", [*GROUP_PAIRS]),
    "spm-groups-small": ("spm", "spm.yaml", [*GROUP_PAIRS, *GROUP_A]),
}


class Arm(NamedTuple):
    """One arm: a demo stage with overrides, the question it answers, the judge run it needs
    and its own toy config (None: the stage's)."""

    stage: str
    overrides: list[str]
    question: str
    judge: str | None = None
    config: str | None = None


ARMS: dict[str, Arm] = {
    "dpo": Arm("dpo", [], "Diffusion-DPO on the world's pairs"),
    "spo": Arm("spo", [], "SPO as configured: random continuation, time-aware SPM, kappa 750, k 4"),
    "spo-win": Arm("spo", ["sampler.continuation=win"], "continue from the step's winner"),
    "spo-lose": Arm("spo", ["sampler.continuation=lose"], "continue from the step's loser"),
    "spo-no-time": Arm(
        "spo", ["spm={judge}"], "SPM trained without time conditioning", "spm-no-time"
    ),
    "spo-kappa950": Arm("spo", ["sampler.divert_step=0"], "train every step (t <= 951)"),
    "spo-k2": Arm("spo", ["sampler.k=2"], "pool of 2 candidates per step"),
    "spo-latent": Arm(
        "spo",
        ["spm={judge}"],
        "SPO judged by the latent judge with LPO's settings (toy/spo_latent: beta 500, all "
        "steps, dynamic threshold, 5 epochs), no decode",
        "latent-judge",
        "spo_latent.yaml",
    ),
    "spo-latent-spo-settings": Arm(
        "spo",
        ["spm={judge}", "judge=latent"],
        "the latent judge alone: every other setting the pixel SPO arm's",
        "latent-judge",
    ),
    "dpo-groups-all": Arm(
        "dpo",
        ["pairs.train={world}/pairs/groups_train.parquet", *GROUP_VALIDATION],
        "two-group world: DPO on everyone's labels",
    ),
    "dpo-groups-small": Arm(
        "dpo",
        ["pairs.train={world}/pairs/groups_train.parquet", *GROUP_A, *GROUP_VALIDATION],
        "two-group world: DPO on group A's (small objects) labels alone",
    ),
    "spo-groups-all": Arm(
        "spo",
        ["spm={judge}", *GROUP_VALIDATION],
        "two-group world: SPO judged by the SPM of everyone's labels",
        "spm-groups-all",
    ),
    "spo-groups-small": Arm(
        "spo",
        ["spm={judge}", *GROUP_VALIDATION],
        "two-group world: SPO judged by the SPM of group A's labels",
        "spm-groups-small",
    ),
    "flow-dpo": Arm("dpo_flow", [], "Diffusion-DPO on the toy flow base model"),
    "flow-spo": Arm(
        "spo_flow",
        ["spm={judge}"],
        "SPO on the toy flow base model (flow SDE steps), judged by its pixel SPM",
        "flow-spm",
    ),
    "flow-spo-latent": Arm(
        "spo_flow",
        ["spm={judge}", "judge=latent"],
        "SPO on the toy flow base model judged by its transformer latent judge",
        "flow-latent-judge",
    ),
}


class World(NamedTuple):
    """A base model the arms train from, and how its arms are compared."""

    base: str  # the base model's name in the comparison
    pipeline: str  # its folder in the demo's world/
    config: str  # the toy compare config
    compare: str  # the comparison's folder in OUT
    reference: str  # the arm the others are paired against (`reference_of`)
    key: str  # the summary's table of this world's arms
    label: str = ""  # how its tables are titled beside the scorer
    versus: str = ""  # the reference column's name, when not the reference arm's


def reference_of(arm: str, w: World) -> str:
    """The arm an arm is paired against (seed i with seed i): its world's reference arm; in
    the two-group world an arm tuned on group A's pairs against the same trainer tuned on
    everyone's."""
    if arm.endswith("-groups-small"):
        return arm.removesuffix("-small") + "-all"
    return w.reference


WORLDS = {
    "unet": World("base", "base_model", "compare.yaml", "compare", "spo", "arms"),
    "groups": World("base", "base_model", "compare.yaml", "compare_groups", "spo-groups-all",
                    "group_arms", "two-group world", "the same trainer on all pairs"),
    "flow": World("flow_base", "flow_base_model", "compare_flow.yaml", "compare_flow",
                  "flow-spo", "flow_arms", "toy flow world"),
    # not a world of its own: the UNet arms named by --edit, editing the colour layouts
    "edit": World("base", "base_model", "compare_edit.yaml", "compare_edit", "spo",
                  "edit_arms", "editing the colour layouts (SDEdit, strength 0.6)"),
}  # fmt: skip
EDITS_PER_LAYOUT = 4  # the toy compare_edit config: 32 layouts x 4 edits per model


def world_of(arm: str) -> str:
    """The world an arm trains in: flow arms on the toy flow base model, group arms on the
    two-group world's pairs (the UNet base model, compared by both groups' oracles)."""
    if ARMS[arm].stage.endswith("_flow"):
        return "flow"
    return "groups" if "-groups-" in arm else "unet"


def arms_of(opts, world: str) -> list[str]:
    """The arms compared in `world`: those trained in it, or for "edit" those --edit names."""
    if world == "edit":
        return opts.edit
    return [arm for arm in opts.arms if world_of(arm) == world]


def run_logged(args: list[str], log: Path, threads: int) -> None:
    """Run `spo ARGS` in a subprocess with `threads` CPU threads; its output goes to `log`."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "spo.cli", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write("$ spo " + shlex.join(args) + "\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"`spo {shlex.join(args)}` failed (exit {code}); see {log}")


def with_out(args: list[str], out: Path) -> list[str]:
    """A demo stage's arguments with its --out replaced."""
    i = args.index("--out")
    return args[: i + 1] + [str(out)] + args[i + 2 :]


def train_jobs(opts, out: Path) -> dict[str, tuple[list[str], Path, str | None]]:
    """name -> (spo arguments, output folder, the job it waits for)."""
    # the judges as the toy spm config trains them (float32, 250 steps), not the demo's
    # shortened stage, so the replication's judges stay those its tables were measured with
    demo = DemoConfig(
        out=str(opts.demo),
        budget_minutes=opts.budget_minutes,
        spm_precision="float32",
        spm_max_steps=250,
    )
    configs = Path(__file__).parents[1] / "configs/toy"
    jobs: dict[str, tuple[list[str], Path, str | None]] = {}
    for judge in dict.fromkeys(ARMS[arm].judge for arm in opts.arms if ARMS[arm].judge):
        stage, config, extra = JUDGES[judge]
        args = with_out(stage_args(demo, stage), out / judge)
        args[args.index("--config") + 1] = str(configs / config)
        world = Path(opts.demo) / "world"
        jobs[judge] = (args + [e.format(world=world) for e in extra], out / judge, None)
    for seed in opts.seeds:  # seed-major: a slow spell on the machine hits all arms alike
        for arm in opts.arms:
            a = ARMS[arm]
            run = out / "runs" / f"{arm}-s{seed}"
            judge = out / str(a.judge) / "final"
            overrides = [
                o.format(judge=judge, world=Path(opts.demo) / "world") for o in a.overrides
            ]
            args = with_out(stage_args(demo, a.stage), run) + [f"seed={seed}", *overrides]
            if a.config is not None:
                args[args.index("--config") + 1] = str(configs / a.config)
            jobs[run.name] = (args, run, a.judge)
    return jobs


def run_all(jobs: dict, out: Path, n_jobs: int, threads: int) -> None:
    """Run every unfinished job, `n_jobs` at a time, each after the job it depends on."""
    futures: dict[str, Future] = {}

    def one(name: str) -> None:
        args, folder, after = jobs[name]
        if after is not None:
            futures[after].result()
        if (folder / "final").is_dir():
            print(f"[replication] {name}: done, skipped", flush=True)
            return
        start = time.time()
        print(f"[replication] {name}: started", flush=True)
        run_logged(args, out / "logs" / f"{name}.log", threads)
        print(f"[replication] {name}: finished in {time.time() - start:.0f} s", flush=True)

    with ThreadPoolExecutor(n_jobs) as pool:
        for name in jobs:  # dependencies come first in `jobs`, so they start first
            futures[name] = pool.submit(one, name)
        for future in futures.values():
            future.result()


def compare_args(opts, out: Path, runs: list[str], world: str = "unet") -> list[str]:
    """One `spo compare` of a world's base model and its arms' runs, scored by the oracle and
    that world's SPM at t = 0 (the demo's, or the flow SPM this script trained)."""
    w = WORLDS[world]
    folder = Path(opts.demo) / "world"
    base = folder / w.pipeline
    models = [f"{{name: {w.base}, pipeline: {base}}}"]
    if world == "edit":  # final/ only; the demo's editing stage with these runs
        models += [
            f"{{name: {r}, pipeline: {base}, lora: {out / 'runs' / r / 'final'}}}" for r in runs
        ]
        inputs = [f"edit.sources={folder / 'edit/layouts'}"]
        scorers = ["oracle", f"'spm:{Path(opts.demo) / 'spm/final'}'"]
        per_input = EDITS_PER_LAYOUT
    else:
        for r in runs:
            # best/ (where the run kept one) beside final/ of the same run
            for name, result in ((r, "final"), (f"{r}-best", "best")):
                if result == "final" or (out / "runs" / r / result).is_dir():
                    models.append(
                        f"{{name: {name}, pipeline: {base}, lora: {out / 'runs' / r / result}}}"
                    )
        if world == "groups":
            scorers = list(GROUP_ORACLES)
        else:
            spm = Path(opts.demo) / "spm/final" if world == "unet" else out / "flow-spm/final"
            scorers = ["oracle"] + ([f"'spm:{spm}'"] if spm.is_dir() or world == "unet" else [])
        inputs = [f"prompts={folder / 'prompts/eval.txt'}"]
        per_input = opts.images_per_prompt
    return [
        "compare",
        "--config",
        str(Path(__file__).parents[1] / "configs/toy" / w.config),
        "--out",
        str(out / w.compare),
        *inputs,
        "models=[" + ", ".join(models) + "]",
        f"scorers=[{', '.join(scorers)}]",
        f"images_per_prompt={per_input}",
        "grid_prompts=4",
    ]


def plot_curves(opts, out: Path) -> Path:
    """Oracle reward of the validation samples against training seconds, every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(opts.arms):
        for j, seed in enumerate(opts.seeds):
            curves = validation_curves(out / "runs" / f"{arm}-s{seed}")
            xs, ys = curves.get("val/oracle", ([], []))
            ax.plot(xs, ys, color=f"C{i}", alpha=0.7, lw=1.2, label=arm if j == 0 else None)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("oracle reward of eval samples")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_facts(folder: Path) -> dict:
    """Steps and training seconds of one finished run (its summary and metrics log)."""
    summary = json.loads((folder / "final/train_summary.json").read_text())
    seconds = None
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        seconds = row.get("val/train_seconds", row.get("train/elapsed_s", seconds))
    return {"steps": summary["step"], "train_seconds": seconds}


def summarise(opts, out: Path) -> dict:
    """replication.json: per world, scorer and arm the pooled mean, win rate and paired
    differences (to the world's base and to its reference SPO arm)."""
    summary: dict = {"settings": vars(opts) | {"demo": str(opts.demo)}}
    for world, w in WORLDS.items():
        arms = arms_of(opts, world)
        if arms:
            per_image = json.loads((out / w.compare / "scores.json").read_text())
            summary[w.key] = {
                scorer: _table(opts, by_model, arms, w)
                for scorer, by_model in per_image["scores"].items()
            }
    summary["best_vs_final"] = best_vs_final(opts, out)
    summary["runs"] = {
        f"{arm}-s{s}": run_facts(out / "runs" / f"{arm}-s{s}")
        for arm in opts.arms
        for s in opts.seeds
    }
    return summary


GOLD = "oracle"


def best_vs_final(opts, out: Path) -> dict:
    """Per arm whose runs kept best/ (chosen by a held-out proxy, never the oracle): the
    oracle reward of best/ and of final/ on the comparison's images, best - final paired on
    (prompt, image seed, training seed), and from each run's validations the oracle at best/'s
    validation, at the last one and its own peak (the most an oracle-picked checkpoint could
    have given), with a t-interval over the seeds of peak - best."""
    table = {}
    for world, w in WORLDS.items():
        arms = [arm for arm in opts.arms if world_of(arm) == world]
        path = out / w.compare / "scores.json"
        if not arms or not path.is_file():
            continue
        by_model = json.loads(path.read_text())["scores"][GOLD]
        for arm in arms:
            names = [f"{arm}-s{s}" for s in opts.seeds]
            if not all(f"{n}-best" in by_model for n in names):
                continue
            final = np.concatenate([np.array(by_model[n]) for n in names], axis=1)
            best = np.concatenate([np.array(by_model[f"{n}-best"]) for n in names], axis=1)
            curves = [_oracle_along(out / "runs" / n) for n in names]
            table[arm] = {
                "final": mean_ci(final, opts.bootstrap),
                "best": mean_ci(best, opts.bootstrap),
                "best_minus_final": paired_difference_ci(best, final),
                "validation": curves,
                "peak_minus_best": seed_mean_ci([c["peak"] - c["at_best"] for c in curves]),
                "peak_minus_final": seed_mean_ci([c["peak"] - c["at_end"] for c in curves]),
            }
    return table


def _oracle_along(run: Path) -> dict:
    """The oracle's validation mean at best/'s step, at the run's last validation and at its
    own peak (with their steps), and the proxy that chose best/."""
    rows = [r for r in validation_rows(run) if GOLD in r["scores"]]
    chosen = best_validation(run)
    at = {r["step"]: r["scores"][GOLD] for r in rows}
    peak = max(rows, key=lambda r: r["scores"][GOLD])
    return {
        "selected_by": chosen["select_by"],
        "best_step": chosen["step"],
        "at_best": at[chosen["step"]],
        "last_step": rows[-1]["step"],
        "at_end": rows[-1]["scores"][GOLD],
        "peak_step": peak["step"],
        "peak": peak["scores"][GOLD],
    }


def _table(opts, by_model: dict, arms: list[str], w: World) -> dict:
    seeds = opts.seeds
    base = np.array(by_model[w.base])
    tiled_base = np.concatenate([base] * len(seeds), axis=1)
    pooled = {
        arm: np.concatenate([np.array(by_model[f"{arm}-s{s}"]) for s in seeds], axis=1)
        for arm in arms
    }
    table = {w.base: {"mean": mean_ci(base, opts.bootstrap)}}
    for arm, scores in pooled.items():
        ref = reference_of(arm, w)
        row = {
            "mean": mean_ci(scores, opts.bootstrap),
            "seed_means": [float(np.mean(by_model[f"{arm}-s{s}"])) for s in seeds],
            "win_rate_vs_base": win_rate_ci(scores, tiled_base, opts.bootstrap),
            "minus_base": mean_ci(scores - tiled_base, opts.bootstrap),
            "seed_minus_base": [
                paired_difference_ci(np.array(by_model[f"{arm}-s{s}"]), base) for s in seeds
            ],
        }
        if arm != ref and ref in pooled:
            row["reference"] = ref
            row["minus_reference"] = mean_ci(scores - pooled[ref], opts.bootstrap)
            row["seed_minus_reference"] = [
                float(np.mean(by_model[f"{arm}-s{s}"]) - np.mean(by_model[f"{ref}-s{s}"]))
                for s in seeds
            ]
            row["seed_minus_reference_ci"] = [
                paired_difference_ci(
                    np.array(by_model[f"{arm}-s{s}"]), np.array(by_model[f"{ref}-s{s}"])
                )
                for s in seeds
            ]
            row["win_rate_vs_reference"] = win_rate_ci(scores, pooled[ref], opts.bootstrap)
        table[arm] = row
    return table


def markdown(summary: dict, arms: list[str]) -> str:
    """The tables docs/toy-replication.md quotes: per world, its arms against its base and
    against its reference SPO arm (each seed against the same seed)."""
    lines = []
    for w in WORLDS.values():
        for scorer, table in summary.get(w.key, {}).items():
            title = f"{scorer}, {w.label}" if w.label else scorer
            against = w.versus or w.reference
            lines += [
                f"### {title}",
                "",
                f"| arm | mean [95% CI] | seed means | win rate vs {w.base} | minus {w.base} "
                f"| minus {against} | each seed minus {against} | win rate vs {against} |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                f"| {w.base} | {format_ci(table[w.base]['mean'], spec='.3f')} | | | | | | |",
            ]
            for arm in (a for a in arms if a in table):
                row = table[arm]
                seed_means = " / ".join(f"{m:.3f}" for m in row["seed_means"])
                versus = ["", "", ""]
                if "minus_reference" in row:
                    versus = [
                        format_ci(row["minus_reference"], spec=".3f"),
                        " / ".join(f"{d:+.3f}" for d in row["seed_minus_reference"]),
                        format_ci(row["win_rate_vs_reference"], "rate", ".2f"),
                    ]
                win = format_ci(row["win_rate_vs_base"], "rate", ".2f")
                lines.append(
                    f"| {arm} | {format_ci(row['mean'], spec='.3f')} | {seed_means} | {win} | "
                    f"{format_ci(row['minus_base'], spec='.3f')} | {' | '.join(versus)} |"
                )
            lines.append("")
    lines += _best_vs_final_lines(summary.get("best_vs_final", {}))
    lines += ["| run | steps | training seconds |", "| --- | --- | --- |"]
    for name, facts in summary["runs"].items():
        lines.append(f"| {name} | {facts['steps']} | {facts['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _best_vs_final_lines(table: dict) -> list[str]:
    """best/ (kept by the held-out proxy) against final/ and the oracle's own peak."""
    if not table:
        return []

    def ci(entry: dict) -> str:
        return format_ci(entry, spec=".3f") if entry["ci95"] else f"{entry['mean']:.3f}"

    lines = [
        f"### best/ against final/ ({GOLD}; best/ kept by "
        f"{next(iter(table.values()))['validation'][0]['selected_by']})",
        "",
        "| arm | final/ | best/ | best - final (paired) | best/ steps | oracle peak steps "
        "| validation oracle at best / at end / peak | peak - best (seeds) | peak - final |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, row in table.items():
        curves = row["validation"]
        at = " ; ".join(f"{c['at_best']:.3f} / {c['at_end']:.3f} / {c['peak']:.3f}" for c in curves)
        lines.append(
            f"| {arm} | {ci(row['final'])} | {ci(row['best'])} | {ci(row['best_minus_final'])} "
            f"| {' / '.join(str(c['best_step']) for c in curves)} "
            f"| {' / '.join(str(c['peak_step']) for c in curves)} | {at} "
            f"| {ci(row['peak_minus_best'])} | {ci(row['peak_minus_final'])} |"
        )
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/toy"), help="a finished `spo demo`")
    ap.add_argument("--out", type=Path, default=Path("runs/replication"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS)
    )
    ap.add_argument("--budget-minutes", type=float, default=3.5, help="per training run")
    ap.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per training")
    ap.add_argument("--images-per-prompt", type=int, default=16)
    ap.add_argument(
        "--edit",
        default="",
        help="comma-separated UNet arms whose final/ runs also edit the world's colour layouts "
        "(the demo's compare_edit: SDEdit at strength 0.6), e.g. dpo,spo",
    )
    ap.add_argument("--bootstrap", type=int, default=2000)
    opts = ap.parse_args()
    opts.arms = opts.arms.split(",")
    opts.edit = [a for a in opts.edit.split(",") if a]
    unknown = [a for a in opts.arms if a not in ARMS]
    if unknown:
        sys.exit(f"error: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    not_trained = [a for a in opts.edit if a not in opts.arms or world_of(a) != "unet"]
    if not_trained:
        sys.exit(f"error: --edit takes UNet arms of --arms, not {', '.join(not_trained)}")
    worlds = list(dict.fromkeys(world_of(arm) for arm in opts.arms))
    needed = ["world/prompts/eval.txt"] + [f"world/{WORLDS[w].pipeline}" for w in worlds]
    needed += ["spm/final"] if "unet" in worlds else []
    needed += ["world/pairs/groups_train.parquet"] if "groups" in worlds else []
    needed += ["world/edit/layouts"] if opts.edit else []
    for path in needed:
        if not (opts.demo / path).exists():
            sys.exit(
                f"error: {opts.demo / path} is missing: run `spo demo --out {opts.demo}` first"
            )
    if opts.jobs < 1 or opts.threads < 1 or opts.images_per_prompt < 1 or not opts.seeds:
        sys.exit("error: --jobs, --threads and --images-per-prompt must be >= 1, --seeds non-empty")

    jobs = train_jobs(opts, opts.out)
    run_all(jobs, opts.out, opts.jobs, opts.threads)
    for world in worlds:
        runs = [f"{arm}-s{s}" for arm in opts.arms if world_of(arm) == world for s in opts.seeds]
        folder = WORLDS[world].compare
        print(f"[replication] {folder}", flush=True)
        args = compare_args(opts, opts.out, runs, world)
        run_logged(args, opts.out / f"logs/{folder}.log", opts.threads)
    if opts.edit:
        print(f"[replication] {WORLDS['edit'].compare}", flush=True)
        runs = [f"{arm}-s{s}" for arm in opts.edit for s in opts.seeds]
        args = compare_args(opts, opts.out, runs, "edit")
        run_logged(args, opts.out / f"logs/{WORLDS['edit'].compare}.log", opts.threads)
    summary = summarise(opts, opts.out)
    (opts.out / "replication.json").write_text(json.dumps(summary, indent=2, default=str))
    (opts.out / "replication.md").write_text(markdown(summary, opts.arms))
    plot_curves(opts, opts.out)
    print((opts.out / "replication.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

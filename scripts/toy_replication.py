"""The toy-world replication study: SPO vs Diffusion-DPO vs base over seeds, and SPO's ablations.

Usage (after `spo demo`, whose world and SPM it reuses):
    python scripts/toy_replication.py --demo runs/toy --out runs/replication [--seeds 0 1 2]
        [--budget-minutes 3.5] [--jobs 1] [--images-per-prompt 16] [--arms dpo,spo,...]

Every arm is the demo's own training command (`spo.commands.demo.stage_args`) with the same
wall-clock budget per run, plus its seed and the ablated setting. Runs go one after another with 2
CPU threads like the demo (`--jobs`/`--threads` can change that, but on 2 cores two 1-thread runs
side by side each got less than half the work done, so the default is sequential). The
SPM without time conditioning is trained once, with the demo's SPM command and
`time_conditioning=false`. Then one `spo compare` generates `--images-per-prompt` images per
held-out eval prompt for the base model and every trained run (the same noise for all) and
scores them with the oracle and the SPM at t = 0. Finished runs are skipped on a rerun.

Statistics (written to OUT/replication.json and OUT/replication.md): per arm the mean over the
seeds' images with a 95% bootstrap interval over prompts, each seed's mean, the win rate against
base, and the paired difference to the default SPO arm (seed i against seed i).
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

import numpy as np

from spo.commands.demo import stage_args
from spo.config import DemoConfig
from spo.evaluation.provenance import validation_curves
from spo.evaluation.stats import format_ci, mean_ci, win_rate_ci

# judge runs an arm may need -> (toy config, extra overrides), trained once before the arms
JUDGES: dict[str, tuple[str, list[str]]] = {
    "spm-no-time": ("spm.yaml", ["time_conditioning=false"]),
    "latent-judge": ("latent_judge.yaml", []),
}
# arm -> (demo stage, overrides, the question it answers, the judge run it needs)
ARMS: dict[str, tuple[str, list[str], str, str | None]] = {
    "dpo": ("dpo", [], "Diffusion-DPO on the world's pairs", None),
    "spo": (
        "spo",
        [],
        "SPO as configured: random continuation, time-aware SPM, kappa 750, k 4",
        None,
    ),
    "spo-win": ("spo", ["sampler.continuation=win"], "continue from the step's winner", None),
    "spo-lose": ("spo", ["sampler.continuation=lose"], "continue from the step's loser", None),
    "spo-no-time": ("spo", ["spm={judge}"], "SPM trained without time conditioning", "spm-no-time"),
    "spo-kappa950": ("spo", ["sampler.divert_step=0"], "train every step (t <= 951)", None),
    "spo-k2": ("spo", ["sampler.k=2"], "pool of 2 candidates per step", None),
    "spo-latent": (
        "spo",
        ["spm={judge}", "judge=latent"],
        "SPO judged by the latent judge (method.md 6), no decode",
        "latent-judge",
    ),
}


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
    demo = DemoConfig(out=str(opts.demo), budget_minutes=opts.budget_minutes)
    configs = Path(__file__).parents[1] / "configs/toy"
    jobs: dict[str, tuple[list[str], Path, str | None]] = {}
    for judge in dict.fromkeys(ARMS[arm][3] for arm in opts.arms if ARMS[arm][3]):
        config, extra = JUDGES[judge]
        args = with_out(stage_args(demo, "spm"), out / judge)
        args[args.index("--config") + 1] = str(configs / config)
        jobs[judge] = (args + extra, out / judge, None)
    for seed in opts.seeds:  # seed-major: a slow spell on the machine hits all arms alike
        for arm in opts.arms:
            stage, extra, _, judge = ARMS[arm]
            run = out / "runs" / f"{arm}-s{seed}"
            overrides = [o.format(judge=out / str(judge) / "final") for o in extra]
            args = with_out(stage_args(demo, stage), run) + [f"seed={seed}", *overrides]
            jobs[run.name] = (args, run, judge)
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


def compare_args(opts, out: Path, runs: list[str]) -> list[str]:
    world = Path(opts.demo) / "world"
    base = world / "base_model"
    models = [f"{{name: base, pipeline: {base}}}"]
    models += [f"{{name: {r}, pipeline: {base}, lora: {out / 'runs' / r / 'final'}}}" for r in runs]
    return [
        "compare",
        "--config",
        str(Path(__file__).parents[1] / "configs/toy/compare.yaml"),
        "--out",
        str(out / "compare"),
        f"prompts={world / 'prompts/eval.txt'}",
        "models=[" + ", ".join(models) + "]",
        f"scorers=[oracle, 'spm:{Path(opts.demo) / 'spm/final'}']",
        f"images_per_prompt={opts.images_per_prompt}",
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
    """replication.json: per scorer and arm the pooled mean, win rate and paired differences."""
    per_image = json.loads((out / "compare/scores.json").read_text())
    seeds = opts.seeds
    summary: dict = {"settings": vars(opts) | {"demo": str(opts.demo)}, "arms": {}}
    for scorer, by_model in per_image["scores"].items():
        base = np.array(by_model["base"])
        tiled_base = np.concatenate([base] * len(seeds), axis=1)
        pooled = {
            arm: np.concatenate([np.array(by_model[f"{arm}-s{s}"]) for s in seeds], axis=1)
            for arm in opts.arms
        }
        table = {"base": {"mean": mean_ci(base, opts.bootstrap)}}
        for arm, scores in pooled.items():
            row = {
                "mean": mean_ci(scores, opts.bootstrap),
                "seed_means": [float(np.mean(by_model[f"{arm}-s{s}"])) for s in seeds],
                "win_rate_vs_base": win_rate_ci(scores, tiled_base, opts.bootstrap),
                "minus_base": mean_ci(scores - tiled_base, opts.bootstrap),
            }
            if arm != "spo" and "spo" in pooled:
                row["minus_spo"] = mean_ci(scores - pooled["spo"], opts.bootstrap)
                row["seed_minus_spo"] = [
                    float(np.mean(by_model[f"{arm}-s{s}"]) - np.mean(by_model[f"spo-s{s}"]))
                    for s in seeds
                ]
                row["win_rate_vs_spo"] = win_rate_ci(scores, pooled["spo"], opts.bootstrap)
            table[arm] = row
        summary["arms"][scorer] = table
    summary["runs"] = {
        f"{arm}-s{s}": run_facts(out / "runs" / f"{arm}-s{s}") for arm in opts.arms for s in seeds
    }
    return summary


def markdown(summary: dict, arms: list[str]) -> str:
    """The tables docs/toy-replication.md quotes."""
    lines = []
    for scorer, table in summary["arms"].items():
        lines += [
            f"### {scorer}",
            "",
            "| arm | mean [95% CI] | seed means | win rate vs base | minus base | minus SPO "
            "| each seed minus SPO | win rate vs SPO |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| base | {format_ci(table['base']['mean'], spec='.3f')} | | | | | | |",
        ]
        for arm in arms:
            row = table[arm]
            seed_means = " / ".join(f"{m:.3f}" for m in row["seed_means"])
            versus = ["", "", ""]
            if "minus_spo" in row:
                versus = [
                    format_ci(row["minus_spo"], spec=".3f"),
                    " / ".join(f"{d:+.3f}" for d in row["seed_minus_spo"]),
                    format_ci(row["win_rate_vs_spo"], "rate", ".2f"),
                ]
            win = format_ci(row["win_rate_vs_base"], "rate", ".2f")
            lines.append(
                f"| {arm} | {format_ci(row['mean'], spec='.3f')} | {seed_means} | {win} | "
                f"{format_ci(row['minus_base'], spec='.3f')} | {' | '.join(versus)} |"
            )
        lines.append("")
    lines += ["| run | steps | training seconds |", "| --- | --- | --- |"]
    for name, facts in summary["runs"].items():
        lines.append(f"| {name} | {facts['steps']} | {facts['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--bootstrap", type=int, default=2000)
    opts = ap.parse_args()
    opts.arms = opts.arms.split(",")
    unknown = [a for a in opts.arms if a not in ARMS]
    for path in ("world/base_model", "world/prompts/eval.txt", "spm/final"):
        if not (opts.demo / path).exists():
            sys.exit(
                f"error: {opts.demo / path} is missing: run `spo demo --out {opts.demo}` first"
            )
    if unknown:
        sys.exit(f"error: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if opts.jobs < 1 or opts.threads < 1 or opts.images_per_prompt < 1 or not opts.seeds:
        sys.exit("error: --jobs, --threads and --images-per-prompt must be >= 1, --seeds non-empty")

    jobs = train_jobs(opts, opts.out)
    run_all(jobs, opts.out, opts.jobs, opts.threads)
    runs = [f"{arm}-s{s}" for arm in opts.arms for s in opts.seeds]
    print("[replication] compare", flush=True)
    run_logged(compare_args(opts, opts.out, runs), opts.out / "logs/compare.log", 2)
    summary = summarise(opts, opts.out)
    (opts.out / "replication.json").write_text(json.dumps(summary, indent=2, default=str))
    (opts.out / "replication.md").write_text(markdown(summary, opts.arms))
    plot_curves(opts, opts.out)
    print((opts.out / "replication.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

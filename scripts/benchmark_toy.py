"""Time the toy-world stages as a user runs them, and collect their results.

Each stage is the real `spo` command with its toy config, run in a fresh process with the
wall-clock time measured around it (what docs/benchmarks.md reports). Results land in
ROOT/benchmark.json and are printed as a markdown table.

Usage: python scripts/benchmark_toy.py [--root runs/bench] [--stages world,spm,spm-no-time]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).parents[1]


def stage_commands(root: Path) -> dict[str, list[str]]:
    """Stage name -> `spo` arguments, chained through ROOT as the toy configs chain runs/toy."""
    world = root / "world"
    spm_inputs = [
        f"base_model={world / 'base_model'}",
        f"pairs.train={world / 'pairs/train.parquet'}",
        f"pairs.validation={world / 'pairs/validation.parquet'}",
    ]
    spm = ["train-preference-model", "--config", str(REPO / "configs/toy/spm.yaml")]
    return {
        "world": ["toy-world", "--out", str(world)],
        "spm": [*spm, "--out", str(root / "spm"), *spm_inputs, "resume=none"],
        "spm-no-time": [
            *spm,
            "--out",
            str(root / "spm-no-time"),
            *spm_inputs,
            "time_conditioning=false",
            "resume=none",
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/bench"))
    ap.add_argument("--stages", default="world,spm,spm-no-time")
    args = ap.parse_args()
    commands = stage_commands(args.root)
    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "stages": {},
    }
    spo = [sys.executable, "-m", "spo.cli"]
    for name in args.stages.split(","):
        start = time.perf_counter()
        proc = subprocess.run([*spo, *commands[name]], cwd=REPO)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"stage {name} failed with exit code {proc.returncode}")
        entry: dict = {"seconds": round(seconds, 1), "command": "spo " + " ".join(commands[name])}
        out = Path(commands[name][commands[name].index("--out") + 1])
        if (out / "eval.json").is_file():
            entry["eval"] = json.loads((out / "eval.json").read_text())
        results["stages"][name] = entry
    (args.root / "benchmark.json").write_text(json.dumps(results, indent=2))
    print("| stage | wall-clock (s) | result |\n| --- | --- | --- |")
    for name, entry in results["stages"].items():
        acc = entry.get("eval", {}).get("accuracy_by_timestep")
        summary = ", ".join(f"t={t}: {a:.3f}" for t, a in acc.items()) if acc else ""
        print(f"| {name} | {entry['seconds']} | {summary} |")


if __name__ == "__main__":
    main()

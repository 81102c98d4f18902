"""Every `spo` command run with every other command's real run folder as `--out`.

    python scripts/out_matrix.py RUNS [--benchmark DIR]

RUNS is a finished demo folder (`spo demo --quick --out RUNS`: its world/, spm/, dpo/, spo/,
compare/ and the demo's own folder); DIR, a benchmark run folder (`spo benchmark --out DIR
prompts=1 num_steps=2 repeats=1`). Each command gets valid inputs from RUNS, so the only thing
wrong with its command line is the `--out`. A cell says `refused` when the command exited with
code 2 and one `spo: error:` line and no file in any of the folders changed, appeared or went;
anything else is shown as it happened. prepare-prompts writes its file inside the folder
(`FOLDER/prompts.txt`). Prints the matrix as a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path


def snapshot(roots: list[Path]) -> dict[str, str]:
    """Path -> sha256 of every file under `roots`."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def command_lines(runs: Path) -> dict[str, list[str]]:
    """Each command with valid inputs from the demo folder `runs`, without `--out`."""
    world = runs / "world"
    base = f"base_model={world / 'base_model'}"
    return {
        "toy-world": ["toy-world"],
        "train-preference-model": [
            "train-preference-model",
            "--config",
            "toy/spm",
            base,
            f"pairs.train={world / 'pairs/train.parquet'}",
            f"pairs.validation={world / 'pairs/validation.parquet'}",
        ],
        "train-dpo": [
            "train-dpo",
            "--config",
            "toy/dpo",
            base,
            f"pairs.train={world / 'pairs/train.parquet'}",
        ],
        "train-spo": [
            "train-spo",
            "--config",
            "toy/spo",
            base,
            f"spm={runs / 'spm/final'}",
            f"prompts={world / 'prompts/train.txt'}",
        ],
        "compare": [
            "compare",
            "--config",
            "toy/compare",
            f"prompts={world / 'prompts/eval.txt'}",
            f"models=[{{name: base, pipeline: {world / 'base_model'}}}]",
            "scorers=[oracle]",
        ],
        "demo": ["demo", "--quick"],
        "benchmark": ["benchmark", "prompts=1", "num_steps=2", "repeats=1"],
        "prepare-prompts": [
            "prepare-prompts",
            f"source={world / 'pairs/train.parquet'}",
            "num_prompts=4",
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="a finished `spo demo` folder")
    parser.add_argument("--benchmark", type=Path, help="a benchmark run folder")
    args = parser.parse_args()
    folders = {
        "toy-world": args.runs / "world",
        "train-preference-model": args.runs / "spm",
        "train-dpo": args.runs / "dpo",
        "train-spo": args.runs / "spo",
        "compare": args.runs / "compare",
        "demo": args.runs,
    }
    if args.benchmark is not None:
        folders["benchmark"] = args.benchmark
    roots = list(folders.values())
    lines = command_lines(args.runs)
    rows = [["command \\ --out"] + list(folders)]
    refused = total = 0
    for command, argv in lines.items():
        row = [command]
        for owner, folder in folders.items():
            if owner == command:
                row.append("(its own)")
                continue
            out = folder / "prompts.txt" if command == "prepare-prompts" else folder
            before = snapshot(roots)
            proc = subprocess.run(
                [sys.executable, "-m", "spo.cli", *argv, "--out", str(out)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            changed = before != snapshot(roots)
            err = proc.stderr.strip().splitlines()
            one_line = len(err) == 1 and err[0].startswith("spo: error: ")
            total += 1
            if proc.returncode == 2 and one_line and not changed:
                refused += 1
                row.append("refused")
            else:
                row.append(f"exit {proc.returncode}, {len(err)} lines, changed: {changed}")
        rows.append(row)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + " --- |" * len(rows[0]))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    print(f"\n{refused} of {total} refused with one line and nothing changed")
    return 0 if refused == total else 1


if __name__ == "__main__":
    sys.exit(main())

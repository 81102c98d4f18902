"""Diffusion-DPO on the toy flow base model at the demo's budget, over seeds (issue 22).

Usage (after `spo toy-world --out runs/toy/world` or `spo demo`, whose world it reads):
    python scripts/toy_flow_dpo.py --toy runs/toy --out runs/flow_dpo [--seeds 0 1 2]
        [--budget-minutes 3.5] [--images-per-prompt 16]

Each seed is the demo's DPO stage (`spo.commands.demo.stage_args`: the same wall-clock budget,
pairs and validation) with the flow config `toy/dpo_flow` on `flow_base_model`, run one after
another with 2 CPU threads. Then one `spo compare` generates `--images-per-prompt` images per
held-out eval prompt for the flow base and every seed's result (the same noise for all), scored
by the oracle. Finished runs, and a finished comparison, are skipped on a rerun.

Statistics (OUT/flow_dpo.json and OUT/flow_dpo.md): per seed and pooled over the seeds, the
oracle reward minus the flow base's on the same (prompt, image seed), with the paired
t-interval over prompts (spo.evaluation.stats.paired_difference_ci). Last, stock diffusers
(`StableDiffusion3Pipeline.load_lora_weights`) and peft (`PeftModel.from_pretrained`) load each
seed's adapter in a process that never imports this project: how much the images change, and
how far the two loaders' images are apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from spo.commands.demo import stage_args
from spo.config import DemoConfig
from spo.evaluation.stats import paired_difference_ci

ROOT = Path(__file__).resolve().parents[1]


def _replication():
    """scripts/toy_replication.py as a module: its job runner (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(
        "toy_replication", Path(__file__).with_name("toy_replication.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replication = _replication()


def train_jobs(opts, out: Path) -> dict[str, tuple[list[str], Path, None]]:
    """seed name -> (spo arguments, output folder, no dependency)."""
    demo = DemoConfig(out=str(opts.toy), budget_minutes=opts.budget_minutes)
    jobs = {}
    for seed in opts.seeds:
        run = out / "runs" / f"dpo_flow-s{seed}"
        args = replication.with_out(stage_args(demo, "dpo"), run)
        args[args.index("--config") + 1] = str(ROOT / "configs/toy/dpo_flow.yaml")
        args = [a for a in args if not a.startswith("base_model=")]
        args += [f"base_model={opts.world / 'flow_base_model'}", f"seed={seed}"]
        jobs[run.name] = (args, run, None)
    return jobs


def compare_args(opts, out: Path, runs: list[str]) -> list[str]:
    base = opts.world / "flow_base_model"
    models = [f"{{name: flow_base, pipeline: {base}}}"]
    models += [f"{{name: {r}, pipeline: {base}, lora: {out / 'runs' / r / 'final'}}}" for r in runs]
    return [
        "compare",
        "--config",
        str(ROOT / "configs/toy/compare_flow.yaml"),
        "--out",
        str(out / "compare"),
        f"prompts={opts.world / 'prompts/eval.txt'}",
        "models=[" + ", ".join(models) + "]",
        f"images_per_prompt={opts.images_per_prompt}",
        "grid_prompts=4",
    ]


LOAD_CHECK = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
from peft import PeftModel
base, lora = sys.argv[1], sys.argv[2]
def sample(pipe):
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    prompts = [l.strip() for l in open(sys.argv[3]) if l.strip()][:4]
    return pipe(prompts, num_inference_steps=20, guidance_scale=2.0, generator=g,
                output_type="np").images
pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
before = sample(pipe)
pipe.load_lora_weights(lora)
after = sample(pipe)
other = StableDiffusion3Pipeline.from_pretrained(base, dtype=torch.float32)
other.set_progress_bar_config(disable=True)
PeftModel.from_pretrained(other.transformer, lora)
with_peft = sample(other)
assert "spo" not in sys.modules
print(float(abs(after - before).max()), float(abs(after - before).mean()),
      float(abs(after - with_peft).max()))
"""


def load_check(opts, run: Path) -> dict[str, float]:
    """Stock diffusers and peft load `run`'s adapter (a fresh process, this project unimported)."""
    base = (opts.world / "flow_base_model").resolve()
    prompts = (opts.world / "prompts/eval.txt").resolve()
    run = run.resolve()
    command = [sys.executable, "-c", textwrap.dedent(LOAD_CHECK), str(base), str(run / "final")]
    res = subprocess.run([*command, str(prompts)], capture_output=True, text=True, cwd="/")
    if res.returncode != 0:
        raise RuntimeError(f"loading {run}/final in stock diffusers / peft failed:\n{res.stderr}")
    change_max, change_mean, peft_gap = map(float, res.stdout.split()[-3:])
    return {"image_change_max": change_max, "image_change_mean": change_mean, "peft_gap": peft_gap}


def summarise(opts, out: Path, runs: list[str]) -> dict:
    per_image = json.loads((out / "compare/scores.json").read_text())["scores"]["oracle"]
    base = np.array(per_image["flow_base"])
    seeds = {r: np.array(per_image[r]) for r in runs}
    summary: dict = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "flow_base_mean": float(base.mean()),
        "seeds": {},
    }
    for run, scores in seeds.items():
        facts = replication.run_facts(out / "runs" / run)
        summary["seeds"][run] = facts | {
            "mean": float(scores.mean()),
            "minus_base": paired_difference_ci(scores, base),
            "load_check": load_check(opts, out / "runs" / run),
        }
    pooled = np.concatenate(list(seeds.values()), axis=1)
    summary["pooled_minus_base"] = paired_difference_ci(pooled, np.tile(base, len(seeds)))
    return summary


def markdown(summary: dict) -> str:
    def interval(d: dict) -> str:
        lo, hi = d["ci95"]
        return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    lines = [
        f"flow base: mean oracle reward {summary['flow_base_mean']:.4f}",
        "",
        "| run | steps | training s | mean R | minus flow base [95% CI] | image change (max / "
        "mean) | diffusers vs peft |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, s in summary["seeds"].items():
        c = s["load_check"]
        lines.append(
            f"| {run} | {s['steps']} | {s['train_seconds']:.0f} | {s['mean']:.4f} | "
            f"{interval(s['minus_base'])} | {c['image_change_max']:.3f} / "
            f"{c['image_change_mean']:.4f} | {c['peft_gap']:.1e} |"
        )
    lines.append(f"| pooled | | | | {interval(summary['pooled_minus_base'])} | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", type=Path, default=Path("runs/toy"), help="its world/ is the world")
    ap.add_argument("--out", type=Path, default=Path("runs/flow_dpo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-minutes", type=float, default=3.5, help="per training run")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per training")
    ap.add_argument("--images-per-prompt", type=int, default=16)
    opts = ap.parse_args()
    opts.world = opts.toy / "world"
    if not (opts.world / "flow_base_model" / "model_index.json").is_file():
        print(f"error: {opts.world} holds no flow_base_model: run `spo toy-world` first")
        return 2
    out = opts.out
    jobs = train_jobs(opts, out)
    replication.run_all(jobs, out, 1, opts.threads)
    runs = list(jobs)
    if not (out / "compare/scores.json").is_file():  # a rerun keeps a finished comparison
        log = out / "logs/compare.log"
        replication.run_logged(compare_args(opts, out, runs), log, opts.threads)
    summary = summarise(opts, out, runs)
    (out / "flow_dpo.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (out / "flow_dpo.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

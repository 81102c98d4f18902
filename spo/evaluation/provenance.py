"""Where the compared models came from, for the report: the content hashes of their weights,
the training runs that made them (the reward against training time, the judge's accuracy at
each timestep) and the software and machine that ran the comparison.

Why read run folders: every trainer leaves `config.yaml`, `metrics.jsonl` and `final/` in one
folder (spo.runs), so a LoRA or UNet inside a run's `final/` leads back to how it was trained
with no extra bookkeeping. What a folder does not hold is reported absent, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml

import spo
from spo.config import CompareConfig
from spo.config.loader import dump_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
PACKAGES = (
    "spo-diffusion",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "open_clip_torch",
)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**24), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(path: Path) -> dict:
    """sha256 of the weights file `path` (as `sha256sum` prints it), or of every weights file
    in the folder `path` and one over them all: the sha256 of their `sha256sum` lines
    ("<hash>  <relative path>\\n", sorted by path)."""
    if path.is_file():
        files = {path.name: path}
    else:
        found = (p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        files = {p.relative_to(path).as_posix(): p for p in found}
    hashes = {name: file_sha256(p) for name, p in sorted(files.items())}
    lines = "".join(f"{h}  {name}\n" for name, h in hashes.items())
    overall = hashes[path.name] if path.is_file() else hashlib.sha256(lines.encode()).hexdigest()
    return {
        "files": hashes,
        "bytes": sum(p.stat().st_size for p in files.values()),
        "sha256": overall,
    }


def local_folder(source: str) -> tuple[Path | None, str | None]:
    """(folder, hub revision) of a pipeline: the path itself, or a hub name's snapshot in the
    local cache and its commit; (None, None) when neither is on this machine."""
    path = Path(source).expanduser()
    if path.exists():
        return path, None
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a hub name
        return None, None
    return folder, folder.name  # the cache keeps a snapshot in snapshots/<commit>


RESULT_FOLDERS = ("final", "best")  # where a run keeps the weights it hands over


def run_folder(weights: str | Path, marker: str = "metrics.jsonl") -> Path | None:
    """The run folder whose `final/` (or `best/`) holds `weights` (a file or folder), when it
    holds `marker`; None for weights that did not come out of a run of this project. The
    folder is named as `weights` names it (a relative path stays relative: the report shows
    no absolute paths of the machine it was made on)."""
    path = Path(os.path.normpath(weights))
    for p in (path, *path.parents):
        if p.name in RESULT_FOLDERS:
            return p.parent if (p.parent / marker).is_file() else None
    return None


def validation_rows(run: Path) -> list[dict]:
    """Every validation of a run, in order: {"step", "seconds", "chain_kl" (None where not
    logged), "scores": {scorer name: mean}}, from the rows of its metrics.jsonl that carry
    `val/train_seconds` (spo.training.validation)."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        seconds = row.get("val/train_seconds")
        if seconds is None:
            continue
        scores = {
            k.removeprefix("val/"): float(v)
            for k, v in row.items()
            if k.startswith("val/") and k not in NOT_SCORES and v is not None
        }
        kl = row.get("val/chain_kl")
        rows.append(
            {
                "step": row.get("step"),
                "seconds": float(seconds),
                "chain_kl": None if kl is None else float(kl),
                "scores": scores,
            }
        )
    return rows


NOT_SCORES = ("val/train_seconds", "val/chain_kl", "val/chain_kl_total")


def validation_curves(run: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{"val/<scorer>": (training seconds, mean score)} of every validation of a run."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for row in validation_rows(run):
        for name, value in row["scores"].items():
            xs, ys = curves.setdefault(f"val/{name}", ([], []))
            xs.append(row["seconds"])
            ys.append(value)
    return curves


def best_validation(run: Path) -> dict | None:
    """The run's best/best.json (the validation best/ was kept at), None without best/."""
    path = run / "best" / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_judge(run: Path) -> Path | None:
    """The judge an SPO run was trained with (`spm` in its config.yaml); None for other runs."""
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    judge = config.get("spm") if isinstance(config, dict) else None
    return Path(judge) if isinstance(judge, str) else None


def judge_accuracy(judge: Path) -> dict | None:
    """What `spo train-preference-model` measured of a judge folder: its eval.json (accuracy
    on the validation pairs at each timestep), None when the folder has none beside it."""
    run = run_folder(judge, "eval.json")
    if run is None:
        return None
    evaluation = json.loads((run / "eval.json").read_text())
    by_t = evaluation["accuracy_by_timestep"]
    return {
        "run": str(run),
        "accuracy_by_timestep": {int(t): by_t[t] for t in sorted(by_t, key=int)},
        "pairs": evaluation.get("validation_pairs"),
        "oracle_ceiling": evaluation.get("oracle_ceiling"),
        "judge": evaluation.get("judge"),
    }


def training_records(cfg: CompareConfig) -> dict:
    """The training behind the compared models: per model with a run folder, its validations
    and best/ record, and which of the run's results it is (final or best); per judge (an SPO
    run's `spm`, or an `spm:` scorer), its accuracy by timestep. {"runs": {model: {"folder",
    "result", "validations", "best"}}, "judges": [{"path", "used_by", "accuracy"}]}."""
    runs, judges = {}, {}
    for spec in cfg.models:
        weights = spec.lora or spec.unet
        run = run_folder(weights) if weights else None
        if run is None:
            continue
        runs[spec.name] = {
            "folder": str(run),
            "result": Path(os.path.normpath(weights)).relative_to(run).parts[0],  # final | best
            "validations": validation_rows(run),
            "best": best_validation(run),
        }
        judge = run_judge(run)
        if judge is not None:
            judges.setdefault(os.path.normpath(judge), []).append(f"judge of {spec.name}")
    for scorer in cfg.scorers:
        name, _, argument = scorer.partition(":")
        if name == "spm" and argument:
            judges.setdefault(os.path.normpath(argument), []).append(f"scorer {name}")
    return {
        "runs": runs,
        "judges": [
            {"path": path, "used_by": used_by, "accuracy": judge_accuracy(Path(path))}
            for path, used_by in judges.items()
        ],
    }


def package_versions() -> dict[str, str]:
    """The installed versions of Python and of the packages a comparison's numbers depend on."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the checkout `spo` runs from ("+ local changes" when tracked files differ
    from it); None when `spo` is an installed package or git is absent."""
    root = Path(spo.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # a package installed inside some other repository
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" + local changes" if changed else "")


def model_weights(cfg: CompareConfig) -> list[dict]:
    """Per model and part (pipeline, LoRA, UNet): its path and the digest of its weights
    (each distinct folder hashed once)."""
    digests: dict[Path, dict] = {}
    rows = []
    for spec in cfg.models:
        parts = [("pipeline", spec.pipeline), ("lora", spec.lora), ("unet", spec.unet)]
        for part, source in parts:
            if source is None:
                continue
            folder, revision = local_folder(source)
            row: dict = {"model": spec.name, "part": part, "source": source}
            if revision is not None:
                row["revision"] = revision
            if folder is None:
                row["digest"] = None  # a hub name that is not in the local cache
            else:
                key = folder.resolve()
                if key not in digests:
                    digests[key] = weights_digest(folder)
                row["digest"] = digests[key]
            rows.append(row)
    return rows


def collect(cfg: CompareConfig, device: str) -> dict:
    """Everything the report's provenance block shows (also written to provenance.json);
    `device` is where the images were generated and scored ("cuda" or "cpu")."""
    training = training_records(cfg)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
        "weights": model_weights(cfg),
        "config": dump_config(cfg),
        "run_configs": {
            model: (Path(run["folder"]) / "config.yaml").read_text()
            for model, run in training["runs"].items()
            if (Path(run["folder"]) / "config.yaml").is_file()
        },
        "training": training,
    }

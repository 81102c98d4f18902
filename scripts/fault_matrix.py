"""The fault matrix: kill, crowd, fill and corrupt the three trainers, and check what survives.

For each trainer (SPM, DPO, SPO) on a small toy world: an uninterrupted reference run, then
`--kills` runs each SIGKILLed (the whole process group) at a random moment and resumed to the
end with the same command (the moment drawn uniformly between the reference run opening its run
folder and its end); every one must end bitwise equal to the reference (the tensors of
`final/`), with no half-written file left. Then: two runs started together on one run folder,
a disk too small for the checkpoints (a tmpfs, where the machine lets us mount one), a
truncated file in the newest checkpoint, and a diverging run (an absurd learning rate). Prints
a markdown table (docs/reliability.md holds one).

Usage: python scripts/fault_matrix.py OUT [--kills 8] [--processes 1|2] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from weights_digest import digest  # noqa: E402

WEIGHTS = {"spm": "model.safetensors", "dpo": "pytorch_lora_weights.safetensors"}
WEIGHTS["spo"] = WEIGHTS["dpo"]


@dataclass
class Launcher:
    """Runs `spo` commands as 1 process or as 2 (torchrun, accelerate on CPU)."""

    processes: int
    env: dict = field(default_factory=lambda: dict(os.environ, OMP_NUM_THREADS="1"))

    def command(self, args: list[str]) -> list[str]:
        if self.processes == 1:
            return [sys.executable, "-m", "spo.cli", *args]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(self.processes),
            "-m",
            "spo.cli",
            *args,
        ]

    def start(self, args: list[str]) -> subprocess.Popen:
        env = dict(self.env, PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="true")
        return subprocess.Popen(
            self.command(args),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a kill takes every worker
        )

    def run(self, args: list[str]) -> tuple[int, str, str, float]:
        start = time.time()
        proc = self.start(args)
        out, err = proc.communicate()
        return proc.returncode, out, err, time.time() - start


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("spo: error:")]


def leftovers(out: Path) -> list[str]:
    """Half-written files or folders in a run folder (what clean_leftovers would remove)."""
    from spo.runs import _LEFTOVER

    found = []
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if _LEFTOVER.match(p.name)]
    return found


def final_digest(out: Path, trainer: str) -> str | None:
    path = out / "final" / WEIGHTS[trainer]
    return digest(path) if path.is_file() else None


def phase(out: Path) -> str:
    """Where a kill landed, read from what it left."""
    if (out / "final" / "train_summary.json").is_file() or (out / "eval.json").is_file():
        return "after final/"
    if leftovers(out):
        return "mid-write"
    steps = sorted((out / "checkpoints").glob("step-*")) if out.is_dir() else []
    if steps:
        return f"after {len(steps)} checkpoint(s)"
    return "before any checkpoint" if out.is_dir() else "before the run folder"


class Matrix:
    def __init__(self, root: Path, launcher: Launcher, seed: int) -> None:
        self.root, self.launcher = root, launcher
        self.rng = random.Random(seed)
        self.rows: list[tuple[str, str, str]] = []
        self.world = root / "world"

    def refused(self, code: int) -> bool:
        """The exit code of a run stopped with one line: 2 (torchrun reports 1 for any
        failed worker)."""
        return code == 2 if self.launcher.processes == 1 else code != 0

    def row(self, case: str, result: str, ok: bool) -> None:
        self.rows.append((case, result, "yes" if ok else "**NO**"))
        print(f"{case}: {result} [{'ok' if ok else 'FAILED'}]", flush=True)

    # ------------------------------------------------------------------------ commands

    def make_world(self) -> None:
        if (self.world / "pairs/train.parquet").is_file():
            return
        args = ["toy-world", "--out", str(self.world), "train_pairs=200", "validation_pairs=32"]
        args += ["grid_prompts=1", "grid_images_per_prompt=1"]
        code, _, err, _ = Launcher(1).run(args)
        if code != 0:
            raise SystemExit(f"toy-world failed: {err[-500:]}")

    def args(self, trainer: str, out: Path, *extra: str) -> list[str]:
        w = self.world
        common = [f"base_model={w}/base_model", "log_every=1", "checkpoint_every=2"]
        if trainer == "spm":
            return [
                "train-preference-model",
                "--config",
                str(REPO / "configs/toy/spm.yaml"),
                "--out",
                str(out),
                *common,
                f"pairs.train={w}/pairs/train.parquet",
                f"pairs.validation={w}/pairs/validation.parquet",
                "max_steps=6",
                "batch_size=8",
                "validation_timesteps=[0,500]",
                *extra,
            ]
        if trainer == "dpo":
            return [
                "train-dpo",
                "--config",
                str(REPO / "configs/toy/dpo.yaml"),
                "--out",
                str(out),
                *common,
                f"pairs.train={w}/pairs/train.parquet",
                "max_steps=8",
                "batch_size=4",
                "validation_images.prompts=[]",
                *extra,
            ]
        return [
            "train-spo",
            "--config",
            str(REPO / "configs/toy/spo.yaml"),
            "--out",
            str(out),
            f"base_model={w}/base_model",
            f"spm={self.root / 'ref-spm/final'}",
            f"prompts={w}/prompts/train.txt",
            "max_prompts=8",
            "sample_batch_size=4",
            "batch_size=2",
            "max_epochs=3",
            "checkpoint_every=1",
            "sampler.num_steps=8",
            "sampler.threshold=0.0",
            "validation_images.prompts=[]",
            *extra,
        ]

    # ------------------------------------------------------------------------ cases

    def reference(self, trainer: str) -> tuple[str, tuple[float, float]]:
        """The uninterrupted run: its weights' digest and (seconds until its run folder was
        opened, seconds until it ended), the window the kills are drawn from."""
        out = self.root / f"ref-{trainer}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.time()
        proc = self.launcher.start(self.args(trainer, out))
        while proc.poll() is None and not (out / "config.yaml").is_file():
            time.sleep(0.05)
        opened = time.time() - start
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"reference {trainer} run failed: {err[-800:]}")
        return final_digest(out, trainer), (opened, time.time() - start)

    def kills(self, trainer: str, n: int, ref: str, window: tuple[float, float]) -> None:
        phases: dict[str, int] = {}
        equal = clean = 0
        for i in range(n):
            out = self.root / f"kill-{trainer}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            proc = self.launcher.start(self.args(trainer, out))
            time.sleep(self.rng.uniform(*window))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            where = "finished before the kill" if proc.returncode == 0 else phase(out)
            phases[where] = phases.get(where, 0) + 1
            code, _, err, _ = self.launcher.run(self.args(trainer, out))
            equal += code == 0 and final_digest(out, trainer) == ref
            clean += not leftovers(out)
            if code != 0:
                print(f"  resume {i} failed: {err[-400:]}", flush=True)
        where = ", ".join(f"{k}: {v}" for k, v in sorted(phases.items()))
        self.row(
            f"{trainer}: {n} SIGKILLs at random moments, each resumed",
            f"{equal}/{n} bitwise equal to the uninterrupted run; {clean}/{n} without leftovers "
            f"(kills landed {where})",
            equal == n and clean == n,
        )

    def launcher_killed(self, ref: str, window: tuple[float, float]) -> None:
        """SIGKILL the launcher alone (2 processes): its workers must end with it, not write on
        as orphans; the next run on the folder is not refused and resumes to the reference."""
        out = self.root / "orphans"
        shutil.rmtree(out, ignore_errors=True)
        proc = self.launcher.start(self.args("dpo", out))
        time.sleep(sum(window) / 2)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only, not its process group
        proc.communicate()
        time.sleep(3)
        pattern = ["pgrep", "-f", "--", f"--out {out} "]
        alive = subprocess.run(pattern, capture_output=True, text=True)
        workers = alive.stdout.split()
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        code, _, err, _ = self.launcher.run(self.args("dpo", out))
        equal = code == 0 and final_digest(out, "dpo") == ref
        self.row(
            "DPO: the torchrun launcher alone SIGKILLed mid-run",
            f"workers left running 3 s later: {len(workers)}; the rerun exit {code}, final "
            f"weights equal the reference: {equal}",
            not workers and equal,
        )

    def concurrent(self) -> None:
        out = self.root / "concurrent"
        shutil.rmtree(out, ignore_errors=True)
        procs = [self.launcher.start(self.args("dpo", out, f"seed={s}")) for s in (0, 1)]
        results = [(p.wait(), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        refused = [e for code, err in results if code != 0 for e in error_lines(err)]
        winner = next((s for s, (code, _) in zip((0, 1), results, strict=True) if code == 0), None)
        recorded = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else ""
        ok = (
            codes[0] == 0
            and codes[1] != 0
            and bool(refused)
            and "in use by another run" in refused[0]
            and f"seed: {winner}\n" in recorded
        )
        self.row(
            "two runs (seeds 0 and 1) started together on one --out",
            f"exit codes {codes}; the second: `{refused[0] if refused else '?'}`; config.yaml "
            f"names the run that wrote final/ (seed {winner})",
            ok,
        )

    def full_disk(self, ref_dpo: str, room_in_checkpoints: float, limit: int) -> None:
        """DPO on a tmpfs with room for `room_in_checkpoints` checkpoints. Less than 2 with a
        limit of 1: one line 'disk full', the last checkpoint intact, leftovers none, and the
        folder, copied to a larger disk, resumes to the reference weights. Room for 2 and
        final/ with a limit of 2: the run completes (old checkpoints go early)."""
        ckpt = self.root / "ref-dpo/checkpoints"
        size = max(
            sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in ckpt.glob("step-*")
        )
        mount = Path(tempfile.mkdtemp(prefix="fault-disk-"))
        room = int(size * room_in_checkpoints) + 64 * 1024  # config, metrics, locks besides
        probe = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
        )
        case = f"DPO on a {room / 1e6:.2f} MB tmpfs (checkpoints of {size / 1e6:.2f} MB, "
        case += f"limit {limit})"
        if probe.returncode != 0:
            self.rows.append((case, f"not run: no tmpfs ({probe.stderr.strip()})", "-"))
            return
        moved = self.root / f"disk-{limit}"
        try:
            out = mount / "dpo"
            args = self.args("dpo", out, f"checkpoints_total_limit={limit}")
            code, _, err, _ = self.launcher.run(args)
            lines = error_lines(err)
            kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
            left = leftovers(out)
            shutil.rmtree(moved, ignore_errors=True)
            shutil.copytree(out, moved)
        finally:
            subprocess.run(["umount", str(mount)], check=False)
            mount.rmdir()
        if code == 0:
            equal = final_digest(moved, "dpo") == ref_dpo
            result = f"exit 0, kept {kept}, final weights equal the reference: {equal}"
            self.row(case, result, equal and not left)
            return
        code2, _, _, _ = self.launcher.run(self.args("dpo", moved))
        equal = code2 == 0 and final_digest(moved, "dpo") == ref_dpo
        full = self.refused(code) and bool(lines) and "disk full" in lines[0]
        result = (
            f"exit {code}: `{lines[0] if lines else '?'}`; kept {kept}, leftovers "
            f"{left or 'none'}; copied to a larger disk it resumed to the reference: {equal}"
        )
        self.row(case, result, full and kept == ["step-2"] and not left and equal)

    def corrupt_latest(self, trainer: str, ref: str) -> None:
        src = self.root / f"ref-{trainer}"
        out = self.root / f"corrupt-{trainer}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out)
        shutil.rmtree(out / "final")
        (out / "eval.json").unlink(missing_ok=True)
        latest = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
        victim = max((f for f in latest.rglob("*.safetensors")), key=lambda f: f.stat().st_size)
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        code, stdout, err, _ = self.launcher.run(self.args(trainer, out))
        fell_back = "does not load" in stdout and "falling back" in stdout
        ok = code == 0 and fell_back and final_digest(out, trainer) == ref
        self.row(
            f"{trainer}: the newest checkpoint's {victim.name} cut in half",
            f"exit {code}; fell back to the previous checkpoint: {fell_back}; final weights "
            f"equal the reference: {final_digest(out, trainer) == ref}",
            ok,
        )

    def diverging(self) -> None:
        out = self.root / "diverge"
        shutil.rmtree(out, ignore_errors=True)
        args = self.args("dpo", out, "optim.lr=1e6", "max_steps=40", "checkpoint_every=1")
        code, _, err, _ = self.launcher.run(args)
        lines = error_lines(err)
        import torch
        from safetensors.torch import load_file

        finite = all(
            all(torch.isfinite(t).all() for t in load_file(f).values())
            for f in (out / "checkpoints").rglob("*.safetensors")
        )
        said = lines[0] if lines else ""
        ok = self.refused(code) and ("non-finite" in said or "not finite" in said) and finite
        self.row(
            "DPO with optim.lr=1e6 (diverges)",
            f"exit {code}: `{lines[0] if lines else '?'}`; every kept checkpoint finite: {finite}",
            ok,
        )

    def table(self) -> str:
        lines = ["| case | result | as expected |", "| --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--kills", type=int, default=8, help="random SIGKILLs per trainer")
    ap.add_argument("--processes", type=int, default=1, choices=(1, 2))
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    ap.add_argument("--trainers", default="spm,dpo,spo")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    m = Matrix(a.out.resolve(), Launcher(a.processes), a.seed)
    m.make_world()
    trainers = a.trainers.split(",")
    refs = {}
    for trainer in ("spm", "dpo", "spo"):  # SPO's judge is the reference SPM
        if trainer in trainers or (trainer == "spm" and "spo" in trainers):
            refs[trainer] = m.reference(trainer)
    for trainer in trainers:
        m.kills(trainer, a.kills, *refs[trainer])
    if "dpo" in trainers:
        if a.processes > 1:
            m.launcher_killed(*refs["dpo"])
        m.concurrent()
        m.full_disk(refs["dpo"][0], 1.5, limit=1)
        m.full_disk(refs["dpo"][0], 2.6, limit=2)  # two checkpoints and final/
        m.diverging()
    for trainer in trainers:
        m.corrupt_latest(trainer, refs[trainer][0])
    table = m.table()
    (a.out / "fault_matrix.md").write_text(table)
    print(f"\n{a.processes} process(es), {a.kills} kills per trainer, seed {a.seed}\n")
    print(table)


if __name__ == "__main__":
    main()

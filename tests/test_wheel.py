"""Installed from a wheel, away from the checkout, `spo` works: the package's acceptance test.

It builds a wheel of this repository, installs it into a new virtual environment and, in an
empty folder, runs `spo demo --quick`, then `spo train-dpo` with no config and no overrides:
the toy experiment, which is the command's built-in defaults (300 steps of 16 pairs, in full,
not capped). 7 minutes on 2 CPU cores shared with other jobs (421 s: the wheel and the venv 4 s,
the quick demo 316 s, the default DPO run the rest); slow, so it runs only with SPO_SLOW=1.

Why the dependencies come from the development venv: installing torch and the rest into the new
venv would download gigabytes. So the wheel is installed with `--no-deps`, and a .pth file in
the new venv appends the development venv's site-packages to sys.path as a plain path: that
venv's own .pth files (an editable install of a checkout among them) are not processed, and
the new venv's site-packages come first, so every file of `spo` and `preference_model` comes
from the wheel. The test checks where they load from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from spo.config import DPOTrainConfig, load_config

ROOT = Path(__file__).parents[1]
# Not part of the source: build output, runs, environments, caches.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache"
)


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 1800) -> str:
    """Run a command; fail the test with its output's tail if it fails."""
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"{argv} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A new venv holding the wheel (its `bin` folder), and the environment to run it in."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip"]
    # no build isolation: the development venv's setuptools builds it, nothing is downloaded
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source], tmp, env)
    (wheel,) = (tmp / "dist").glob("spo_diffusion-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], tmp, env)
    # only now the development venv joins the path: pip above saw no other spo-diffusion, so
    # it could not "upgrade" (uninstall) the development venv's own install
    dev = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([python, "-c", purelib], tmp, env).strip())
    (site / "zz_dev_venv_dependencies.pth").write_text("\n".join(dev) + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", env


@pytest.mark.slow
def test_the_wheel_runs_the_demo_and_the_default_dpo_run_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    work = tmp_path / "work"
    work.mkdir()
    where = run(
        [
            bin_dir / "python",
            "-c",
            "import spo, preference_model, spo.config.shipped as s; "
            "print(spo.__file__, preference_model.__file__, s.shipped_root(), sep='\\n')",
        ],
        work,
        env,
    )
    venv = bin_dir.parent.resolve()
    for line in where.split():
        assert Path(line).resolve().is_relative_to(venv), where  # from the wheel, not a checkout

    out = run([bin_dir / "spo", "demo", "--quick"], work, env)
    assert "--config toy/dpo" in out  # the stages read the shipped toy configs
    assert (work / "runs/toy/compare/report.html").is_file()

    # the demo's quick DPO stage would be resumed: start the default run afresh on its world
    shutil.rmtree(work / "runs/toy/dpo")
    run([bin_dir / "spo", "train-dpo"], work, env)
    dpo = work / "runs/toy/dpo"
    assert (dpo / "final/pytorch_lora_weights.safetensors").is_file()
    assert load_config(DPOTrainConfig, dpo / "config.yaml") == DPOTrainConfig()
    steps = [json.loads(line).get("step") for line in (dpo / "metrics.jsonl").open()]
    assert max(s for s in steps if s is not None) == DPOTrainConfig().max_steps

"""Small helpers shared by the trainer and command tests."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spo.training.checkpoints import Checkpointer

ROOT = Path(__file__).parents[1]
FAULTS = Path(__file__).parent / "faults"
LAUNCH_TIMEOUT = 240  # a hung multi-process run fails its test instead of the suite


def load_script(name: str):
    """`scripts/<name>.py` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_args(out: Path, prompts: Path, models: list[str], *extra: str) -> list[str]:
    """`spo compare` with the toy config and the oracle scorer; `models` as YAML flow maps."""
    return [
        "compare",
        "--config",
        str(ROOT / "configs/toy/compare.yaml"),
        "--out",
        str(out),
        f"prompts={prompts}",
        "models=[" + ", ".join(models) + "]",
        "scorers=[oracle]",
        *extra,
    ]


def one_error_line(capsys) -> str:
    """The command's stderr must be exactly one `spo: error: ...` line; return it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spo: error: ")
    return err[0]


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def run_killed_after_first_checkpoint(run) -> None:
    """Call `run()`, which must die (`Killed`) right after writing its first checkpoint."""
    save = Checkpointer.save

    def save_then_die(self, accelerator, step, state, params=()):
        save(self, accelerator, step, state, params)
        raise Killed

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Checkpointer, "save", save_then_die)
        with pytest.raises(Killed):
            run()


def assert_resume_is_exact(run, straight, killed, weights: str) -> None:
    """Run `run(straight)` uninterrupted; run `run(killed)` but die after its first checkpoint,
    then run it again (resume=latest); both must end with identical `weights` files."""
    assert run(straight) == 0
    run_killed_after_first_checkpoint(lambda: run(killed))
    assert not (killed / "final" / weights).exists()
    assert run(killed) == 0
    a = load_file(straight / "final" / weights)
    b = load_file(killed / "final" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stock_lora_change(pipeline: Path, lora: Path, prompt: str, steps: int) -> float:
    """In a fresh process without `spo`: plain diffusers loads `pipeline`, samples `prompt`
    with DDIM, loads the LoRA folder `lora` with `load_lora_weights` and samples again with the
    same seed; returns the largest pixel change."""
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(pipeline)!r},
                                                       dtype=torch.float32)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        def sample():
            g = torch.Generator().manual_seed(0)
            return pipe([{prompt!r}], num_inference_steps={steps}, generator=g,
                        output_type="np").images
        before = sample()
        pipe.load_lora_weights({str(lora)!r})
        after = sample()
        assert "spo" not in sys.modules
        print(float(abs(after - before).max()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return float(res.stdout.strip().splitlines()[-1])


def spo_args(
    world: Path, judge: Path, out: Path, *extra: str, config: str = "spo.yaml", base=None
) -> list[str]:
    """A short `spo train-spo` on the mini world (2 prompts, 6 steps, every pair kept) with a
    toy config (`configs/toy/<config>`) and the judge folder `judge`."""
    prompts = world / "prompts.txt"
    if not prompts.exists():
        prompts.write_text(
            "a red circle on a white background\na blue cross on a gray background\n"
        )
    return [
        "train-spo",
        "--config",
        str(Path(__file__).parents[1] / "configs/toy" / config),
        "--out",
        str(out),
        f"base_model={base or world / 'base_model'}",
        f"spm={judge}",
        f"prompts={prompts}",
        "sampler.num_steps=6",
        "sampler.divert_step=2",
        "sampler.threshold=0.0",
        "sample_batch_size=2",
        "batch_size=2",
        "max_epochs=2",
        "max_steps=100",
        "log_every=1",
        "validation_images.prompts=[]",
        *extra,
    ]


def judge_training_args(world: Path, out: Path, *extra: str, config: str = "spm.yaml") -> list[str]:
    """A short `spo train-preference-model` on the mini world (4 steps of 4 pairs, a checkpoint
    every 2) with a toy config (`configs/toy/<config>`)."""
    return [
        "train-preference-model",
        "--config",
        str(Path(__file__).parents[1] / "configs/toy" / config),
        "--out",
        str(out),
        f"base_model={world / 'base_model'}",
        f"pairs.train={world / 'pairs/train.parquet'}",
        f"pairs.validation={world / 'pairs/validation.parquet'}",
        "batch_size=4",
        "max_steps=4",
        "log_every=2",
        "checkpoint_every=2",
        *extra,
    ]


def dpo_args(world: Path, out: Path, *extra: str) -> list[str]:
    """A short `spo train-dpo` on the mini world with the toy config: 4 steps of 2 pairs, a
    checkpoint every 2, metrics every step, no validation images; `extra` overrides win."""
    return [
        "train-dpo",
        "--config",
        str(Path(__file__).parents[1] / "configs/toy/dpo.yaml"),
        "--out",
        str(out),
        f"base_model={world / 'base_model'}",
        f"pairs.train={world / 'pairs/train.parquet'}",
        "batch_size=2",
        "max_steps=4",
        "log_every=1",
        "checkpoint_every=2",
        "validation_images.prompts=[]",
        *extra,
    ]


def torchrun(
    args: list[str],
    *,
    fault: str | None = None,
    cpu: bool = True,
    script: Path | None = None,
    accelerate_config: Path | None = None,
):
    """Two CPU processes of `spo.cli ARGS` (or SCRIPT ARGS): `torchrun --nproc_per_node 2`,
    or with `accelerate_config` (a shipped FSDP or DeepSpeed file) `accelerate launch
    --config_file ACCELERATE_CONFIG --num_processes 2`, the engine switched on for CPU
    processes (tests/faults); `fault` injects one. Returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SPO_FAULT", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    if fault or accelerate_config:
        env["PYTHONPATH"] = f"{FAULTS}{os.pathsep}{ROOT}"
    if fault:
        env["SPO_FAULT"] = fault
    target = ["-m", "spo.cli"] if script is None else [str(script)]
    if accelerate_config is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--standalone", *target, *args]
    else:
        if "DEEPSPEED" in accelerate_config.read_text():
            env["SPO_CPU_DEEPSPEED"] = "1"
            env.pop("ACCELERATE_USE_CPU", None)  # DeepSpeed starts only off the CPU path
        else:
            env["SPO_CPU_FSDP"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [str(accelerate_config), "--num_processes", "2", "--mixed_precision", "no"]
        command += [*target, *args]
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # on a hang, the workers go with the launcher
    )
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def launches_resume_exactly(args, root: Path, weights: str, **launch) -> dict[str, torch.Tensor]:
    """`torchrun(args(root / "a"), **launch)` uninterrupted; `args(root / "k")` killed right
    after its first checkpoint and launched again: it resumes, and its `final/<weights>` equals
    the uninterrupted run's bitwise. Returns those weights."""
    straight = torchrun(args(root / "a"), **launch)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = torchrun(args(root / "k"), fault="kill_after_checkpoint", **launch)
    assert killed.returncode != 0
    assert not (root / "k/final" / weights).exists()
    assert (root / "k/checkpoints/latest").is_file()
    resumed = torchrun(args(root / "k"), **launch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, k = (load_file(root / run / "final" / weights) for run in ("a", "k"))
    assert a.keys() == k.keys() and all(torch.equal(a[n], k[n]) for n in a)
    return a


def assert_flux_lora_applies(flux: Path, lora: Path) -> None:
    """Stock `FluxPipeline.load_lora_weights` applies the LoRA folder `lora` to the pipeline
    `flux`: fused, it changes attention projection weights and nothing else."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux)
    before = {n: v.clone() for n, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    after = {n.replace(".base_layer", ""): v for n, v in pipe.transformer.state_dict().items()}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(n.endswith(".weight") and "attn.to_" in n for n in changed)


def assert_trained_unet_saved(world: Path, final: Path) -> dict[str, torch.Tensor]:
    """A full fine-tune's `final/unet/`: it holds every weight the base model has, stock
    `UNet2DConditionModel.from_pretrained` loads them unchanged, and they differ from the base
    model's (it trained). Returns them."""
    from diffusers import UNet2DConditionModel

    name = "diffusion_pytorch_model.safetensors"
    saved = load_file(final / "unet" / name)
    loaded = UNet2DConditionModel.from_pretrained(final / "unet").state_dict()
    base = load_file(world / "base_model/unet" / name)
    assert loaded.keys() == saved.keys() == base.keys()
    assert all(torch.equal(v, saved[n]) for n, v in loaded.items())
    assert any(not torch.equal(base[n].float(), saved[n]) for n in saved)
    return saved

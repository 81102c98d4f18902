"""Decisions every process of a run must take together.

Why: with several processes, a choice made on one rank alone (stop on a non-finite loss, stop
because the time budget is spent, skip a checkpoint that does not load, refuse a run folder
that is in use) leaves the others waiting in the next collective for ever. Each such decision
goes through these helpers first; with one process they cost nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from spo.errors import ConfigError, TrainingError

T = TypeVar("T")


def sharding_launch() -> str | None:
    """The sharding engine the launcher asked for, "FSDP" or "DeepSpeed" (`accelerate launch`
    with such a config sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), else None: known
    before the accelerator, hence before any model, exists."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    return None


def deepspeed_plugin(cfg):
    """The DeepSpeed plugin of a DeepSpeed launch, its ZeRO stage, offload and 16-bit saving
    from the launcher's config, and what the run's own config decides from `cfg`: gradient
    accumulation, clipping (optim.max_grad_norm, 0 = off) and the micro-batch (batch_size).
    A DeepSpeed config file that sets these otherwise is refused in one line: DeepSpeed's value
    would silently replace the config's."""
    from accelerate.utils import DeepSpeedPlugin

    clip = max(0.0, float(cfg.optim.max_grad_norm))
    plugin = DeepSpeedPlugin(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, gradient_clipping=clip
    )
    ds = plugin.deepspeed_config
    asked = {
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": clip,
        "train_micro_batch_size_per_gpu": cfg.batch_size,
    }
    for key, value in asked.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif float(ds[key]) != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={ds[key]} where this run's config says "
                f"{value}; set it to auto there (the run's config decides it)"
            )
    return plugin


def load_models_whole() -> None:
    """Under DeepSpeed, models load whole on every process: accelerate registers the ZeRO
    config with transformers, which then loads any ZeRO-3 model partitioned
    (`deepspeed.zero.Init`), whatever `zero3_init_flag` says. The toolkit's frozen models (text
    encoders, a flow model's T5) run outside DeepSpeed's engine, where a partitioned weight is
    empty; the trained model is split when `accelerator.prepare` hands it to DeepSpeed."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def sharded(accelerator) -> bool:
    """Whether the trained weights are split over the processes (FSDP, DeepSpeed ZeRO: the
    weights themselves at ZeRO-3, else their float32 masters): they are then whole only when
    every rank gathers them, and with FSDP or ZeRO-3 every forward pass needs every rank. The
    engine then also writes the model's checkpoint itself, each rank its part."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def master_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Under DeepSpeed, each trainable weight of `module` (by its state-dict name) whole and in
    float32 as the optimizer keeps it: its master copy, which is what was trained when the
    engine computes in 16 bits, and is split over the ranks (ZeRO-1/2/3). A collective: every
    rank calls it. {} for weights DeepSpeed does not manage (FSDP, DDP)."""
    from accelerate.utils import is_deepspeed_available

    if not is_deepspeed_available():
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            if full is not None:
                masters[name] = full
    return masters


def local_part(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this rank holds: its ZeRO-3 partition, else the tensor itself."""
    return getattr(param, "ds_tensor", param)


def gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` whole and on the CPU, each shard (FSDP's DTensor) gathered from every rank: a
    collective, so every rank calls it with the same keys in the same order."""
    from torch.distributed.tensor import DTensor

    whole = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        whole[key] = value.detach().cpu()
    return whole


def ranks_where(accelerator, flag: bool) -> list[int]:
    """The ranks where `flag` holds, the same list on every rank (one small gather)."""
    if accelerator.num_processes == 1:
        return [0] if flag else []
    mine = torch.tensor([1 if flag else 0], device=accelerator.device)
    flags = accelerator.gather(mine).tolist()
    return [rank for rank, f in enumerate(flags) if f]


def sum_over_ranks(accelerator, values: list[int]) -> list[int]:
    """Integer counts summed over every process (the same list on every rank)."""
    if accelerator.num_processes == 1:
        return list(values)
    summed = accelerator.reduce(torch.tensor(values, device=accelerator.device), reduction="sum")
    return [int(v) for v in summed.tolist()]


def on_main(accelerator, work: Callable[[], T]) -> T | None:
    """`work()` on the main process; a one-line error it raises is raised on every rank (the
    others would otherwise wait for it at the next barrier). Returns work's result on the main
    process, None elsewhere."""
    result, message, kind = None, None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except (ConfigError, TrainingError) as e:
            message, kind = str(e), type(e).__name__
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message, kind = broadcast_object_list([message, kind])
    if message is not None:
        raise (TrainingError if kind == "TrainingError" else ConfigError)(message)
    return result


def die_with_launcher() -> None:
    """A worker started by torchrun / accelerate launch ends when its launcher dies, even by
    SIGKILL (Linux: PR_SET_PDEATHSIG), instead of living on as an orphan that writes into the
    run folder. A launcher already gone by now ends the worker at once."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != launcher or launcher == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def check_world(accelerator) -> None:
    """Refuse a world the launcher and accelerate disagree about: e.g. `accelerate launch
    --multi_gpu` on a CPU host starts several processes that each believe they are rank 0 of
    1, and would all write the same run folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        hint = (
            "; on a CPU host set ACCELERATE_USE_CPU=true (or pass --cpu to accelerate launch)"
            if not torch.cuda.is_available()
            else ""
        )
        raise ConfigError(
            f"the launcher started {launched} processes but each sees a world of "
            f"{accelerator.num_processes} (distributed set-up failed){hint}"
        )

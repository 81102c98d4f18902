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


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with an FSDP config sets
    ACCELERATE_USE_FSDP): known before the accelerator, hence before any model, exists."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def sharded(accelerator) -> bool:
    """Whether the trained model is sharded over the processes (FSDP): its weights are then
    whole only when gathered, and every forward pass needs every rank."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


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

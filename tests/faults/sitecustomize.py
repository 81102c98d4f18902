"""Fault injection (and FSDP / DeepSpeed on CPU) for the multi-process tests, loaded by Python
at start-up when this folder is on PYTHONPATH (tests only; nothing in `spo` knows about it).

SPO_FAULT=kill_after_checkpoint  every process SIGKILLs itself once the first checkpoint is
                                 written (as if the machine went down right after it)
SPO_FAULT=nan_on_rank_1          rank 1 alone sees a non-finite loss at optimiser step 2
SPO_CPU_FSDP=1                   accelerate uses FSDP on CPU processes too (tests/test_fsdp.py)
SPO_CPU_DEEPSPEED=1              accelerate uses DeepSpeed on CPU processes too (test_deepspeed.py)
"""

import os
import signal

FAULT = os.environ.get("SPO_FAULT")

if FAULT == "kill_after_checkpoint":
    from spo.training.checkpoints import Checkpointer

    _save = Checkpointer.save

    def _save_then_die(self, *args, **kwargs):
        path = _save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return path

    Checkpointer.save = _save_then_die

elif FAULT == "nan_on_rank_1":
    from spo.training.loop import TrainLoop

    _step = TrainLoop.optimizer_step

    def _nan_on_rank_1(self, loss):
        if self.accelerator.process_index == 1 and self.step == 2:
            loss = loss * float("nan")
        return _step(self, loss)

    TrainLoop.optimizer_step = _nan_on_rank_1

if os.environ.get("SPO_CPU_FSDP") == "1":
    # accelerate enables FSDP only for accelerator devices (state.py leaves MULTI_CPU out);
    # torch's FSDP2 itself runs on CPU processes over gloo, so the tests switch it on there.
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _init = AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = _fsdp_on_cpu

if os.environ.get("SPO_CPU_DEEPSPEED") == "1":
    # accelerate starts DeepSpeed only when not told to use the CPU, and without an accelerator
    # device it then finds no backend at all (one process of a world of 1 each); DeepSpeed
    # itself runs on CPU processes over gloo (its CPU accelerator), so the tests give it that.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _prepare_backend = PartialState._prepare_backend

    def _gloo_without_a_device(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    PartialState._prepare_backend = _gloo_without_a_device

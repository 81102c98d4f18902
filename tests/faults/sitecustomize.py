"""Fault injection for the multi-process tests, loaded by Python at start-up when this folder is
on PYTHONPATH (tests only; nothing in `spo` knows about it).

SPO_FAULT=kill_after_checkpoint  every process SIGKILLs itself once the first checkpoint is
                                 written (as if the machine went down right after it)
SPO_FAULT=nan_on_rank_1          rank 1 alone sees a non-finite loss at optimiser step 2
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

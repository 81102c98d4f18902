"""Run by tests/test_multiprocess.py under torchrun, 2 CPU processes: the gradient that DDP
leaves after one backward of the SPM loss, for a linear scorer on a fixed batch of 6 pairs.

- `project_even` / `project_uneven`: the trainer's `loss_over_processes`, the batch split 3 + 3
  and 4 + 2 (a process that dropped undecodable pairs has fewer).
- `release`: the released criterion's way: the scores gathered with the differentiable
  all_gather (torch.distributed.nn), the whole batch's loss on every process.
Rank 0 saves the gradients and the logged losses to the file named by argv[1].
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed.nn
from accelerate import Accelerator

from preference_model.losses import preference_loss
from spo.commands.train_preference_model import loss_over_processes

N_PAIRS, DIM = 6, 5


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (6, 2, DIM), labels (6, 2) with two ties, weights (6,): 1 / pairs per caption."""
    features = torch.randn(N_PAIRS, 2, DIM, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 0], [0.5, 0.5], [0, 1], [1, 0], [0.5, 0.5], [0, 1]])
    weights = torch.tensor([1, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 3])
    return features, labels, weights


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Linear(DIM, 1, bias=False))
    features, labels, weights = batch()

    def gradient(rows: slice, loss_of) -> tuple[torch.Tensor, float]:
        model.zero_grad(set_to_none=True)
        scores = model(features[rows]).view(-1, 2)
        step_loss, logged = loss_of(scores, labels[rows], weights[rows])
        accelerator.backward(step_loss)
        return model.module.weight.grad.clone(), float(logged)

    def project(scores, lab, w):
        step_loss, logged, _ = loss_over_processes(accelerator, scores, lab, w)
        return step_loss, logged

    def release(scores, lab, w):
        with warnings.catch_warnings():  # deprecated in favour of functional collectives
            warnings.simplefilter("ignore", FutureWarning)
            gathered = torch.cat(torch.distributed.nn.all_gather(scores))
        loss, _ = preference_loss(gathered[:, 0], gathered[:, 1], labels, weights)
        return loss, loss.item()

    results = {
        "project_even": gradient(slice(3 * rank, 3 * rank + 3), project),
        "project_uneven": gradient(slice(0, 4) if rank == 0 else slice(4, 6), project),
        "release": gradient(slice(3 * rank, 3 * rank + 3), release),
        "initial_weight": (model.module.weight.detach().clone(), 0.0),
    }
    if accelerator.is_main_process:
        torch.save(results, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])

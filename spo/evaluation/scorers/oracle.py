"""The toy world's oracle as a scorer: the ground truth of every toy evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spo.toy.oracle import group_reward, rewards


class OracleScorer:
    """The toy world's oracle reward R in [0, 1] (the ground truth of the toy world); with a
    `group`, that annotator group's oracle of the two-group world (`oracle_large`,
    `oracle_small`)."""

    def __init__(self, group: str | None = None) -> None:
        self.group = group

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        if self.group is None:
            return torch.from_numpy(rewards(arrays, list(prompts))).float()
        values = [group_reward(a, p, self.group) for a, p in zip(arrays, prompts, strict=True)]
        return torch.tensor(values, dtype=torch.float32)

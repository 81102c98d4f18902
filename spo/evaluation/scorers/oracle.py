"""The toy world's oracle as a scorer: the ground truth of every toy evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spo.toy.oracle import rewards


class OracleScorer:
    """The toy world's oracle reward R in [0, 1] (the ground truth of the toy world)."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(rewards(arrays, list(prompts))).float()

"""Fixed-seed validation images of the policy during DPO and SPO training.

Why apart from the loop: it is the one part of training that needs a scorer and a prompt file,
and the reward-against-compute curve of the demo is made of its scores.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from spo.config.schemas import ValidationImagesConfig
from spo.data import load_prompts
from spo.evaluation.scorers import build_scorer, check_scorer
from spo.runs import made_by


class Validator:
    """Fixed-seed samples of the policy during training: a PNG grid per validation and, with
    a scorer, their mean score logged as `val/<scorer>` next to the training seconds (the
    reward against compute curve). Prompts are read when the run is set up, so a bad path fails
    before any compute; the scorer is built by `start`, on the main process's device only."""

    def __init__(self, v: ValidationImagesConfig) -> None:
        prompts = list(v.prompts)
        if v.prompts_file:
            prompts += load_prompts(v.prompts_file, made_by=made_by(v.prompts_file))
        self.v = v
        self.texts = [p for p in prompts for _ in range(v.images_per_prompt)]
        self.seeds = [v.seed + i for i in range(len(self.texts))]
        if v.scorer and self.texts:
            check_scorer(v.scorer, self.texts)
        self.scorer = None
        self.seconds = 0.0  # time spent validating: not charged to the training budget

    def start(self, device: str | torch.device) -> None:
        """Build the scorer (the main process calls it, with its accelerator's device)."""
        if self.v.scorer and self.texts:
            self.scorer = build_scorer(self.v.scorer, device=device)

    @property
    def enabled(self) -> bool:
        return bool(self.texts)

    @property
    def scored(self) -> bool:
        """Whether validations are scored (step 0's point of the reward curve is then made)."""
        return bool(self.v.scorer and self.texts)

    def due(self, step: int) -> bool:
        return self.enabled and bool(self.v.every) and step % self.v.every == 0

    def run(self, model, folder: Path, step: int, logger, elapsed_s: float) -> None:
        """Sample with the policy as it is now (`model.pipe` holds it); write the grid."""
        from torchvision.utils import save_image

        v, start = self.v, time.time()
        images = model.generate(self.texts, self.seeds, v.num_inference_steps, v.guidance_scale)
        folder.mkdir(parents=True, exist_ok=True)
        save_image(images, folder / f"step-{step}.png", nrow=max(v.images_per_prompt, 4))
        logger.log_images(step, "val/images", images)
        if self.scorer is not None:
            score = float(self.scorer(images, self.texts).mean())
            logger.log(step, {f"val/{v.scorer}": score, "val/train_seconds": elapsed_s})
        self.seconds += time.time() - start

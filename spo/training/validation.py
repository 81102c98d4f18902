"""Fixed-seed validation of the policy during DPO and SPO training.

Why apart from the loop: it is the one part of training that needs scorers and a prompt file.
Each validation makes the proxy-against-gold record of a run (docs/training.md): the mean of
each scorer on the validation images, the KL of the policy's sampling chain from the
reference's (`spo.divergence`), and the training seconds; and it keeps `best/` by a held-out
scorer, so a user gets the checkpoint from before the judge was over-optimised.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spo.config.schemas import SamplerConfig, ValidationImagesConfig, scorer_name
from spo.data import load_prompts
from spo.evaluation.scorers import build_scorer, check_scorer
from spo.runs import made_by

BEST_FILE = "best.json"


@dataclass
class Best:
    """The best validation so far by `select_by` (what a checkpoint keeps of it)."""

    step: int | None = None
    score: float | None = None
    misses: int = 0  # validations in a row without a new best

    def improved_by(self, score: float) -> bool:
        return self.score is None or score > self.score


class Validator:
    """Fixed-seed samples of the policy during training: a PNG grid per validation; with
    scorers, their mean scores logged as `val/<name>` next to the training seconds and the
    chain KL; with `select_by`, `best/`. Prompts and scorer specs are checked when the run is
    set up, so a bad path fails before any compute; the scorers are built by `start`, on the
    main process's device only."""

    def __init__(self, v: ValidationImagesConfig) -> None:
        prompts = list(v.prompts)
        if v.prompts_file:
            prompts += load_prompts(v.prompts_file, made_by=made_by(v.prompts_file))
        self.v = v
        self.texts = [p for p in prompts for _ in range(v.images_per_prompt)]
        self.seeds = [v.seed + i for i in range(len(self.texts))]
        if self.texts:
            for spec in v.scorers:
                check_scorer(spec, self.texts)
        self.scorers: dict[str, object] = {}
        self.best = Best()
        self.seconds = 0.0  # time spent validating: not charged to the training budget

    def start(self, device: str | torch.device) -> None:
        """Build the scorers (the main process calls it, with its accelerator's device)."""
        if self.texts:
            self.scorers = {scorer_name(s): build_scorer(s, device=device) for s in self.v.scorers}

    @property
    def enabled(self) -> bool:
        return bool(self.texts)

    @property
    def scored(self) -> bool:
        """Whether validations are scored (step 0's point of the reward curve is then made)."""
        return bool(self.v.scorers and self.texts)

    @property
    def selecting(self) -> bool:
        return self.scored and self.v.select_by is not None

    def due(self, step: int) -> bool:
        return self.enabled and bool(self.v.every) and step % self.v.every == 0

    def run(
        self, model, folder: Path, step: int, logger, elapsed_s: float, policy=None, *, main=True
    ) -> dict:
        """Sample with the policy as it is now (`model.pipe` holds it), write the grid, score
        it; with `policy` (a `spo.policy.Policy`) also the chain KL. Returns what was logged
        (without the `val/` prefix). A sharded run's other ranks (not `main`) only take part
        in the sampling, and get {}."""
        from torchvision.utils import save_image

        v, start = self.v, time.time()
        images = model.generate(self.texts, self.seeds, v.num_inference_steps, v.guidance_scale)
        kl = None
        if self.scored and v.chain_kl and policy is not None:
            kl = self._chain_kl(model, policy)
        if not main:
            self.seconds += time.time() - start
            return {}
        folder.mkdir(parents=True, exist_ok=True)
        save_image(images, folder / f"step-{step}.png", nrow=max(v.images_per_prompt, 4))
        logger.log_images(step, "val/images", images)
        logged: dict[str, float] = {}
        for name, scorer in self.scorers.items():
            logged[name] = float(scorer(images, self.texts).mean())
        if kl is not None:
            logged |= {
                "chain_kl": float(kl.per_element.mean()),
                "chain_kl_total": float(kl.total.mean()),
            }
        if logged:
            logged["train_seconds"] = elapsed_s
            logger.log(step, {f"val/{k}": value for k, value in logged.items()})
        self.seconds += time.time() - start
        return logged

    def _chain_kl(self, model, policy):
        from spo.divergence import chain_kl
        from spo.pool_sampler import step_schedule

        settings = SamplerConfig(
            num_steps=self.v.num_inference_steps, guidance_scale=self.v.guidance_scale
        )
        schedule = step_schedule(model, settings)
        generator = torch.Generator().manual_seed(self.v.seed)
        return chain_kl(model, schedule, policy.unet, policy.reference, self.texts, generator)

    def select(self, logged: dict, step: int) -> bool:
        """Whether the validation `logged` at `step` is a new best by `select_by` (and the
        count of validations without one, for `patience`)."""
        score = logged.get(self.v.select_by) if self.selecting else None
        if score is None:
            return False
        if self.best.improved_by(score):
            self.best = Best(step=step, score=score)
            return True
        self.best.misses += 1
        return False

    def patience_spent(self) -> bool:
        return self.v.patience is not None and self.best.misses >= self.v.patience

    def best_record(self, step: int, logged: dict) -> bytes:
        """best.json: the step, the selecting scorer and every score of that validation."""
        record = {"step": step, "select_by": self.v.select_by, "scores": logged}
        return (json.dumps(record, indent=2) + "\n").encode()

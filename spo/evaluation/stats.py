"""Statistics of a comparison: means and win rates with bootstrap intervals over prompts.

Why resample prompts: images of one prompt are not independent (same text, similar content),
so the unit of the bootstrap is the prompt with all its images (a cluster bootstrap). The
resampling generator is seeded, so the same scores always give the same intervals.
"""

from __future__ import annotations

import numpy as np


def _percentile_ci(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _prompt_resamples(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))


def mean_ci(
    scores: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, object]:
    """`scores` (prompts, images per prompt) -> {"mean", "ci95", "n"}: the mean over all
    images and a percentile bootstrap interval resampling prompts."""
    per_prompt = scores.mean(axis=1)
    idx = _prompt_resamples(len(per_prompt), n_boot, seed)
    boot = per_prompt[idx].mean(axis=1)
    return {
        "mean": float(scores.mean()),
        "ci95": _percentile_ci(boot, level),
        "n": int(scores.size),
    }


def win_rate_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, object]:
    """How often A beats B on the same (prompt, seed): wins 1, ties 0.5, losses 0.
    `a`, `b`: (prompts, images per prompt). Returns {"rate", "ci95", "n"}."""
    outcome = (a > b).astype(np.float64) + 0.5 * (a == b)
    per_prompt = outcome.mean(axis=1)
    idx = _prompt_resamples(len(per_prompt), n_boot, seed)
    boot = per_prompt[idx].mean(axis=1)
    return {"rate": float(outcome.mean()), "ci95": _percentile_ci(boot, level), "n": int(a.size)}


def format_ci(entry: dict, key: str = "mean", spec: str = ".4g") -> str:
    """ "value [lo, hi]" of a `mean_ci` / `win_rate_ci` entry, each number formatted with `spec`."""
    lo, hi = entry["ci95"]
    return f"{entry[key]:{spec}} [{lo:{spec}}, {hi:{spec}}]"

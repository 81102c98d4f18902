"""Statistics of a comparison: means and win rates with bootstrap intervals over prompts,
paired differences with t-intervals over prompts, a judge's accuracy with a Wilson interval.

Why resample prompts: images of one prompt are not independent (same text, similar content),
so the unit of the bootstrap is the prompt with all its images (a cluster bootstrap). The
resampling generator is seeded, so the same scores always give the same intervals.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, t


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


def paired_difference_ci(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, object]:
    """Mean of A - B on the same (prompt, seed), with a Student-t interval over prompts.

    `a`, `b`: (prompts, images per prompt). The images of a prompt are averaged first (they are
    not independent), so the interval is the paired t-interval of the per-prompt mean
    differences: no resampling, and right for the few prompts a toy comparison has, where a
    percentile bootstrap is too narrow. One prompt gives no interval (`ci95` None).
    Returns {"mean", "ci95", "n", "prompts"}.
    """
    per_prompt = (a - b).mean(axis=1)
    mean, ci = _t_interval(per_prompt, level)
    return {"mean": mean, "ci95": ci, "n": int(a.size), "prompts": len(per_prompt)}


def seed_mean_ci(values, level: float = 0.95) -> dict[str, object]:
    """Mean of one number per training seed with a Student-t interval over the seeds (None
    for one seed): the interval for quantities a run has once, such as its validation peak.
    Returns {"mean", "ci95", "n"}."""
    values = np.asarray(values, dtype=np.float64)
    mean, ci = _t_interval(values, level)
    return {"mean": mean, "ci95": ci, "n": len(values)}


def _t_interval(values: np.ndarray, level: float) -> tuple[float, list[float] | None]:
    """The mean of independent values and its Student-t interval (None for a single value)."""
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return mean, None
    half = float(t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
    return mean, [mean - half, mean + half]


def wilson_ci(rate: float, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion `rate` observed on `n` trials (a judge's accuracy
    on n pairs): unlike rate +- 1.96 se it stays in [0, 1] and is not zero-width at 0 or 1."""
    z = float(norm.ppf(0.5 + level / 2))
    shrink = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / shrink
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / shrink
    return [float(centre - half), float(centre + half)]


def format_ci(entry: dict, key: str = "mean", spec: str = ".4g") -> str:
    """ "value [lo, hi]" of a `mean_ci` / `win_rate_ci` entry, each number formatted with `spec`."""
    lo, hi = entry["ci95"]
    return f"{entry[key]:{spec}} [{lo:{spec}}, {hi:{spec}}]"

"""`spo prepare-prompts`: the prompt file SPO trains on, drawn from a dataset's captions.

Why: the SPO paper trained on 4000 prompts drawn from Pick-a-Pic v1's training split but did
not publish the list, so the real SPO configs name data/pickapic_4k_prompts.txt and this
command writes it by the same recipe: every caption of the split (the caption column alone,
never the images), whitespace collapsed, duplicates dropped, then `num_prompts` of them drawn
without replacement by a generator seeded with `seed`. The draw is from the sorted unique
captions, so it depends on which captions the split holds, not on the order they are read in.
The file is written atomically: a killed run leaves the old file or none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spo.commands import report
from spo.config import PreparePromptsConfig
from spo.data import load_prompts
from spo.errors import ConfigError
from spo.runs import atomic_write_bytes, check_writable


def run(cfg: PreparePromptsConfig) -> int:
    """`spo prepare-prompts`: write the file, print what was drawn from what."""
    result = prepare_prompts(cfg)
    return report(result, f"{result['prompts']} prompts written to {cfg.out}")


def different_prompts(captions: list[str]) -> list[str]:
    """The different captions, whitespace collapsed (a prompt file holds one a line), sorted."""
    return sorted({" ".join(c.split()) for c in captions} - {""})


def draw_prompts(unique: list[str], n: int, seed: int) -> list[str]:
    """`n` of the `unique` prompts, drawn without replacement in a seeded order."""
    if len(unique) < n:
        raise ConfigError(
            f"only {len(unique)} different captions, fewer than num_prompts={n}; ask for fewer "
            "or use a larger split"
        )
    picked = np.random.default_rng(seed).choice(len(unique), size=n, replace=False)
    return [unique[i] for i in picked]


def prepare_prompts(cfg: PreparePromptsConfig) -> dict:
    """Draw the prompts and write them; returns a summary of the draw."""
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"cannot write the prompt file {out}: it is a folder")
    check_writable(out.parent)
    captions = load_prompts(cfg.source, cfg.column, cfg.split)
    unique = different_prompts(captions)
    prompts = draw_prompts(unique, cfg.num_prompts, cfg.seed)
    atomic_write_bytes(out, ("\n".join(prompts) + "\n").encode("utf-8"))
    return {
        "out": str(out),
        "source": cfg.source,
        "split": cfg.split,
        "captions_read": len(captions),
        "different_captions": len(unique),
        "prompts": len(prompts),
        "seed": cfg.seed,
    }

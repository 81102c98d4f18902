"""Measure the toy world's oracle against the hidden truth (the numbers in docs/toy-world.md).

Prints, as JSON: Spearman(quality, R) on renders and on renders passed through the shipped VAE;
the oracle's recognition rates on renders per quality level; the same after the VAE round trip.
Usage: python scripts/measure_toy_world.py [--n 600]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from diffusers import AutoencoderKL
from scipy.stats import spearmanr

from spo.toy.base_model import BASE_MODEL_DIR, vae_round_trip
from spo.toy.oracle import evaluate, recognition_rates
from spo.toy.render import all_prompts, render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="renders at random quality")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    prompts = all_prompts()
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=args.n)]
    qs = rng.uniform(size=args.n)
    imgs = np.stack([render(p, q, rng) for p, q in zip(chosen, qs, strict=True)])
    vae = AutoencoderKL.from_pretrained(BASE_MODEL_DIR / "vae", dtype=torch.float32)
    rec = vae_round_trip(vae, imgs)
    result: dict = {"renders": args.n}
    for name, batch in (("render", imgs), ("vae_round_trip", rec)):
        reports = [evaluate(im, p) for im, p in zip(batch, chosen, strict=True)]
        result[f"spearman_quality_reward/{name}"] = float(
            spearmanr(qs, [r.reward for r in reports]).correlation
        )
        for lo in (0.0, 0.25, 0.5, 0.75):
            keep = (qs >= lo) & (qs < lo + 0.25)
            rates = recognition_rates(
                [r for r, k in zip(reports, keep, strict=True) if k],
                [p for p, k in zip(chosen, keep, strict=True) if k],
            )
            result[f"recognition/{name}/quality {lo:.2f}-{lo + 0.25:.2f}"] = {
                k: round(v, 3) for k, v in rates.items()
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

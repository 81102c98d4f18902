"""The simulated annotator: turns the oracle reward into Pick-a-Pic-style labels.

P(A preferred over B) = sigmoid((R_A - R_B) / tau); a tie (0.5, 0.5) when |R_A - R_B| < delta,
as a human who cannot tell two pictures apart. Labels follow Pick-a-Pic: `label_0` in
{1, 0, 0.5} and `label_1 = 1 - label_0`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from spo.toy.oracle import reward
from spo.toy.render import Prompt, render


def preference_label(
    r0: float, r1: float, tau: float, delta: float, rng: np.random.Generator
) -> float:
    """label_0 for a pair with rewards (r0, r1): 0.5 for a tie, else a Bradley-Terry draw."""
    if abs(r0 - r1) < delta:
        return 0.5
    p0 = 1.0 / (1.0 + np.exp(-(r0 - r1) / tau))
    return 1.0 if rng.random() < p0 else 0.0


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def labelled_pairs(
    prompts: list[Prompt], n: int, tau: float, delta: float, rng: np.random.Generator
) -> Iterator[dict]:
    """n rows in the Pick-a-Pic schema: two renders of one prompt at independent random
    qualities, labelled by the annotator. Extra columns keep the hidden truth for analysis."""
    for _ in range(n):
        p = prompts[rng.integers(len(prompts))]
        q0, q1 = rng.uniform(size=2)
        im0, im1 = render(p, q0, rng), render(p, q1, rng)
        r0, r1 = reward(im0, p), reward(im1, p)
        label_0 = preference_label(r0, r1, tau, delta, rng)
        yield {
            "caption": p.text,
            "jpg_0": png_bytes(im0),
            "jpg_1": png_bytes(im1),
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "quality_0": float(q0),
            "quality_1": float(q1),
            "reward_0": float(r0),
            "reward_1": float(r1),
        }

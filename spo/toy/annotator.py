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
from scipy.special import expit

from spo.toy.oracle import GROUPS, group_reward, reward
from spo.toy.render import Prompt, render


def preference_label(
    r0: float, r1: float, tau: float, delta: float, rng: np.random.Generator
) -> float:
    """label_0 for a pair with rewards (r0, r1): 0.5 for a tie, else a Bradley-Terry draw."""
    if abs(r0 - r1) < delta:
        return 0.5
    p0 = expit((r0 - r1) / tau)  # the logistic function, without overflow for a small tau
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


def group_labelled_pairs(
    prompts: list[Prompt], n: int, tau: float, delta: float, rng: np.random.Generator
) -> Iterator[dict]:
    """The two-group world's pairs: n pairs of renders at independent random qualities and
    object scales (0.6 to 1.4), each labelled by an annotator of every group of
    `spo.toy.oracle.GROUPS` with that group's oracle: 2n rows, the group in `user_id` (the
    annotator column of Pick-a-Pic), the pair's number in `pair`."""
    for i in range(n):
        p = prompts[rng.integers(len(prompts))]
        q0, q1 = rng.uniform(size=2)
        s0, s1 = rng.uniform(0.6, 1.4, size=2)
        im0, im1 = render(p, q0, rng, scale=s0), render(p, q1, rng, scale=s1)
        jpg_0, jpg_1 = png_bytes(im0), png_bytes(im1)
        for group in GROUPS:
            r0, r1 = group_reward(im0, p, group), group_reward(im1, p, group)
            label_0 = preference_label(r0, r1, tau, delta, rng)
            yield {
                "caption": p.text,
                "jpg_0": jpg_0,
                "jpg_1": jpg_1,
                "label_0": label_0,
                "label_1": 1.0 - label_0,
                "user_id": group,
                "pair": i,
                "scale_0": float(s0),
                "scale_1": float(s1),
                "reward_0": float(r0),
                "reward_1": float(r1),
            }

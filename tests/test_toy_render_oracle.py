"""The toy world's renderer, oracle, annotator, prompt split and tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from spo.toy.annotator import preference_label
from spo.toy.oracle import WEIGHTS, evaluate, reward
from spo.toy.render import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZE,
    Prompt,
    all_prompts,
    render,
    split_prompts,
)


def test_render_is_rgb_and_reproducible():
    p = Prompt("red", "circle", "white")
    a = render(p, 0.5, np.random.default_rng(3))
    b = render(p, 0.5, np.random.default_rng(3))
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(p, 0.5, np.random.default_rng(4)))


def test_perfect_render_has_prompt_colours():
    img = render(Prompt("blue", "square", "black"), 1.0, np.random.default_rng(0))
    assert np.allclose(img[0, 0], BACKGROUNDS["black"], atol=2)
    assert np.allclose(img[SIZE // 2, SIZE // 2], COLOURS["blue"], atol=2)


def test_prompt_text_round_trip_and_rejects_other_text():
    for p in all_prompts():
        assert Prompt.parse(p.text) == p
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        Prompt.parse("a photo of a cat")


def test_eval_split_holds_unseen_combinations_of_seen_words():
    train, held_out = split_prompts()
    assert len(train) + len(held_out) == len(COLOURS) * len(SHAPES) * len(BACKGROUNDS)
    assert len(held_out) == 16 and not set(train) & set(held_out)
    for attr in ("colour", "shape", "background"):
        assert {getattr(p, attr) for p in held_out} <= {getattr(p, attr) for p in train}


def test_oracle_reward_follows_hidden_quality():
    rng = np.random.default_rng(1)
    prompts = all_prompts()
    qs, rs = [], []
    for _ in range(300):
        p, q = prompts[rng.integers(len(prompts))], rng.uniform()
        qs.append(q)
        rs.append(reward(render(p, q, rng), p))
    assert spearmanr(qs, rs).correlation >= 0.9


def test_oracle_recognises_clean_renders():
    """Clean = defect severity at most one half (quality >= 0.5); heavier blur, shrinking and
    washing-out destroy the object on purpose (docs/toy-world.md gives rates per quality)."""
    rng = np.random.default_rng(2)
    hits, n = np.zeros(3), 0
    for p in all_prompts():
        for q in (0.5, 0.7, 0.9, 1.0):
            r = evaluate(render(p, q, rng), p)
            hits += [
                r.seen_colour == p.colour,
                r.seen_shape == p.shape,
                r.seen_background == p.background,
            ]
            n += 1
    assert (hits / n >= 0.95).all(), hits / n


def test_oracle_prefers_the_prompt_that_was_drawn():
    rng = np.random.default_rng(5)
    img = render(Prompt("green", "triangle", "gray"), 0.9, rng)
    right = reward(img, "a green triangle on a gray background")
    for wrong in (
        "a red triangle on a gray background",
        "a green circle on a gray background",
        "a green triangle on a white background",
    ):
        assert reward(img, wrong) < right - 0.05


def test_oracle_judges_any_image():
    flat = np.full((SIZE, SIZE, 3), 128, np.uint8)
    r = evaluate(flat, "a red circle on a gray background")
    assert r.seen_colour is None and r.colour == 0.0 and r.background > 0.99
    assert 0.0 <= r.reward <= sum(WEIGHTS.values())
    big = np.asarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3)), np.uint8)
    assert 0.0 <= reward(big, "a red circle on a gray background") <= 1.0
    floats = render(Prompt("red", "circle", "gray"), 1.0, rng := np.random.default_rng(0)) / 255.0
    assert reward(floats, "a red circle on a gray background") == pytest.approx(
        reward(
            render(Prompt("red", "circle", "gray"), 1.0, np.random.default_rng(0)),
            "a red circle on a gray background",
        ),
        abs=1e-6,
    )
    del rng


def test_annotator_ties_and_bradley_terry_rate():
    rng = np.random.default_rng(0)
    assert preference_label(0.50, 0.52, tau=0.05, delta=0.03, rng=rng) == 0.5
    labels = np.array(
        [preference_label(0.6, 0.5, tau=0.05, delta=0.03, rng=rng) for _ in range(4000)]
    )
    assert set(np.unique(labels)) == {0.0, 1.0}
    expected = 1 / (1 + np.exp(-0.1 / 0.05))  # 0.881
    assert abs(labels.mean() - expected) < 0.02


def test_tokenizer_has_clip_token_ids():
    open_clip = pytest.importorskip("open_clip")
    from spo.toy.text import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer(16)
    assert len(tok) == VOCAB_SIZE
    text = "a pink cross on a teal background, highly detailed"
    ids = tok(text).input_ids
    assert ids == open_clip.tokenize([text])[0][: len(ids)].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407

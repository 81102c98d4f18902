"""SPM training: loss and accuracy math, noisy-image maker, pair data checks, the recipe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_resume_is_exact, judge_training_args, one_error_line
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

from preference_model import StepAwarePreferenceModel
from preference_model.losses import pairwise_accuracy, preference_loss
from preference_model.noisy import NoisyImageMaker
from spo.cli import main
from spo.commands.train_preference_model import load_split, relabel_by_backbone
from spo.config import SPMTrainConfig, load_config
from spo.data import (
    BadImageCounter,
    PairDataset,
    check_pair_table,
    decode_image,
    load_pair_table,
    share_lower_bound,
)
from spo.errors import ConfigError
from spo.models import DiffusionModel

ROOT = Path(__file__).parents[1]


def _args(world: Path, out: Path, *extra: str) -> list[str]:
    clip = f"backbone.model={world / 'clip.json'}"
    return judge_training_args(
        world, out, clip, "validation_every=0", "optim.warmup_steps=0", *extra
    )


# ------------------------------------------------------------------------------ math


def test_preference_loss_hand_values_with_the_tie_offset():
    """Cross-entropy against the soft labels plus log 0.5 for a tie, weighted by w / sum(w):
    p0 = 3/4 for scores (ln 3, 0), so a won pair costs ln(4/3), a tie at those scores
    -(ln(3/4) + ln(1/4)) / 2 + ln(1/2) = ln(4/3) / 2, and a tie at equal scores 0."""
    ln3 = math.log(3)
    s0, s1 = torch.tensor([ln3, ln3, 2.0, 0.0]), torch.tensor([0.0, 0.0, 2.0, ln3])
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    per_pair = [math.log(4 / 3), math.log(4 / 3) / 2, 0.0, math.log(4)]
    loss, p0 = preference_loss(s0, s1, labels)
    assert loss.item() == pytest.approx(sum(per_pair) / 4, rel=1e-6)
    assert p0.tolist() == pytest.approx([0.75, 0.75, 0.5, 0.25], rel=1e-6)
    weights = torch.tensor([1 / 2, 1 / 2, 1.0, 1 / 4])  # 1 / pairs per caption
    loss_w, _ = preference_loss(s0, s1, labels, weights)
    assert loss_w.item() == pytest.approx((3 * math.log(4 / 3) + math.log(4)) / 9, rel=1e-6)
    half, _ = preference_loss(s0[:2], s1[:2], labels[:2], weights[:2], weight_total=9 / 4)
    assert half.item() == pytest.approx(3 * math.log(4 / 3) / 9, rel=1e-6)
    nothing, _ = preference_loss(s0[:1], s1[:1], labels[:1], torch.zeros(1), weight_total=0.0)
    assert nothing.item() == 0.0  # a stand-in batch on every process


def test_shares_over_processes_give_the_gathered_batch_loss_and_gradient():
    """Two processes, each back-propagating 2 x its share (its pairs' w * l over the whole
    batch's sum of w), leave after DDP's mean exactly the gradient of the released loss of the
    gathered batch; normalising each process by its own weights (the old way) does not."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5, 2, 3, generator=gen)
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    weights = torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3, 1 / 2])
    theta = torch.randn(3, generator=gen)

    def run(rows: slice, weight_total=None, scale: float = 1.0):
        t = theta.clone().requires_grad_(True)
        s = features[rows] @ t
        loss, _ = preference_loss(
            s[:, 0], s[:, 1], labels[rows], weights[rows], weight_total=weight_total
        )
        (scale * loss).backward()
        return loss.item(), t.grad

    whole, grad = run(slice(0, 5))
    ranks = [slice(0, 2), slice(2, 5)]
    shares = [run(rows, weights.sum(), scale=2) for rows in ranks]
    assert sum(loss for loss, _ in shares) == pytest.approx(whole, rel=1e-6)
    assert torch.allclose((shares[0][1] + shares[1][1]) / 2, grad, atol=1e-6)
    own = [run(rows)[1] for rows in ranks]
    assert not torch.allclose((own[0] + own[1]) / 2, grad, atol=1e-2)


def test_pairwise_accuracy_skips_ties_and_halves_equal_scores():
    s0 = torch.tensor([2.0, 0.0, 1.0, 5.0, 1.0])
    s1 = torch.tensor([1.0, 3.0, 3.0, 0.0, 1.0])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    accuracy, n = pairwise_accuracy(s0, s1, labels)
    assert n == 4
    assert accuracy == pytest.approx((1 + 0 + 1 + 0.5) / 4)


# ------------------------------------------------------------------------------ noisy images


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_sdxl])
def test_noisy_maker_batches_and_shares_noise(builder, tmp_path):
    model = DiffusionModel.from_pretrained(str(builder(tmp_path / "pipe")))
    assert model.family == ("sdxl" if builder is build_tiny_sdxl else "sd")
    calls = []
    model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    encoded = []
    family, original = model.family_module, model.family_module.encode
    family.encode = lambda prompts, device: (
        encoded.append(list(prompts)) or original(prompts, device)
    )

    maker = NoisyImageMaker(
        model, guidance_scale=5.0, max_pairs=4, sample_posterior=False, noise_t0=False
    )
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(7, 2, 3, 32, 32) * 2 - 1
    pixels[1, 1] = pixels[1, 0]  # a pair of identical images
    captions = ["a red circle", "a blue square", "a red circle"] * 2 + ["a cat"]
    t = torch.tensor([0, 500, 999, 250, 1, 10, 700])
    out = maker(pixels, captions, t, g)

    assert out.shape == pixels.shape
    assert torch.equal(out[0], pixels[0])  # t = 0: the clean image itself
    assert calls == [4 * 4, 2 * 4]  # 6 noisy pairs, 4 per call: both images, cond + uncond
    assert torch.equal(out[1, 0], out[1, 1])  # same image, same t, same noise -> same x0_hat
    assert not torch.equal(out[1, 0], pixels[1, 0])
    assert out.min() >= -1 and out.max() <= 1
    # Each caption's text embedding is computed once (the empty prompt once too).
    flat = [p for call in encoded for p in call]
    assert sorted(flat) == sorted(["", "a red circle", "a blue square", "a cat"])

    # The release's inputs (the defaults): the t = 0 pair is noised and predicted too, and
    # each image's latents are a posterior draw (the identical images now differ), drawn from
    # the generator: the same seed, the same images.
    calls.clear()
    release = NoisyImageMaker(model, guidance_scale=5.0, max_pairs=4)
    out = release(pixels, captions, t, torch.Generator().manual_seed(0))
    assert calls == [4 * 4, 3 * 4]
    assert not torch.equal(out[0], pixels[0])
    assert not torch.equal(out[1, 0], out[1, 1])
    assert torch.equal(out, release(pixels, captions, t, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------ data


def test_pair_table_checks(mini_world, tmp_path):
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    labels = check_pair_table(table, "train")
    assert labels.shape == (48, 2) and set(np.unique(labels)) <= {0.0, 0.5, 1.0}

    with pytest.raises(ConfigError, match="missing column 'label_1'"):
        check_pair_table(table.remove_columns("label_1"), "x")
    bad = table.map(
        lambda row, i: {"label_0": 0.7 if i == 5 else row["label_0"]}, with_indices=True
    )
    with pytest.raises(ConfigError, match="row 5 has label_0=0.7"):
        check_pair_table(bad, "x")
    with pytest.raises(ConfigError, match="pairs file not found: .*nope.parquet"):
        load_pair_table(str(tmp_path / "nope.parquet"))


def test_undecodable_images_are_skipped_and_counted(mini_world):
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    broken = table.map(
        lambda row, i: {"jpg_1": b"not a png" if i in (1, 3) else row["jpg_1"]}, with_indices=True
    )
    dataset = PairDataset(broken, 32)
    batch = PairDataset.collate([dataset[i] for i in range(4)])
    assert batch.bad == 2 and batch.indices.tolist() == [0, 2]
    assert batch.pixels.shape == (2, 2, 3, 32, 32)

    counter = BadImageCounter(max_share=0.1, source="pairs", total=1000)
    counter.update(10, 1)  # 10% of 10 pairs: could well be a lucky draw
    counter.update(90, 9)  # 10% of 100: at the limit, fine
    with pytest.raises(ConfigError, match="50 of 200 pairs have an undecodable image"):
        counter.update(100, 40)  # 25% of 200: the share is surely above 10%
    small = BadImageCounter(max_share=0.1, source="pairs", total=50)
    with pytest.raises(ConfigError, match="6 of 40 pairs"):
        small.update(40, 6)  # 6 bad pairs are more than 10% of all 50, whatever the rest
    assert share_lower_bound(6, 40) < 0.1  # (the confidence rule alone would wait)


def test_the_probe_samples_the_whole_table_and_judges_it_as_a_whole():
    """20 corrupt pairs, all among the first 100 of 3000 (0.7%, under the 1% allowed), pass;
    reading the first 100 alone would have refused them. A table of broken images fails."""
    import datasets

    good = _png()
    rows = [b"corrupt"] * 20 + [good] * 2980
    table = datasets.Dataset.from_dict({"jpg_0": rows, "jpg_1": [good] * 3000})
    BadImageCounter(0.01, "pairs").probe(table)
    broken = datasets.Dataset.from_dict({"jpg_0": [b"x"] * 3000, "jpg_1": [good] * 3000})
    with pytest.raises(ConfigError, match="200 of 200 pairs sampled have an undecodable"):
        BadImageCounter(0.01, "pairs").probe(broken)


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ recipe


def test_configs_load():
    for family in ("toy", "sd15", "sdxl"):
        cfg = load_config(SPMTrainConfig, ROOT / f"configs/{family}/spm.yaml")
        cfg.validate()
    sdxl = load_config(SPMTrainConfig, ROOT / "configs/sdxl/spm.yaml")
    assert sdxl.pairs.relabel_tie_gap == 0.1 and sdxl.optim.lr == 1e-6
    sd15 = load_config(SPMTrainConfig, ROOT / "configs/sd15/spm.yaml")
    assert (sd15.optim.lr, sd15.optim.weight_decay, sd15.max_steps) == (3e-6, 0.3, 8000)
    inputs = sd15.inputs  # the released trainer's inputs
    assert (inputs.antialias, inputs.vae_posterior, inputs.noise_t0) == (False, "sample", True)
    with pytest.raises(ConfigError, match="inputs.vae_posterior"):
        load_config(SPMTrainConfig, None, ["inputs.vae_posterior=median"]).validate()


def test_train_writes_final_eval_and_loads_in_fresh_process(mini_world, tmp_path, capsys):
    out = tmp_path / "spm"
    assert main(_args(mini_world, out, "validation_every=2", "validation_pairs_periodic=8")) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["accuracy_by_timestep"]) == {"0", "251", "501", "701", "951"}
    assert all(0 <= a <= 1 for a in result["accuracy_by_timestep"].values())
    assert 0.5 < result["oracle_ceiling"] <= 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("val/accuracy_t501" in x for x in lines)
    assert (out / "checkpoints/step-2/trainer_state.json").is_file()

    import preference_model

    spm = preference_model.load(out / "final")
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle on a white background"] * 3
    here = spm.score(images, prompts, [0, 500, 900]).tolist()
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import json, torch, preference_model
        spm = preference_model.load({str(out / "final")!r})
        images = torch.load({str(tmp_path / "images.pt")!r})
        print(json.dumps(spm.score(images, {prompts!r}, [0, 500, 900]).tolist()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == here


def test_relabelling_scores_the_original_images(mini_world, tmp_path):
    """The clean backbone relabels each pair from its images as stored, not from the copies
    resized for the base pipeline; a pair that does not decode keeps its labels."""
    table = load_pair_table(str(mini_world / "pairs/validation.parquet"))
    broken = table.map(lambda r, i: {"jpg_1": b"junk" if i == 3 else r["jpg_1"]}, with_indices=True)
    broken.to_parquet(str(tmp_path / "pairs.parquet"))
    split = load_split(str(tmp_path / "pairs.parquet"), "train", None)
    split.dataset.resolution = 16
    torch.manual_seed(0)
    spm = StepAwarePreferenceModel.from_open_clip(mini_world / "clip.json").eval()
    rows = [i for i in range(len(table)) if i != 3]
    originals = [decode_image(table[i][k]) for i in rows for k in ("jpg_0", "jpg_1")]
    assert originals[0].size != (16, 16) and originals[0].size != (32, 32)
    captions = [table[i]["caption"] for i in rows for _ in range(2)]
    probs = spm.score(originals, captions, 0).view(-1, 2).softmax(dim=-1)
    gap = (probs[:, 0] - probs[:, 1]).numpy()
    middle = np.sort(np.abs(gap))[len(gap) // 2 - 1 : len(gap) // 2 + 1].mean()
    labels = relabel_by_backbone(spm, split, float(middle), batch_size=5)
    assert labels[3].tolist() == split.labels[3].tolist()
    expected = np.where(gap > middle, 1.0, np.where(gap < -middle, 0.0, 0.5))
    assert labels[rows, 0].tolist() == expected.tolist()
    assert {0.5} < set(expected)  # ties and decided pairs both


def test_relabelled_runs_are_validated_on_relabelled_pairs_and_save_the_resizing(
    mini_world, tmp_path, monkeypatch
):
    """With pairs.relabel_tie_gap both splits are relabelled (the release also measures the
    SDXL SPM on PickScore's labels); the SPM is saved with the resizing it trained with."""
    import spo.commands.train_preference_model as recipe

    relabelled = {}
    original = recipe.relabel_by_backbone

    def spy(spm, split, tie_gap, batch_size):
        relabelled[split.source] = original(spm, split, tie_gap, batch_size)
        return relabelled[split.source]

    monkeypatch.setattr(recipe, "relabel_by_backbone", spy)
    out = tmp_path / "spm"
    args = ("pairs.relabel_tie_gap=0.5", "pairs.max_train_pairs=8", "validation_timesteps=[0]")
    assert main(_args(mini_world, out, *args, "max_steps=1")) == 0
    validation = str(mini_world / "pairs/validation.parquet")
    assert set(relabelled) == {str(mini_world / "pairs/train.parquet"), validation}
    decided = int((relabelled[validation][:, 0] != 0.5).sum())
    own = check_pair_table(load_pair_table(validation), "v")
    assert decided != int((own[:, 0] != 0.5).sum())
    assert json.loads((out / "eval.json").read_text())["validation_pairs"] == decided
    config = json.loads((out / "final/spm_config.json").read_text())
    assert config["antialias"] is False


def test_killed_run_resumes_to_the_same_weights(mini_world, tmp_path):
    def run(out):
        return main(_args(mini_world, out))

    assert_resume_is_exact(run, tmp_path / "straight", tmp_path / "killed", "model.safetensors")


def test_bad_input_fails_with_one_line(mini_world, tmp_path, capsys):
    table = load_pair_table(str(mini_world / "pairs/train.parquet"))
    no_caption = tmp_path / "no_caption.parquet"
    table.remove_columns("caption").to_parquet(str(no_caption))
    capsys.readouterr()
    assert main(_args(mini_world, tmp_path / "a", f"pairs.train={no_caption}")) == 2
    assert "missing column 'caption'" in one_error_line(capsys)

    bad_labels = tmp_path / "bad_labels.parquet"
    table.map(lambda r: {"label_0": 2.0, "label_1": -1.0}).to_parquet(str(bad_labels))
    capsys.readouterr()
    assert main(_args(mini_world, tmp_path / "b", f"pairs.train={bad_labels}")) == 2
    assert "row 0 has label_0=2.0" in one_error_line(capsys)

    broken = tmp_path / "broken.parquet"
    table.map(
        lambda r, i: {"jpg_0": b"junk" if i % 2 else r["jpg_0"]}, with_indices=True
    ).to_parquet(str(broken))
    capsys.readouterr()
    args = _args(
        mini_world, tmp_path / "c", f"pairs.train={broken}", "pairs.max_bad_image_share=0.2"
    )
    assert main(args) == 2
    assert "have an undecodable image" in one_error_line(capsys)

    other = tmp_path / "other_ckpt"
    other.mkdir()
    (other / "trainer_state.json").write_text(json.dumps({"kind": "dpo_training", "step": 3}))
    assert main(_args(mini_world, tmp_path / "d", f"resume={other}")) == 2
    assert "checkpoint of kind 'dpo_training'" in one_error_line(capsys)

    assert main(_args(mini_world, tmp_path / "e", "base_model=runs/toy/nowhere/base_model")) == 2
    assert "base model" in one_error_line(capsys)

    missing = tmp_path / "runs/toy/world/pairs/train.parquet"
    assert main(_args(mini_world, tmp_path / "f", f"pairs.train={missing}")) == 2
    assert "`spo toy-world` writes it" in one_error_line(capsys)


def test_prompt_sources(tmp_path):
    from spo.data import load_prompts

    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    (tmp_path / "p.json").write_text('["a", {"caption": "b"}]')
    (tmp_path / "p.jsonl").write_text('{"caption": "a"}\n{"caption": "b"}\n')
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    assert load_prompts(str(tmp_path / "p.json")) == ["a", "b"]
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    assert load_prompts(str(tmp_path / "p.parquet"), column="text") == ["a", "b"]
    with pytest.raises(ConfigError, match="no column 'caption'"):
        load_prompts(str(tmp_path / "p.parquet"))
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_prompts(str(tmp_path / "nope.txt"))

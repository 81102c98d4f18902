"""scripts/toy_replication.py: which runs it plans, and the statistics it draws from scores."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def replication():
    return load_script("toy_replication")


def _opts(tmp_path: Path, arms: list[str], seeds: list[int], edit=()) -> Namespace:
    return Namespace(
        demo=tmp_path / "demo", out=tmp_path / "out", seeds=seeds, arms=arms,
        budget_minutes=1.5, jobs=1, threads=2, images_per_prompt=2, bootstrap=200,
        edit=list(edit),
    )  # fmt: skip


def _value(args: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(key + "="))


def test_plan_is_the_demo_command_with_seed_and_ablation(replication, tmp_path):
    opts = _opts(tmp_path, ["dpo", "spo", "spo-no-time", "spo-k2"], [0, 1])
    jobs = replication.train_jobs(opts, opts.out)
    # The no-time SPM is trained first; then seed-major, every arm of seed 0 before seed 1.
    assert list(jobs) == [
        "spm-no-time",
        *("dpo-s0", "spo-s0", "spo-no-time-s0", "spo-k2-s0"),
        *("dpo-s1", "spo-s1", "spo-no-time-s1", "spo-k2-s1"),
    ]
    spm_args, spm_out, _ = jobs["spm-no-time"]
    assert spm_args[0] == "train-preference-model" and "time_conditioning=false" in spm_args
    assert spm_args[spm_args.index("--out") + 1] == str(spm_out)
    args, out, after = jobs["spo-no-time-s1"]
    assert after == "spm-no-time" and _value(args, "seed") == "1"
    # The later spm= override (the no-time SPM) is the one the config loader keeps.
    assert _value(reversed(args), "spm") == str(spm_out / "final")
    assert args[args.index("--out") + 1] == str(out) == str(opts.out / "runs/spo-no-time-s1")
    args, _, after = jobs["spo-k2-s0"]
    assert after is None and _value(args, "sampler.k") == "2"
    assert _value(args, "max_minutes") == "1.5" and args[0] == "train-spo"
    assert jobs["dpo-s0"][0][0] == "train-dpo"


def test_latent_arm_waits_for_its_judge_trained_with_the_latent_config(replication, tmp_path):
    opts = _opts(tmp_path, ["spo", "spo-latent", "spo-latent-spo-settings"], [0])
    jobs = replication.train_jobs(opts, opts.out)
    assert list(jobs) == ["latent-judge", "spo-s0", "spo-latent-s0", "spo-latent-spo-settings-s0"]
    judge_args, judge_out, _ = jobs["latent-judge"]
    assert judge_args[judge_args.index("--config") + 1].endswith("configs/toy/latent_judge.yaml")
    # LPO's settings come with the arm's own config; the other arm changes the judge alone
    args, _, after = jobs["spo-latent-s0"]
    assert args[args.index("--config") + 1].endswith("configs/toy/spo_latent.yaml")
    assert after == "latent-judge" and _value(reversed(args), "spm") == str(judge_out / "final")
    alone, _, after = jobs["spo-latent-spo-settings-s0"]
    assert alone[alone.index("--config") + 1] == "toy/spo" and "judge=latent" in alone
    assert after == "latent-judge" and _value(reversed(alone), "spm") == str(judge_out / "final")


def test_summary_pools_seeds_and_pairs_with_base(replication, tmp_path):
    opts = _opts(tmp_path, ["dpo", "spo"], [0, 1])
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=(5, 2))
    scores = {
        "base": base,
        "spo-s0": base + 0.1,
        "spo-s1": base + 0.3,
        "dpo-s0": base - 0.05,
        "dpo-s1": base + 0.05,
    }
    out = opts.out
    (out / "compare").mkdir(parents=True)
    payload = {"prompts": ["p"] * 5, "images_per_prompt": 2}
    # spo kept best/ (by toy_pickscore) at step 5: its oracle peaked at step 5 (seed 0) or at the
    # end (seed 1) along the validations
    scores |= {"spo-s0-best": base + 0.15, "spo-s1-best": base + 0.2}
    oracle_along = {"spo-s0": (0.6, 0.8, 0.7), "spo-s1": (0.6, 0.7, 0.9)}
    for i, name in enumerate(["spo-s0", "spo-s1", "dpo-s0", "dpo-s1"]):
        (out / "runs" / name / "final").mkdir(parents=True)
        (out / "runs" / name / "final/train_summary.json").write_text(json.dumps({"step": 10 + i}))
        rows = [{"step": 5, "train/elapsed_s": 50.0}]
        along = oracle_along.get(name, (0.5, 0.6, 0.7))
        for step, value in zip((0, 5, 10 + i), along, strict=True):
            row = {"step": step, "val/train_seconds": 21.0 * step + i, "val/oracle": value}
            rows.append(row | {"val/toy_pickscore": 0.1 * step, "val/chain_kl": 0.01 * step})
        (out / "runs" / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        if name in oracle_along:
            (out / "runs" / name / "best").mkdir()
            record = {"step": 5, "select_by": "toy_pickscore", "scores": {}}
            (out / "runs" / name / "best/best.json").write_text(json.dumps(record))
    (out / "compare/scores.json").write_text(
        json.dumps(payload | {"scores": {"oracle": {m: a.tolist() for m, a in scores.items()}}})
    )

    summary = replication.summarise(opts, out)
    table = summary["arms"]["oracle"]
    assert table["spo"]["mean"]["mean"] == pytest.approx(base.mean() + 0.2)
    assert table["spo"]["seed_means"] == pytest.approx([base.mean() + 0.1, base.mean() + 0.3])
    assert table["spo"]["minus_base"]["mean"] == pytest.approx(0.2)
    assert table["spo"]["win_rate_vs_base"]["rate"] == 1.0  # better on every (prompt, seed)
    assert table["dpo"]["win_rate_vs_base"]["rate"] == 0.5  # worse for seed 0, better for seed 1
    assert table["dpo"]["minus_reference"]["mean"] == pytest.approx(-0.2)  # seed i against seed i
    assert table["dpo"]["win_rate_vs_reference"]["rate"] == 0.0
    assert table["dpo"]["seed_minus_reference"] == pytest.approx([-0.15, -0.25])
    assert "minus_reference" not in table["spo"]
    assert summary["runs"]["dpo-s1"] == {"steps": 13, "train_seconds": 21.0 * 13 + 3}
    kept = summary["best_vs_final"]
    assert list(kept) == ["spo"]  # dpo kept no best/
    assert kept["spo"]["best"]["mean"] == pytest.approx(base.mean() + 0.175)
    assert kept["spo"]["best_minus_final"]["mean"] == pytest.approx(-0.025)  # +0.05, -0.1
    assert [c["at_best"] for c in kept["spo"]["validation"]] == [0.8, 0.7]
    assert [c["peak_step"] for c in kept["spo"]["validation"]] == [5, 11]
    assert kept["spo"]["peak_minus_best"]["mean"] == pytest.approx(0.1)  # 0 and 0.2
    assert kept["spo"]["peak_minus_final"]["mean"] == pytest.approx(0.05)  # 0.1 and 0
    text = replication.markdown(summary, opts.arms)
    assert f"| spo | {base.mean() + 0.2:.3f} [" in text and "| dpo-s1 | 13 | 276 |" in text
    assert "### best/ against final/ (oracle; best/ kept by toy_pickscore)" in text
    assert replication.plot_curves(opts, out).stat().st_size > 0


def test_flow_arms_train_on_the_flow_base_model_with_their_own_judges(replication, tmp_path):
    opts = _opts(tmp_path, ["flow-dpo", "flow-spo", "flow-spo-latent"], [0])
    jobs = replication.train_jobs(opts, opts.out)
    assert list(jobs) == [
        "flow-spm",
        "flow-latent-judge",
        "flow-dpo-s0",
        "flow-spo-s0",
        "flow-spo-latent-s0",
    ]
    flow_base = str(opts.demo / "world/flow_base_model")
    for name, config in (("flow-spm", "spm_flow"), ("flow-latent-judge", "latent_judge_flow")):
        args, _, _ = jobs[name]
        assert args[args.index("--config") + 1].endswith(f"configs/toy/{config}.yaml")
        assert _value(args, "base_model") == flow_base
    for run, config, judge in (
        ("flow-dpo-s0", "toy/dpo_flow", None),
        ("flow-spo-s0", "toy/spo_flow", "flow-spm"),
        ("flow-spo-latent-s0", "toy/spo_flow", "flow-latent-judge"),
    ):
        args, _, after = jobs[run]
        assert args[args.index("--config") + 1] == config and after == judge
        assert _value(args, "base_model") == flow_base
        if judge:
            assert _value(reversed(args), "spm") == str(opts.out / judge / "final")
    assert "judge=latent" in jobs["flow-spo-latent-s0"][0]
    compare = replication.compare_args(opts, opts.out, ["flow-spo-s0"], "flow")
    assert compare[compare.index("--out") + 1] == str(opts.out / "compare_flow")
    models = _value(compare, "models")
    assert f"{{name: flow_base, pipeline: {flow_base}}}" in models
    assert str(opts.out / "runs/flow-spo-s0/final") in models and "-best" not in models
    (opts.out / "runs/flow-spo-s0/best").mkdir(parents=True)
    models = _value(replication.compare_args(opts, opts.out, ["flow-spo-s0"], "flow"), "models")
    best = opts.out / "runs/flow-spo-s0/best"
    assert f"{{name: flow-spo-s0-best, pipeline: {flow_base}, lora: {best}}}" in models


def test_group_arms_train_on_the_two_group_pairs_and_compare_by_both_oracles(replication, tmp_path):
    opts = _opts(tmp_path, ["dpo-groups-all", "dpo-groups-small", "spo-groups-small"], [0])
    jobs = replication.train_jobs(opts, opts.out)
    assert list(jobs) == ["spm-groups-small", "dpo-groups-all-s0", "dpo-groups-small-s0",
                          "spo-groups-small-s0"]  # fmt: skip
    groups = str(opts.demo / "world/pairs/groups_train.parquet")
    judge, _, _ = jobs["spm-groups-small"]
    assert _value(reversed(judge), "pairs.train") == groups
    assert _value(judge, "pairs.annotators.ids") == "[small]"
    everyone, _, _ = jobs["dpo-groups-all-s0"]
    assert _value(reversed(everyone), "pairs.train") == groups
    assert not any(a.startswith("pairs.annotators") for a in everyone)
    small, _, _ = jobs["dpo-groups-small-s0"]
    assert _value(small, "pairs.annotators.ids") == "[small]"
    spo, _, after = jobs["spo-groups-small-s0"]
    assert after == "spm-groups-small"
    assert _value(reversed(spo), "spm") == str(opts.out / "spm-groups-small/final")
    assert "oracle_small" in _value(spo, "validation_images.scorers")
    compare = replication.compare_args(opts, opts.out, ["spo-groups-small-s0"], "groups")
    assert compare[compare.index("--out") + 1] == str(opts.out / "compare_groups")
    assert _value(compare, "scorers") == "[oracle_small, oracle_large, oracle]"
    # each group-A arm is paired with the same trainer on everyone's pairs
    groups = replication.WORLDS["groups"]
    assert replication.reference_of("dpo-groups-small", groups) == "dpo-groups-all"
    assert replication.reference_of("spo-groups-small", groups) == "spo-groups-all"
    assert replication.reference_of("dpo", replication.WORLDS["unet"]) == "spo"


def test_edit_arms_edit_the_colour_layouts_with_their_final_runs(replication, tmp_path):
    opts = _opts(tmp_path, ["dpo", "spo", "spo-k2"], [0, 1], edit=["dpo", "spo"])
    assert replication.arms_of(opts, "edit") == ["dpo", "spo"]
    assert replication.arms_of(opts, "unet") == ["dpo", "spo", "spo-k2"]
    (opts.out / "runs/spo-s0/best").mkdir(parents=True)  # editing uses final/ alone
    args = replication.compare_args(opts, opts.out, ["dpo-s0", "spo-s0"], "edit")
    assert args[args.index("--out") + 1] == str(opts.out / "compare_edit")
    assert args[args.index("--config") + 1].endswith("configs/toy/compare_edit.yaml")
    assert _value(args, "edit.sources") == str(opts.demo / "world/edit/layouts")
    models = _value(args, "models")
    assert str(opts.out / "runs/spo-s0/final") in models and "best" not in models
    assert _value(args, "images_per_prompt") == str(replication.EDITS_PER_LAYOUT)
    assert not any(a.startswith("prompts=") for a in args)

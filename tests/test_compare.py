"""`spo compare`: statistics, determinism, resumable generation, the report, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import compare_args, one_error_line

from spo.cli import main
from spo.evaluation.stats import mean_ci, win_rate_ci


def test_win_rate_and_mean_hand_values():
    a = np.array([[1.0, 2.0], [3.0, 3.0]])
    b = np.array([[0.0, 2.0], [4.0, 1.0]])
    r = win_rate_ci(a, b, n_boot=200)
    assert r["rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and r["n"] == 4
    lo, hi = r["ci95"]
    assert lo <= r["rate"] <= hi
    same = win_rate_ci(a, a)
    assert same["rate"] == 0.5 and same["ci95"] == [0.5, 0.5]
    m = mean_ci(a, n_boot=200)
    assert m["mean"] == pytest.approx(2.25)
    assert m["ci95"][0] >= 1.5 and m["ci95"][1] <= 3.0  # within the prompt means' range


def _args(world: Path, out: Path, *models: str, extra: tuple[str, ...] = ()) -> list[str]:
    prompts = world / "compare_prompts.jsonl"
    if not prompts.exists():
        rows = [
            {"caption": "a red circle on a white background", "category": "circle"},
            {"caption": "a blue circle on a gray background", "category": "circle"},
            {"caption": "a green cross on a black background", "category": "cross"},
        ]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return compare_args(
        out,
        prompts,
        list(models),
        "images_per_prompt=2",
        "num_inference_steps=3",
        "bootstrap=200",
        "grid_prompts=2",
        *extra,
    )


def test_self_comparison_determinism_and_report(mini_world, tmp_path):
    base = f"{{name: a, pipeline: {mini_world / 'base_model'}}}"
    twin = f"{{name: b, pipeline: {mini_world / 'base_model'}}}"
    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert main(_args(mini_world, out1, base, twin)) == 0
    results = json.loads((out1 / "results.json").read_text())
    # The same model under two names: every image is identical, so exactly 0.5.
    assert results["win_rates"]["oracle"]["a vs b"]["rate"] == 0.5
    assert results["scores"]["a"]["oracle"] == results["scores"]["b"]["oracle"]
    assert set(results["by_category"]) == {"circle", "cross"}
    assert results["settings"]["base"] == "a"  # the first model, when `base` is not set
    same = results["paired_differences"]["oracle"]["b"]
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and same["prompts"] == 3
    # scores.json holds every image's score (prompts x images), the numbers behind the means.
    per_image = json.loads((out1 / "scores.json").read_text())
    a = np.array(per_image["scores"]["oracle"]["a"])
    assert a.shape == (len(per_image["prompts"]), 2)
    assert a.mean() == pytest.approx(results["scores"]["a"]["oracle"]["mean"])
    assert main(_args(mini_world, out2, base, twin)) == 0
    assert (out1 / "results.json").read_bytes() == (out2 / "results.json").read_bytes()

    # Re-running reuses the cached images (none regenerated: their files stay untouched).
    image = out1 / "images/a/p00000_s0.png"
    stamp = image.stat().st_mtime_ns
    assert main(_args(mini_world, out1, base, twin)) == 0
    assert image.stat().st_mtime_ns == stamp
    # ... until what the images depend on changes: then they are made again.
    assert main(_args(mini_world, out1, base, twin, extra=("num_inference_steps=2",))) == 0
    assert image.stat().st_mtime_ns != stamp
    assert json.loads((out1 / "images/a/fingerprint.json").read_text())["num_inference_steps"] == 2

    page = (out1 / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 2 * 2  # grid prompts x models x images
    assert page.count("data:image/svg+xml;base64,") == 3  # means, differences, win rates
    assert not re.search(r"(src|href)=(?![\"']?data:)", page)  # nothing external
    assert "a vs b" not in page and "0.500 [0.500, 0.500]" in page
    assert "No curve" in page and "No judge" in page  # the base pipeline has no training run
    assert "| a | " in (out1 / "report.md").read_text()
    weights = json.loads((out1 / "provenance.json").read_text())["weights"]
    assert [(w["model"], w["part"]) for w in weights] == [("a", "pipeline"), ("b", "pipeline")]
    assert weights[0]["digest"]["sha256"] == weights[1]["digest"]["sha256"]


def test_bad_input_fails_before_generation(mini_world, tmp_path, capsys):
    from tiny_pipelines import build_tiny_sdxl

    from spo.config import PolicyConfig
    from spo.models import DiffusionModel
    from spo.policy import Policy

    # A LoRA made for another pipeline (the tiny SDXL one) does not fit the tiny SD one.
    xl = DiffusionModel.from_pretrained(str(build_tiny_sdxl(tmp_path / "xl")))
    Policy(xl, PolicyConfig(mode="lora", lora_rank=2)).save(tmp_path / "xl_lora")
    bad_lora = f"{{name: x, pipeline: {mini_world / 'base_model'}, lora: {tmp_path / 'xl_lora'}}}"
    out = tmp_path / "a"
    capsys.readouterr()
    assert main(_args(mini_world, out, bad_lora)) == 2
    assert "model 'x': LoRA" in one_error_line(capsys)
    assert not (out / "images").exists()

    base = f"{{name: a, pipeline: {mini_world / 'base_model'}}}"
    assert main(_args(mini_world, tmp_path / "b", base, extra=("scorers=[oracle, nope]",))) == 2
    line = one_error_line(capsys)
    assert "unknown scorer 'nope'" in line and "oracle" in line and "pickscore" in line

    missing = tmp_path / "HPS_v2.1_compressed.pt"
    args = _args(mini_world, tmp_path / "c", base, extra=(f"scorers=[hpsv2:{missing}]",))
    assert main(args) == 2
    assert str(missing) in one_error_line(capsys)
    assert not (tmp_path / "c" / "images").exists()


def test_categories_only_from_a_real_column(tmp_path):
    from spo.commands.compare import load_prompt_set
    from spo.config import CompareConfig

    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\na blue square\n")
    assert load_prompt_set(CompareConfig(prompts=str(txt))).categories is None
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a", "category": "x"}\n{"caption": "b", "category": "y"}\n')
    got = load_prompt_set(CompareConfig(prompts=str(jsonl), max_prompts=1))
    assert got.texts == ["a"] and got.categories == ["x"]

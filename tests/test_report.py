"""The comparison report: its statistics against hand-computed values, its precision and
labels, provenance from run folders, and the page itself (self-contained, every section with
the right numbers) from a small hand-made comparison; the page in a real browser when
Debian's chromium is installed."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script
from PIL import Image

from spo.commands.compare import Prompts, statistics
from spo.config import CompareConfig, ModelSpec
from spo.evaluation import provenance
from spo.evaluation.report import (
    SAMPLE_PX,
    cell,
    column_decimals,
    letters,
    model_labels,
    number,
    scorer_labels,
    write_report,
)
from spo.evaluation.stats import paired_difference_ci, seed_mean_ci, wilson_ci

SHA_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256(b"abc")
T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)
Z_975 = 1.959963984540054  # normal, 97.5% quantile


# ------------------------------------------------------------------------------ statistics


def test_paired_difference_is_the_t_interval_of_the_prompt_means():
    a = np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 6.0]])
    b = np.array([[0.0, 2.0], [2.0, 1.0], [1.0, 3.0]])
    # per-prompt mean differences 1, 0.5, 3: mean 1.5, sd sqrt(3.5 / 2), se sd / sqrt(3)
    r = paired_difference_ci(a, b)
    half = T_975_2 * np.sqrt(1.75) / np.sqrt(3)
    assert r["mean"] == pytest.approx(1.5)
    assert r["ci95"] == pytest.approx([1.5 - half, 1.5 + half])
    assert (r["n"], r["prompts"]) == (6, 3)
    same = paired_difference_ci(a, a)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    assert paired_difference_ci(a[:1], b[:1])["ci95"] is None  # one prompt: no interval


def test_seed_mean_is_the_t_interval_over_seeds():
    # peaks minus best/ of three runs: 0.02, 0.05, 0.11: mean 0.06, sd sqrt(0.0021), se sd/sqrt 3
    r = seed_mean_ci([0.02, 0.05, 0.11])
    half = T_975_2 * np.sqrt(0.0021) / np.sqrt(3)
    assert r["mean"] == pytest.approx(0.06)
    assert r["ci95"] == pytest.approx([0.06 - half, 0.06 + half])
    assert seed_mean_ci([0.3])["ci95"] is None and seed_mean_ci([0.3])["n"] == 1


def test_wilson_interval_hand_values():
    # rate 0.5 on 4: centred at 0.5, half-width z sqrt(1/16 + z^2/64) / (1 + z^2/4)
    z2 = Z_975**2
    half = Z_975 * np.sqrt(1 / 16 + z2 / 64) / (1 + z2 / 4)
    assert wilson_ci(0.5, 4) == pytest.approx([0.5 - half, 0.5 + half])
    # all right on n: [n / (n + z^2), 1]
    assert wilson_ci(1.0, 10) == pytest.approx([10 / (10 + z2), 1.0])


# ------------------------------------------------------------------------------ formatting


def _entry(value: float, low: float | None = None, high: float | None = None) -> dict:
    return {"mean": value, "ci95": None if low is None else [low, high]}


def test_column_decimals_follow_the_narrowest_interval():
    # the narrowest width, 0.124, with 2 significant digits: 2 decimals
    assert column_decimals([_entry(0.585, 0.522, 0.646), _entry(0.7, 0.5, 0.8)]) == 2
    assert column_decimals([_entry(12.07, 11.32, 12.88)]) == 1
    assert column_decimals([_entry(0.0225, 0.0059, 0.0391), _entry(0.0025, 0.0, 0.005)]) == 4
    # no interval wider than 0: the largest value with 3 significant digits
    assert column_decimals([_entry(0.5, 0.5, 0.5), _entry(0.25)]) == 3
    assert column_decimals([_entry(0.0, 0.0, 0.0)]) == 0
    assert column_decimals([_entry(1e-9, 0.0, 1e-9)]) == 6  # at most 6


def test_numbers_and_cells():
    assert number(0.02251, 3) == "0.023" and number(-0.0001, 3, signed=True) == "0.000"
    assert number(0.1, 2, signed=True) == "+0.10" and number(-0.1, 2, signed=True) == "-0.10"
    assert cell(_entry(0.1, -0.024, 0.224), "mean", 2, signed=True) == "+0.10 [-0.02, +0.22]"
    assert cell(_entry(0.1), "mean", 2) == "0.10 (no interval)"


def test_short_labels():
    assert [letters(i) for i in (0, 25, 26, 27, 701, 702)] == ["A", "Z", "AA", "AB", "ZZ", "AAA"]
    assert model_labels(["base", "dpo"]) == ["base", "dpo"]
    assert model_labels(["base", "sd15-dpo-lora-rank64"]) == ["A", "B"]
    specs = ["spm:/runs/toy/spm/final", "oracle", "clip:ViT-B-32", "clip:ViT-L-14"]
    assert scorer_labels(specs) == ["spm", "oracle", "clip 1", "clip 2"]


# ------------------------------------------------------------------------------ provenance


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def _lines(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_run_folder_is_the_one_above_final_or_best(tmp_path):
    run = tmp_path / "runs/dpo"
    _write(run / "metrics.jsonl", "")
    lora = _write(run / "final/pytorch_lora_weights.safetensors", b"x")
    unet = _write(run / "final/unet/diffusion_pytorch_model.safetensors", b"x")
    assert provenance.run_folder(run / "final") == run.resolve()
    assert provenance.run_folder(lora) == provenance.run_folder(unet) == run.resolve()
    best = _write(run / "best/pytorch_lora_weights.safetensors", b"x")
    assert provenance.run_folder(best) == run.resolve()
    assert provenance.run_folder(run / "final", "eval.json") is None  # no eval.json there
    loose = _write(tmp_path / "downloads/lora.safetensors", b"x")
    assert provenance.run_folder(loose) is None


def test_validation_curves_and_judge_from_run_folders(tmp_path):
    run = tmp_path / "spo"
    metrics = _lines(
        {"step": 0, "val/oracle": 0.5, "val/train_seconds": 0.0},
        {"step": 5, "train/loss": 0.7, "train/elapsed_s": 9.0},
        {"step": 5, "val/oracle": 0.6, "val/train_seconds": 10.0},
        {"step": 9, "val/oracle": None, "val/train_seconds": 20.0},
    )
    _write(run / "metrics.jsonl", metrics + '{"step": 10, "val/ora')  # killed mid-line
    _write(run / "config.yaml", "spm: /somewhere/spm/final\njudge: pixel\n")
    assert provenance.validation_curves(run) == {"val/oracle": ([0.0, 10.0], [0.5, 0.6])}
    rows = provenance.validation_rows(run)
    assert [r["step"] for r in rows] == [0, 5, 9] and rows[2]["scores"] == {}
    assert rows[1] == {"step": 5, "seconds": 10.0, "chain_kl": None, "scores": {"oracle": 0.6}}
    assert provenance.run_judge(run) == Path("/somewhere/spm/final")
    _write(tmp_path / "dpo/config.yaml", "beta: 5000\n")
    assert provenance.run_judge(tmp_path / "dpo") is None
    assert provenance.run_judge(tmp_path / "no-config") is None


def test_weights_digest_of_a_file_and_a_folder(tmp_path):
    lora = _write(tmp_path / "lora.safetensors", b"abc")
    assert provenance.weights_digest(lora)["sha256"] == SHA_ABC
    folder = tmp_path / "pipe"
    _write(folder / "unet/diffusion_pytorch_model.safetensors", b"abc")
    _write(folder / "model_index.json", "{}")  # not a weights file
    digest = provenance.weights_digest(folder)
    lines = f"{SHA_ABC}  unet/diffusion_pytorch_model.safetensors\n"
    assert digest["files"] == {"unet/diffusion_pytorch_model.safetensors": SHA_ABC}
    assert digest["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert digest["bytes"] == 3


def test_a_hub_pipeline_is_found_in_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub/models--org--pipe"
    _write(repo / "refs/main", commit)
    _write(repo / f"snapshots/{commit}/unet/diffusion_pytorch_model.safetensors", b"abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder, revision = provenance.local_folder("org/pipe")
    assert revision == commit and folder == (repo / "snapshots" / commit).resolve()
    assert provenance.local_folder("org/absent") == (None, None)


# ------------------------------------------------------------------------------ the report

# Hand-made scores, 3 prompts x 2 images. oracle: tuned - base per image
# [[0.2, 0], [0.3, 0], [0.1, 0]], per prompt 0.1, 0.15, 0.05: mean 0.1, sd 0.05, so the
# interval is 0.1 +- T_975_2 * 0.05 / sqrt(3) = [-0.0242, 0.2242]; its width 0.248 gives
# 2 decimals. Win rate of tuned: wins on every first image, ties on every second: 0.75.
ORACLE = {
    "base": [[0.50, 0.60], [0.20, 0.40], [0.30, 0.30]],
    "tuned": [[0.70, 0.60], [0.50, 0.40], [0.40, 0.30]],
}
SPM = {"base": [[1.0, 2.0], [1.0, 1.0], [2.0, 2.0]], "tuned": [[2.0, 2.0], [1.5, 1.0], [2.0, 3.0]]}
COLOURS = {"base": (255, 0, 255), "tuned": (0, 255, 0)}  # every sample of a model one colour


def _comparison(root: Path, with_runs: bool) -> CompareConfig:
    """A comparison's folder as `spo compare` leaves it before the report: images, and the
    models' run folders (a tuned LoRA trained with a judge whose eval.json exists)."""
    pipe = root / "pipe"
    _write(pipe / "unet/diffusion_pytorch_model.safetensors", b"abc")
    scorers = ["oracle"]
    if with_runs:
        judge = root / "runs/spm"
        _write(judge / "final/model.safetensors", b"judge")
        evaluation = {
            "accuracy_by_timestep": {"0": 1.0, "500": 0.5},
            "validation_pairs": 4,
            "oracle_ceiling": 0.9,
        }
        _write(judge / "eval.json", json.dumps(evaluation))
        run = root / "runs/tuned"
        lora = _write(run / "final/pytorch_lora_weights.safetensors", b"lora")
        _write(run / "config.yaml", f"spm: {judge / 'final'}\nmax_steps: 10\n")
        # the proxy peaks at step 5 (best/ kept there) while the ground truth still rises
        rows = [{"step": s, "val/oracle": v, "val/toy_pickscore": p, "val/chain_kl": kl,
                 "val/chain_kl_total": 9 * kl, "val/train_seconds": t} for s, v, p, kl, t in
                [(0, 0.40, 1.0, 0.0, 0.0), (5, 0.50, 1.5, 0.2, 30.0),
                 (10, 0.55, 1.2, 0.5, 60.0)]]  # fmt: skip
        _write(run / "metrics.jsonl", _lines(*rows))
        _write(run / "best/best.json", json.dumps({"step": 5, "select_by": "toy_pickscore"}))
        scorers.append(f"spm:{judge / 'final'}")
    else:
        lora = _write(root / "downloads/tuned.safetensors", b"lora")
    out = root / "compare"
    for model, colour in COLOURS.items():
        for i in range(3):
            for j in range(2):
                path = out / "images" / model / f"p{i:05d}_s{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), colour).save(path)
    return CompareConfig(
        out=str(out),
        models=[
            ModelSpec(name="base", pipeline=str(pipe)),
            ModelSpec(name="tuned", pipeline=str(pipe), lora=str(lora)),
        ],
        scorers=scorers,
        images_per_prompt=2,
        grid_prompts=2,
        bootstrap=200,
    )


def _report(root: Path, with_runs: bool = True) -> tuple[CompareConfig, str, str]:
    cfg = _comparison(root, with_runs)
    prompts = Prompts(["a red circle", "a blue square", "a green cross"], None)
    scores = {
        s: {m: np.array((SPM if s.startswith("spm:") else ORACLE)[m]) for m in COLOURS}
        for s in cfg.scorers
    }
    results = statistics(cfg, prompts, scores)
    write_report(cfg, prompts.texts, results, provenance.collect(cfg, "cpu"))
    out = Path(cfg.out)
    return cfg, (out / "report.html").read_text(), (out / "report.md").read_text()


def _data_uris(page: str) -> list[tuple[str, bytes]]:
    found = re.findall(r'src="data:([a-z/+]+);base64,([A-Za-z0-9+/=]+)"', page)
    return [(mime, base64.b64decode(data)) for mime, data in found]


def test_report_stands_alone_with_every_section(tmp_path):
    cfg, page, md = _report(tmp_path)
    # nothing fetched: every src is a data URI; no link, script, font, stylesheet or URL
    assert not re.search(r"(src|href)\s*=\s*(?![\"']?data:)", page)
    assert not re.search(r"<script|<link|@import|url\(|https?://", page, re.I)
    uris = _data_uris(page)
    assert len(uris) == page.count("<img")
    for mime, data in uris:
        if mime == "image/svg+xml":  # the plots: drawn text, no image or font from elsewhere
            assert b"<image" not in data and b"<text" not in data and b"@font-face" not in data
            assert not re.search(rb'href="(?!#)', data)
    # every image of the 2 grid prompts, per model (not one seed per prompt)
    samples = [Image.open(io.BytesIO(d)).getpixel((0, 0)) for m, d in uris if m == "image/png"]
    assert samples == ([COLOURS["base"]] * 2 + [COLOURS["tuned"]] * 2) * 2

    # the base is named; paired differences with their hand-computed t-interval
    assert "are against base, the base" in page and "Paired differences: model minus base" in page
    assert "<td>tuned</td><td class=num>+0.10 [-0.02, +0.22]</td>" in page
    assert "| tuned | +0.10 [-0.02, +0.22] |" in md
    # win rates on one precision: tuned beats base on 0.75 of (prompt, seed), base 0.25
    assert "0.750 [0.750, 0.750]" in page and "0.250 [0.250, 0.250]" in page
    # the scorer with a path is labelled short; its path only in the legend
    spm = cfg.scorers[1]
    assert "<th>model</th><th>oracle</th><th>spm</th>" in page
    assert f"<code>{spm}</code>" in page and not re.search(f"<th>[^<]*{re.escape(spm)}", page)

    # the training curve and the judge's accuracy with Wilson intervals over its 4 pairs:
    # t = 0: 4 of 4 right, [4 / (4 + z^2), 1] = [0.51, 1.00]; t = 500: 0.5 +- 0.35
    assert "Proxy against gold" in page and "No curve" not in page
    assert (Path(cfg.out) / "proxy_vs_gold.png").is_file()
    # per scorer: at best/ (step 5, chosen by toy_pickscore), at the end, its own peak
    proxy = "<td>tuned (final)</td><td>toy_pickscore, selects best/</td>"
    assert proxy + "<td>1.5000 (5)</td><td>1.2000 (10)</td><td>1.5000 (5)</td>" in page
    gold = "<td>tuned (final)</td><td>oracle (ground truth)</td>"
    assert gold + "<td>0.5000 (5)</td><td>0.5500 (10)</td><td>0.5500 (10)</td>" in page
    assert "<td class=num>1.00 [0.51, 1.00]</td><td class=num>0.50 [0.15, 0.85]</td>" in page
    assert "judge of tuned, scorer spm" in page and "0.900" in page  # its oracle ceiling

    # provenance: the weights' hashes, the configs, versions, date
    pipe_digest = hashlib.sha256(f"{SHA_ABC}  unet/diffusion_pytorch_model.safetensors\n".encode())
    assert pipe_digest.hexdigest() in page
    assert hashlib.sha256(b"lora").hexdigest() in md  # a LoRA file: its own sha256
    for text in ("date (UTC)", "git commit", "torch", "diffusers", "transformers", "spo-diffusion"):
        assert f"<td>{text}</td>" in page
    assert "comparison config (config.yaml)" in page and "training config of tuned" in page
    assert "max_steps: 10" in page  # the run's config, inline


def test_absent_training_data_is_a_note_not_a_plot(tmp_path):
    _report(tmp_path)  # an earlier report in the same folder had the data
    cfg, page, _ = _report(tmp_path, with_runs=False)
    assert "No curve: no compared model" in page and "No judge: no compared model" in page
    assert not (Path(cfg.out) / "proxy_vs_gold.png").exists()
    assert not (Path(cfg.out) / "judge_accuracy.png").exists()
    assert page.count("data:image/svg+xml") == 3  # means, differences, win rates only


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
def test_report_renders_alone_in_a_browser(tmp_path):
    cfg, _, _ = _report(tmp_path)
    shot = load_script("screenshot_report").screenshot(
        Path(cfg.out) / "report.html", tmp_path / "shot.png", width=1200
    )
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

    def pixels(colour: tuple[int, int, int]) -> int:
        return int((packed == (colour[0] << 16 | colour[1] << 8 | colour[2])).sum())

    # rendered alone, with the network closed: each of the 4 samples of a model (one solid
    # colour) fills its SAMPLE_PX square, and the plots show (their dots' colour)
    assert pixels(COLOURS["base"]) == pixels(COLOURS["tuned"]) == 4 * SAMPLE_PX**2
    assert pixels((0x4C, 0x72, 0xB0)) > 0

"""`spo demo --quick`: every stage runs and writes its outputs; reruns skip finished stages;
deleting a stage's folder reruns that stage and the ones after it."""

from __future__ import annotations

import json
import math
import shlex

from spo.cli import main


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float | int) and not isinstance(value, bool):
        yield value


def test_quick_demo_runs_skips_and_reruns(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(root)]) == 0
    first = capsys.readouterr().out
    for stage in ("world", "spm", "dpo", "spo", "compare"):
        assert f"[demo] {stage}: $ spo " in first  # the equivalent command line is shown
    for line in first.splitlines():
        if "$ spo " in line:  # each key once, with the value that runs (issue 21)
            keys = [a.partition("=")[0] for a in shlex.split(line.split("$ ")[1]) if "=" in a]
            assert len(keys) == len(set(keys)), line
    (dpo_line,) = [line for line in first.splitlines() if "[demo] dpo: $ spo" in line]
    assert "max_steps=10 " in dpo_line and "max_steps=1000000" not in dpo_line
    for path in (
        "world/base_model/model_index.json",
        "world/pairs/train.parquet",
        "spm/final/model.safetensors",
        "spm/eval.json",
        "dpo/final/pytorch_lora_weights.safetensors",
        "spo/final/pytorch_lora_weights.safetensors",
        "compare/results.json",
        "compare/report.html",
        "compare/proxy_vs_gold.png",
        "compare_edit/report.html",
        "world/edit/layouts/prompts.txt",
        "demo.json",
    ):
        assert (root / path).is_file(), path
    results = json.loads((root / "compare/results.json").read_text())
    assert set(results["scores"]) == {"base", "dpo", "spo"}
    assert set(results["scores"]["spo"]) >= {"oracle", "toy_pickscore"}
    assert all(math.isfinite(x) for x in _numbers(results))
    edits = json.loads((root / "compare_edit/results.json").read_text())
    assert edits["settings"]["task"] == "edit" and edits["settings"]["strength"] == 0.6
    assert set(edits["scores"]["spo"]) >= {"oracle", "fidelity"}
    dpo_metrics = (root / "dpo/metrics.jsonl").read_text()
    assert '"val/oracle"' in dpo_metrics  # the reward-vs-compute curve has points

    assert main(["demo", "--quick", "--out", str(root)]) == 0
    again = capsys.readouterr().out
    assert again.count("done, skipped") == 6 and "$ spo" not in again

    stamp = (root / "spo/final/pytorch_lora_weights.safetensors").stat().st_mtime_ns
    import shutil

    shutil.rmtree(root / "compare")  # a stage gone: it and the stages after it run again
    assert main(["demo", "--quick", "--out", str(root)]) == 0
    third = capsys.readouterr().out
    for stage in ("world", "spm", "dpo", "spo"):
        assert f"[demo] {stage}: done, skipped" in third
    for stage in ("compare", "compare_edit"):
        assert f"[demo] {stage}: $ spo " in third
    assert (root / "spo/final/pytorch_lora_weights.safetensors").stat().st_mtime_ns == stamp
    report = json.loads((root / "demo.json").read_text())
    assert report["stages"]["spo"]["skipped"] and not report["stages"]["compare"]["skipped"]


def test_the_spm_stage_runs_in_bfloat16_only_where_asked_or_native(monkeypatch, tmp_path):
    """spm_precision: bfloat16 gives the SPM stage a bfloat16 pipeline and autocast, float32
    the toy config as shipped; auto follows what the processor computes natively."""
    import torch

    from spo.commands.demo import stage_args
    from spo.config import DemoConfig

    def spm(precision: str) -> list[str]:
        return stage_args(DemoConfig(out=str(tmp_path), spm_precision=precision), "spm")

    fast = ["base_dtype=bfloat16", "mixed_precision=bf16"]
    assert all(a in spm("bfloat16") for a in fast)
    assert not any(a.startswith(("base_dtype", "mixed_precision")) for a in spm("float32"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    for native in (True, False):
        monkeypatch.setattr(
            torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native
        )
        assert all(a in spm("auto") for a in fast) == native

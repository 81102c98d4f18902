"""Every shipped config loads into its command's schema and passes its checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo.config import COMMAND_CONFIGS, load_config

ROOT = Path(__file__).parents[1]
COMMAND_OF = {
    "world": "toy-world",
    "spm": "train-preference-model",
    "dpo": "train-dpo",
    "dpo_lora": "train-dpo",
    "spo": "train-spo",
    "compare": "compare",
    "latent_judge": "train-preference-model",
    "spo_latent": "train-spo",
}


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/*/*.yaml")), ids=lambda p: str(p))
def test_config_loads_and_validates(path: Path):
    cfg = load_config(COMMAND_CONFIGS[COMMAND_OF[path.stem]], path)
    cfg.validate()
    assert cfg.out.startswith(f"runs/{path.parent.name}/")


def test_released_settings():
    sd15 = load_config(COMMAND_CONFIGS["train-spo"], ROOT / "configs/sd15/spo.yaml")
    assert (sd15.sampler.k, sd15.sampler.threshold, sd15.policy.lora_rank) == (4, 0.3, 4)
    assert (sd15.optim.lr, sd15.beta, sd15.ratio_clip) == (6e-5, 10.0, 0.1)
    sdxl = load_config(COMMAND_CONFIGS["train-spo"], ROOT / "configs/sdxl/spo.yaml")
    assert (sdxl.sampler.k, sdxl.sampler.inner_steps, sdxl.sampler.threshold) == (2, 3, 0.4)
    assert (sdxl.policy.lora_rank, sdxl.optim.lr) == (64, 1e-5)
    dpo = load_config(COMMAND_CONFIGS["train-dpo"], ROOT / "configs/sd15/dpo.yaml")
    assert dpo.batch_size * dpo.gradient_accumulation_steps * 16 == 2048
    assert (dpo.beta, dpo.lr_scaling, dpo.optim.lr) == (5000.0, "code", 1e-8)


def test_lpo_settings():
    for family, low, high in (("sd15", 0.35, 0.5), ("sdxl", 0.45, 0.6)):
        spo = load_config(COMMAND_CONFIGS["train-spo"], ROOT / f"configs/{family}/spo_latent.yaml")
        s = spo.sampler
        assert (spo.judge, s.k, s.divert_step, spo.beta, spo.max_epochs) == (
            "latent",
            4,
            0,
            500.0,
            5,
        )
        assert (s.threshold, s.threshold_max, s.inner_steps, spo.batch_size) == (low, high, 0, 10)
        judge = load_config(
            COMMAND_CONFIGS["train-preference-model"], ROOT / f"configs/{family}/latent_judge.yaml"
        )
        assert (judge.judge, judge.latent.cfg_scale, judge.latent.max_timestep) == (
            "latent",
            7.5,
            951,
        )
        assert (judge.optim.lr, judge.optim.warmup_steps, judge.max_steps) == (1e-5, 500, 4000)

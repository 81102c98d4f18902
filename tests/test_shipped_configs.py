"""Every shipped config loads into its command's schema and passes its checks; the built-in
defaults are the toy experiment; configs are found by short name from anywhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from spo.config import COMMAND_CONFIGS, TOY_CONFIGS, load_config, shipped_configs
from spo.config.shipped import CONFIG_COMMANDS, resolve_config
from spo.errors import ConfigError

ROOT = Path(__file__).parents[1]


def shipped(name: str):
    return load_config(
        COMMAND_CONFIGS[CONFIG_COMMANDS[name.split("/")[1]]], resolve_config(name, "")
    )


def test_every_shipped_config_is_listed_and_the_checkout_link_points_at_them():
    names = shipped_configs()
    assert len(names) == 36 and {"toy/dpo", "toy/compare_edit", "sdxl/spo_latent"} <= set(names)
    assert (ROOT / "configs").resolve() == (ROOT / "spo/configs").resolve()
    on_disk = sorted(
        f"{p.parent.name}/{p.stem}"
        for p in ROOT.glob("configs/*/*.yaml")
        if p.parent.name != "accelerate"  # accelerate's config files (test_fsdp.py)
    )
    assert names == on_disk
    assert shipped_configs("train-dpo") == [
        "flux/dpo_lora",
        "sd15/dpo",
        "sd15/dpo_lora",
        "sd35/dpo_lora",
        "sdxl/dpo",
        "sdxl/dpo_lora",
        "toy/dpo",
        "toy/dpo_flow",
    ]


@pytest.mark.parametrize("name", shipped_configs())
def test_config_loads_and_validates(name: str):
    cfg = shipped(name)
    cfg.validate()
    assert cfg.out.startswith(f"runs/{name.split('/')[0]}/")


@pytest.mark.parametrize("command", sorted(TOY_CONFIGS))
def test_the_defaults_are_the_toy_experiment(command: str):
    """`spo <command>` with no config runs the documented toy run (the demo's stage)."""
    schema = COMMAND_CONFIGS[command]
    assert load_config(schema, resolve_config(TOY_CONFIGS[command], command)) == schema()


def test_the_defaults_hold_the_toy_values_the_docs_report():
    dpo = COMMAND_CONFIGS["train-dpo"]()
    assert (dpo.beta, dpo.optim.lr, dpo.batch_size, dpo.max_steps) == (2000.0, 1e-3, 16, 300)
    assert dpo.validation_images.guidance_scale == 2.0 and dpo.mixed_precision is None
    spo = COMMAND_CONFIGS["train-spo"]()
    assert (spo.sampler.guidance_scale, spo.optim.lr, spo.batch_size) == (2.0, 5e-4, 32)
    assert (spo.sampler.k, spo.policy.lora_rank, spo.sample_batch_size) == (4, 4, 40)
    spm = COMMAND_CONFIGS["train-preference-model"]()
    assert (spm.guidance_scale, spm.max_steps, spm.batch_size, spm.optim.weight_decay) == (
        2.0,
        250,
        32,
        0.3,
    )
    compare = COMMAND_CONFIGS["compare"]()
    assert [m.name for m in compare.models] == ["base", "dpo", "spo"]
    assert (compare.guidance_scale, compare.scorers) == (2.0, ["oracle", "spm:runs/toy/spm/final"])
    assert COMMAND_CONFIGS["toy-world"]().guidance_scale == 2.0


def _sampling_cfgs(cfg) -> dict[str, float]:
    """Every CFG scale a config samples with: key -> value."""
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "guidance_scale" and getattr(cfg, "judge", "pixel") == "pixel":
            found[f.name] = value
        elif dataclasses.is_dataclass(value) and getattr(value, "prompts", True):
            found |= {f"{f.name}.{k}": v for k, v in _sampling_cfgs(value).items()}
    return found


@pytest.mark.parametrize(
    "name", [n for n in shipped_configs() if n.split("/")[0] in ("sd15", "sdxl")]
)
def test_real_configs_sample_at_method_md_cfg(name: str):
    """The toy world's CFG 2.0 defaults must not leak into the sd15 / sdxl configs (the flow
    configs sample at their own published CFG, SPEC 8)."""
    found = _sampling_cfgs(shipped(name))
    assert set(found.values()) <= {5.0}, found
    # every other config samples: the latent judge never, sdxl/dpo_lora draws no validation grid
    assert found or name in ("sd15/latent_judge", "sdxl/latent_judge", "sdxl/dpo_lora")


@pytest.mark.parametrize("form", ["toy/dpo", "toy/dpo.yaml", "configs/toy/dpo.yaml"])
def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)  # no checkout here: the packaged copy is read
    found = resolve_config(form, "train-dpo")
    assert found.is_file() and Path(str(found)).resolve() == (ROOT / "spo/configs/toy/dpo.yaml")


def test_a_local_file_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy/dpo.yaml").write_text("beta: 1.0\n")
    assert resolve_config("toy/dpo.yaml", "train-dpo") == Path("toy/dpo.yaml")


def test_an_unknown_short_name_lists_the_commands_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_config("toy/dpx", "train-spo")
    assert str(err.value) == (
        "config file not found: toy/dpx (shipped configs of spo train-spo: flux/spo_latent, "
        "sd15/spo, sd15/spo_latent, sd35/spo, sd35/spo_latent, sdxl/spo, sdxl/spo_latent, "
        "toy/spo, toy/spo_flow, toy/spo_flow_latent, toy/spo_latent)"
    )
    assert resolve_config("nope.yaml", "demo") == Path("nope.yaml")  # load_config says it


def test_released_settings():
    sd15 = shipped("sd15/spo")
    assert (sd15.sampler.k, sd15.sampler.threshold, sd15.policy.lora_rank) == (4, 0.3, 4)
    assert (sd15.optim.lr, sd15.beta, sd15.ratio_clip) == (6e-5, 10.0, 0.1)
    sdxl = shipped("sdxl/spo")
    assert (sdxl.sampler.k, sdxl.sampler.inner_steps, sdxl.sampler.threshold) == (2, 3, 0.4)
    assert (sdxl.policy.lora_rank, sdxl.optim.lr) == (64, 1e-5)
    dpo = shipped("sd15/dpo")
    assert dpo.batch_size * dpo.gradient_accumulation_steps * 16 == 2048
    assert (dpo.beta, dpo.lr_scaling, dpo.optim.lr) == (5000.0, "code", 1e-8)


def test_lpo_settings():
    for family, low, high in (("sd15", 0.35, 0.5), ("sdxl", 0.45, 0.6)):
        spo = shipped(f"{family}/spo_latent")
        s = spo.sampler
        assert (spo.judge, s.k, s.divert_step, spo.beta, spo.max_epochs) == (
            "latent",
            4,
            0,
            500.0,
            5,
        )
        assert (s.threshold, s.threshold_max, s.inner_steps, spo.batch_size) == (low, high, 0, 10)
        judge = shipped(f"{family}/latent_judge")
        assert (judge.judge, judge.latent.cfg_scale, judge.latent.max_timestep) == (
            "latent",
            7.5,
            951,
        )
        assert (judge.optim.lr, judge.optim.warmup_steps, judge.max_steps) == (1e-5, 500, 4000)


def test_the_sd35_lora_targets_are_modules_of_the_sd35_medium_transformer():
    """configs/sd35/dpo_lora.yaml names modules the real architecture has (built weightless:
    SPEC 8 gives 2.24B parameters for SD3.5 Medium's transformer in diffusers 0.42)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from spo.architectures import SD35_MEDIUM_TRANSFORMER

    with init_empty_weights():
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    params = sum(p.numel() for p in transformer.parameters())
    assert round(params / 1e9, 2) == 2.24
    names = [n for n, _ in transformer.named_modules()]
    targets = shipped("sd35/dpo_lora").policy.lora_targets
    assert shipped("sd35/dpo_lora").validation_images.guidance_scale == 4.5
    for target in targets:
        assert any(n.endswith("." + target) for n in names), target


@pytest.mark.parametrize(
    "name", [n for n in shipped_configs("train-dpo") if not n.startswith("toy/")]
)
def test_every_real_dpo_config_names_its_model_family(name: str):
    """A real config's settings are its family's: a base model of another family is refused
    (tests/test_bad_inputs.py: dpo-sd3-config-on-a-flux-folder)."""
    family = {"sd15": "sd", "sdxl": "sdxl", "sd35": "sd3", "flux": "flux"}[name.split("/")[0]]
    assert shipped(name).model_family == family


def test_the_flux_config_fits_flux_dev():
    """configs/flux/dpo_lora.yaml: its LoRA targets are modules of FLUX.1-dev's transformer
    (built weightless, 11.90B parameters as SPEC 8 says), its resolution a multiple of the
    packed latent grid, its guidance FLUX.1-dev's."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from spo.architectures import FLUX_DEV_TRANSFORMER

    with init_empty_weights():
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2) == 11.90
    names = [n for n, _ in transformer.named_modules()]
    cfg = shipped("flux/dpo_lora")
    for target in cfg.policy.lora_targets:
        assert any(n.endswith("." + target) for n in names), target
    assert cfg.resolution % 16 == 0 and cfg.validation_images.guidance_scale == 3.5


@pytest.mark.parametrize(
    ("family", "name", "layers"),
    [("sd35", "SD35_MEDIUM_TRANSFORMER", 24), ("flux", "FLUX_DEV_TRANSFORMER", 19)],
)
def test_flow_spo_configs_fit_their_architecture_and_cite_their_settings(family, name, layers):
    """The flow SPO runs: their judges' blocks exist in the real transformer, the LoRA targets
    are its modules, the pixel run keeps SPO's released sampler and the latent runs LPO's."""
    import spo.architectures

    config = getattr(spo.architectures, name)
    assert config["num_layers"] == layers
    judge = shipped(f"{family}/latent_judge")
    assert judge.judge == "latent" and 1 <= judge.latent.blocks <= layers
    assert judge.latent.cfg_scale is None and judge.resolution == 512
    latent = shipped(f"{family}/spo_latent")
    s = latent.sampler
    assert (s.k, s.divert_step, s.threshold, s.threshold_max, latent.beta) == (
        4,
        0,
        0.35,
        0.5,
        500.0,
    )
    assert s.noise_level == 0.7 and latent.resolution == 512
    assert latent.model_family == {"sd35": "sd3", "flux": "flux"}[family]
    assert latent.policy.gradient_checkpointing and latent.policy.mode == "lora"
    if family == "flux":
        assert s.guidance_scale == 3.5  # guidance-distilled: FLUX.1-dev's input value
        return
    pixel = shipped("sd35/spo")
    s = pixel.sampler
    assert (s.k, s.divert_step, s.threshold, pixel.beta, pixel.ratio_clip) == (4, 4, 0.3, 10, 0.1)
    assert (s.guidance_scale, s.noise_level, pixel.resolution) == (4.5, 0.7, 512)
    spm = shipped("sd35/spm")
    assert (spm.guidance_scale, spm.resolution) == (4.5, 512)  # made as SPO samples

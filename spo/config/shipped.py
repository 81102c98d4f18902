"""The configs shipped in the package (spo/configs/<family>/<name>.yaml), found by short name.

Why: installed from a wheel there is no repository around the package, so a path such as
configs/toy/dpo.yaml finds nothing. `importlib.resources` finds the packaged copies from a wheel
and from a source checkout alike (the checkout's root `configs` is a link to spo/configs).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from spo.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# A shipped config's name (its file's stem, in every family) -> the command it configures.
CONFIG_COMMANDS = {
    "world": "toy-world",
    "spm": "train-preference-model",
    "spm_flow": "train-preference-model",
    "latent_judge": "train-preference-model",
    "latent_judge_flow": "train-preference-model",
    "dpo": "train-dpo",
    "dpo_lora": "train-dpo",
    "dpo_flow": "train-dpo",
    "spo": "train-spo",
    "spo_latent": "train-spo",
    "spo_flow": "train-spo",
    "spo_flow_latent": "train-spo",
    "compare": "compare",
    "compare_flow": "compare",
    "compare_edit": "compare",
}
# A command -> its toy config: the experiment its built-in defaults run (the demo's stage).
TOY_CONFIGS = {
    "toy-world": "toy/world",
    "train-preference-model": "toy/spm",
    "train-dpo": "toy/dpo",
    "train-spo": "toy/spo",
    "compare": "toy/compare",
}


# accelerate's own config files (`accelerate launch --config_file`, docs/training.md), shipped
# beside spo's but not configs of any spo command
ACCELERATE_FOLDER = "accelerate"


def shipped_root() -> Traversable:
    """The folder of the shipped configs, inside the installed (or checked-out) package."""
    return files("spo") / "configs"


def shipped_configs(command: str | None = None) -> list[str]:
    """Short names (`toy/dpo`) of the shipped configs; only `command`'s if given."""
    names = []
    for family in sorted(shipped_root().iterdir(), key=lambda t: t.name):
        if family.name == ACCELERATE_FOLDER:
            continue
        for config in sorted(family.iterdir(), key=lambda t: t.name):
            stem = config.name.removesuffix(".yaml")
            if config.name.endswith(".yaml") and command in (None, CONFIG_COMMANDS.get(stem)):
                names.append(f"{family.name}/{stem}")
    return names


def resolve_config(arg: str | Path, command: str) -> Path | Traversable:
    """The file `--config ARG` means: ARG itself if it is a file, else the shipped config that
    it names as `family/name`, `family/name.yaml` or `configs/family/name.yaml` (the checkout's
    path, so the documented commands work from a wheel too). A missing file is one line."""
    path = Path(arg)
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if path.is_file() or path.is_absolute() or len(parts) != 2:
        return path  # load_config reads it, or says it is not found
    family, name = parts
    shipped = shipped_root() / family / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    mine = shipped_configs(command)
    hint = f" (shipped configs of spo {command}: {', '.join(mine)})" if mine else ""
    raise ConfigError(f"config file not found: {arg}{hint}")

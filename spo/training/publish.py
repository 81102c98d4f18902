"""A trained result handed over: its model card (final/README.md) and its upload to the Hub.

Why: `final/` is read by people and by other programs long after the run; its folder alone
must say what it is (base model, method, settings, final metrics) and how to load it with
diffusers and with peft, as diffusers' own training examples' cards do, and `push_to_hub`
publishes exactly that folder with huggingface_hub's own upload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spo.errors import ConfigError, TrainingError
from spo.families import family_class
from spo.sources import is_local_path


def _value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, lists comma-separated."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {key} | {_value(value)} |" for key, value in rows.items() if value is not None]
    return "\n".join(lines)


def _front_matter(policy: dict[str, Any], method: str) -> str:
    """The card's YAML metadata: the Hub reads `base_model` as a model id, so a local base
    model is named in the text only."""
    from huggingface_hub import ModelCardData

    family = family_class(policy["family"]).hub_tag
    tags = ["text-to-image", "diffusers", "diffusers-training", family, method.lower()]
    if policy["mode"] == "lora":
        tags.append("lora")
    base = policy["base_model"]
    data = ModelCardData(
        library_name="diffusers",
        base_model=None if is_local_path(base) else base,
        pipeline_tag="text-to-image",
        tags=tags,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _usage(policy: dict[str, Any], location: str) -> str:
    """How to load the result, with diffusers and (LoRA) with peft."""
    base = policy["base_model"]
    family = family_class(policy["family"])
    if policy["mode"] != "lora":
        name, cls = family.denoiser, family.denoiser_class
        return f"""```python
import torch
from diffusers import DiffusionPipeline, {cls}

{name} = {cls}.from_pretrained("{location}", subfolder="{name}")
pipe = DiffusionPipeline.from_pretrained("{base}", {name}={name}, dtype=torch.float32)
image = pipe("a prompt").images[0]
```"""
    return f"""With diffusers (`pytorch_lora_weights.safetensors`, rank and alpha in its metadata):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}", dtype=torch.float32)
pipe.load_lora_weights("{location}")
image = pipe("a prompt").images[0]
```

With peft (`adapter_config.json` + `adapter_model.safetensors`), adapters added to the
pipeline's {family.denoiser} in place:

```python
from diffusers import DiffusionPipeline
from peft import PeftModel

pipe = DiffusionPipeline.from_pretrained("{base}")
PeftModel.from_pretrained(pipe.{family.denoiser}, "{location}")
image = pipe("a prompt").images[0]
```"""


def model_card(
    *,
    method: str,
    command: str,
    policy: dict[str, Any],
    settings: dict[str, Any],
    summary: dict[str, Any],
    location: str,
) -> str:
    """final/README.md of a DPO or SPO run: `policy` is `Policy.describe()`, `settings` the
    method's key settings, `summary` train_summary.json's content, `location` where a user
    loads the result from (the Hub id it is pushed to, else the folder)."""
    lora = policy["mode"] == "lora"
    what = "LoRA adapters for the UNet" if lora else "A fully fine-tuned UNet"
    scale = f", scale alpha / rank = {policy['alpha'] / policy['rank']:g}" if lora else ""
    trained = {"method": method, "base model": policy["base_model"], "mode": policy["mode"]}
    if lora:
        trained |= {
            "LoRA rank": policy["rank"],
            "LoRA alpha": policy["alpha"],
            "LoRA targets": policy["targets"],
        }
    metrics = {k: v for k, v in summary.items() if k != "final_metrics"}
    metrics |= summary.get("final_metrics", {})
    return f"""{_front_matter(policy, method)}
# {method} {"LoRA" if lora else "UNet"} for `{policy["base_model"]}`

{what} of `{policy["base_model"]}` ({policy["family"]} family{scale}),
trained with {method} by `{command}` (spo-diffusion). This card was written by the trainer
from its config and `train_summary.json`.

## Training settings

{_table(trained | settings)}

## Final metrics

From `train_summary.json` (`final_metrics`: the last averaged window logged, at its `step`).

{_table(metrics)}

## How to use

{_usage(policy, location)}
"""


def check_hub_token() -> None:
    """One line before any model loads when `push_to_hub` has no token to push with."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise ConfigError(
            "push_to_hub=true needs a Hugging Face token with write access: `hf auth login`, "
            "or set HF_TOKEN"
        )


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload `folder` to the model repository `repo_id` (created if missing) with
    huggingface_hub; returns the repository's full id. A failed upload is one line: the
    result stays in `folder`, and the line says how to upload it again."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        full_id = api.create_repo(repo_id, repo_type="model", exist_ok=True).repo_id
        api.upload_folder(
            repo_id=full_id,
            folder_path=folder,
            repo_type="model",
            commit_message="Upload the result of an SPO toolkit run",
        )
    except Exception as e:  # the Hub client raises HTTP, connection and auth errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"push_to_hub: uploading {folder} to {repo_id} failed ({first}); the result is "
            f"kept there, upload it with `hf upload {repo_id} {folder} .`"
        ) from e
    return full_id

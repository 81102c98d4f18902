"""A trained LoRA is the same model for every consumer: stock diffusers (`load_lora_weights`,
alpha from the weights' metadata), peft (`PeftModel.from_pretrained`), `spo compare`, and the
trainer's own in-memory policy; final/ carries a model card; `push_to_hub` uploads final/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compare_args, dpo_args, one_error_line
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_pipelines import build_tiny_sdxl

from spo.cli import main
from spo.commands.compare import image_seed
from spo.config import PolicyConfig
from spo.models import DiffusionModel
from spo.policy import LORA_WEIGHTS, Policy

PROMPTS = ["a red circle on a white background", "a blue cross on a gray background"]
STEPS, GUIDANCE = 4, 2.0
SAME = 1e-4  # largest pixel difference (images in [0, 1]) between two loaders of one model


def _dpo_args(world: Path, out: Path, *extra: str) -> list[str]:
    return dpo_args(world, out, "checkpoint_every=0", "optim.warmup_steps=0", *extra)


def _images(model: DiffusionModel, seeds=(0, 1)) -> torch.Tensor:
    return model.generate(PROMPTS, list(seeds), STEPS, GUIDANCE)


def _base(world: Path) -> DiffusionModel:
    return DiffusionModel.from_pretrained(str(world / "base_model"))


def _lora_scale(unet: torch.nn.Module) -> float:
    """The scaling peft applies to the first LoRA layer of `unet`."""
    for module in unet.modules():
        if getattr(module, "scaling", None):
            return next(iter(module.scaling.values()))
    raise AssertionError("no LoRA layer")


@pytest.fixture(scope="module")
def trained(mini_world, tmp_path_factory):
    """A DPO LoRA (rank 4, alpha 16) trained for 3 steps at a high learning rate, and the
    trainer's own Policy object as it was when final/ was written."""
    out = tmp_path_factory.mktemp("handover") / "dpo"
    saved: list[Policy] = []
    save = Policy.save

    def save_and_keep(self, folder, card=None):
        save(self, folder, card)
        if card is not None:  # the final save (checkpoints have no card)
            saved.append(self)

    args = _dpo_args(mini_world, out, "max_steps=3", "optim.lr=0.05")
    args += ["policy.lora_rank=4", "policy.lora_alpha=16"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Policy, "save", save_and_keep)
        assert main(args) == 0
    (policy,) = saved
    policy.unet.eval()
    return out / "final", policy


def test_every_loader_gives_the_trained_images(mini_world, trained):
    from peft import PeftModel

    final, policy = trained
    ours = _images(policy.model)  # (iii) the trainer's in-memory policy
    base = _images(_base(mini_world))

    stock = _base(mini_world)  # (i) stock diffusers, alpha / rank from the file's metadata
    stock.pipe.load_lora_weights(str(final))
    assert _lora_scale(stock.unet) == 4.0
    by_diffusers = _images(stock)

    peft = _base(mini_world)  # (ii) peft's own loader, adapters added to the UNet in place
    PeftModel.from_pretrained(peft.pipe.unet, str(final))
    assert _lora_scale(peft.unet) == 4.0
    by_peft = _images(peft)

    # What loading gave before alpha was recorded: diffusers assumed alpha = rank (scale 1).
    old = final.parent / "old_format"
    old.mkdir()
    save_file(load_file(final / LORA_WEIGHTS), old / LORA_WEIGHTS)
    unscaled = _base(mini_world)
    unscaled.pipe.load_lora_weights(str(old))
    assert _lora_scale(unscaled.unet) == 1.0
    by_old = _images(unscaled)

    diff = {
        "diffusers": (by_diffusers - ours).abs().max().item(),
        "peft": (by_peft - ours).abs().max().item(),
        "base": (base - ours).abs().max().item(),
        "old scale 1.0": (by_old - ours).abs().max().item(),
    }
    print("max pixel difference to the trained policy:", diff)
    assert diff["diffusers"] < SAME and diff["peft"] < SAME
    assert diff["base"] > 0.05  # the LoRA changes images, so equality above means something
    assert diff["old scale 1.0"] > 0.05

    with safe_open(str(final / LORA_WEIGHTS), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 16)
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 16, "LORA")
    assert config["target_modules"] == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    assert json.loads((final / "policy.json").read_text())["alpha"] == 16


def test_compare_evaluates_the_trained_model(mini_world, trained, tmp_path):
    final, policy = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "compare"
    model = f"{{name: dpo, pipeline: {mini_world / 'base_model'}, lora: {final}}}"
    args = compare_args(
        out,
        prompts,
        [model],
        "images_per_prompt=1",
        f"num_inference_steps={STEPS}",
        f"guidance_scale={GUIDANCE}",
        "bootstrap=10",
    )
    assert main(args) == 0
    seeds = [image_seed(0, i, 0) for i in range(len(PROMPTS))]
    ours = (_images(policy.model, seeds).permute(0, 2, 3, 1).numpy() * 255).round()
    pngs = [Image.open(out / f"images/dpo/p{i:05d}_s0.png") for i in range(len(PROMPTS))]
    diff = np.abs(np.stack([np.asarray(png, dtype=np.float64) for png in pngs]) - ours).max()
    print(f"spo compare vs the trained policy: max difference {diff:g} / 255")
    assert diff <= 1  # PNG rounding only


def test_model_card_names_the_run(trained):
    final, _ = trained
    card = (final / "README.md").read_text()
    summary = json.loads((final / "train_summary.json").read_text())
    assert card.startswith("---\n") and "library_name: diffusers" in card
    for needed in (
        "Diffusion-DPO",
        "| LoRA rank | 4 |",
        "| LoRA alpha | 16 |",
        "| LoRA targets | to_q, to_k, to_v, to_out.0 |",
        "| beta | 2000 |",
        "| learning rate | 0.05 |",
        "| step | 3 |",
        f"| train/loss | {summary['final_metrics']['train/loss']:.4g} |",
        f'pipe.load_lora_weights("{final}")',
        f'PeftModel.from_pretrained(pipe.unet, "{final}")',
    ):
        assert needed in card, needed
    assert summary["final_metrics"]["step"] == 3


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_both_families_save_alpha_for_diffusers_and_peft(mini_world, tmp_path, family):
    """No training: adapters with random weights, rank 2 and alpha 6 (scale 3), saved and loaded
    back; one UNet call each."""
    from peft import PeftModel

    source = mini_world / "base_model" if family == "sd" else build_tiny_sdxl(tmp_path / "xl")
    model = DiffusionModel.from_pretrained(str(source))
    policy = Policy(model, PolicyConfig(lora_rank=2, lora_alpha=6))
    torch.manual_seed(0)
    for name, p in policy.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    policy.unet.eval()
    policy.save(tmp_path / "lora")

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = model.encode_text(["a red circle"])
    t = torch.tensor([500])

    def output(m: DiffusionModel) -> torch.Tensor:
        with torch.no_grad():
            return m.unet_forward(m.unet, latents, t, text)

    ours = output(model)
    stock = DiffusionModel.from_pretrained(str(source))
    plain = output(stock)
    stock.pipe.load_lora_weights(str(tmp_path / "lora"))
    peft = DiffusionModel.from_pretrained(str(source))
    PeftModel.from_pretrained(peft.pipe.unet, str(tmp_path / "lora"))
    assert _lora_scale(stock.unet) == _lora_scale(peft.unet) == 3.0
    assert (ours - plain).abs().max() > 1e-3
    assert torch.allclose(output(stock), ours, atol=1e-5)
    assert torch.allclose(output(peft), ours, atol=1e-5)
    assert not (tmp_path / "lora/README.md").exists()  # a checkpoint's save has no card


# ------------------------------------------------------------------------------ the Hub


class FakeHub:
    """Stands for the Hub: records HfApi.create_repo / upload_folder calls and what the
    uploaded folder held; `fail` makes the upload raise."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.files: list[str] = []
        self.fail = fail

    def install(self, m: pytest.MonkeyPatch) -> None:
        from huggingface_hub import HfApi, RepoUrl

        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return RepoUrl(f"https://huggingface.co/me/{repo_id.split('/')[-1]}")

        def upload_folder(api, **kwargs):
            hub.calls.append(("upload_folder", kwargs))
            hub.files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            if hub.fail:
                raise OSError("503 Service Unavailable")

        m.setattr(HfApi, "create_repo", create_repo)
        m.setattr(HfApi, "upload_folder", upload_folder)
        m.setattr("huggingface_hub.get_token", lambda: "hf_test")


def test_push_to_hub_uploads_final(mini_world, tmp_path, capsys):
    out = tmp_path / "dpo"
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as m:
        hub.install(m)
        args = _dpo_args(mini_world, out, "max_steps=1", "push_to_hub=true")
        assert main([*args, "hub_model_id=me/toy-dpo"]) == 0
    (create, create_kw), (upload, upload_kw) = hub.calls
    assert create == "create_repo" and create_kw["repo_id"] == "me/toy-dpo"
    assert create_kw["exist_ok"] is True
    assert upload == "upload_folder" and upload_kw["repo_id"] == "me/toy-dpo"
    assert Path(upload_kw["folder_path"]) == out / "final"
    assert hub.files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "policy.json",
        LORA_WEIGHTS,
        "train_summary.json",
    ]
    card = (out / "final/README.md").read_text()
    assert 'pipe.load_lora_weights("me/toy-dpo")' in card
    assert "https://huggingface.co/me/toy-dpo" in capsys.readouterr().out


def test_a_failed_upload_is_one_line_and_keeps_the_result(mini_world, tmp_path, capsys):
    out = tmp_path / "dpo"
    with pytest.MonkeyPatch.context() as m:
        FakeHub(fail=True).install(m)
        args = _dpo_args(mini_world, out, "max_steps=1", "push_to_hub=true")
        capsys.readouterr()
        assert main([*args, "hub_model_id=me/toy-dpo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bars, then the error
    line = err[-1]
    assert [x for x in err if "error" in x] == [line] and line.startswith("spo: error: ")
    assert "503 Service Unavailable" in line and f"hf upload me/toy-dpo {out / 'final'}" in line
    assert (out / "final" / LORA_WEIGHTS).is_file()


@pytest.mark.parametrize("command", ["train-dpo", "train-spo"])
def test_push_to_hub_settings_are_checked_first(tmp_path, capsys, command):
    out = tmp_path / "run"
    args = [command, "--out", str(out), "push_to_hub=true"]
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "'hub_model_id'" in line and "push_to_hub=true" in line
    assert main([*args, "hub_model_id=a/b/c"]) == 2
    assert "not a Hub repository id" in one_error_line(capsys)
    assert not out.exists()


def test_push_to_hub_without_a_token_fails_before_any_model_loads(
    mini_world, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr(DiffusionModel, "from_pretrained", None)  # loading would fail loudly
    out = tmp_path / "dpo"
    args = _dpo_args(mini_world, out, "max_steps=1", "push_to_hub=true", "hub_model_id=me/x")
    capsys.readouterr()
    assert main(args) == 2
    assert "push_to_hub=true needs a Hugging Face token" in one_error_line(capsys)
    assert not out.exists()

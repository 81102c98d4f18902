"""The trained UNet and its frozen reference, for LoRA and for full fine-tuning.

Why one place: DPO and SPO both need "the policy" and "the reference" (method.md 1 and 3). With
LoRA the reference is the same UNet with its adapters disabled, so no second UNet is held in
memory; with full fine-tuning it is a frozen copy, optionally kept in CPU memory and streamed
to the device per call. Results are written in the formats their consumers load: a LoRA as
`pytorch_lora_weights.safetensors` for diffusers (`pipe.load_lora_weights(dir)`, its rank and
alpha in the file's metadata) and as `adapter_config.json` + `adapter_model.safetensors` for
peft (`PeftModel.from_pretrained(unet, dir)`); a full fine-tune as a `unet/` folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from spo.config.schemas import PolicyConfig
from spo.errors import ConfigError
from spo.families import family_class
from spo.models import DiffusionModel, describe_pipeline_folder
from spo.training.distributed import gathered, master_weights, sharded

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def check_lora_targets(base_model: str, cfg: PolicyConfig) -> None:
    """One line for a `policy.lora_targets` name that matches no denoiser module, before any
    weights load: peft (which matches a name against the end of each module path) would say so
    only after the model loaded. Checked on a weightless denoiser (a UNet, or a flow family's
    transformer) built from its config.json in the pipeline folder; for a hub id, peft checks
    it."""
    facts = describe_pipeline_folder(base_model)
    if cfg.mode != "lora" or facts is None:
        return
    import diffusers
    from accelerate import init_empty_weights

    folder = Path(base_model) / family_class(facts["family"]).denoiser
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights():
        denoiser = cls.from_config(cls.load_config(folder))
    names = [name for name, _ in denoiser.named_modules()]
    for target in cfg.lora_targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ConfigError(
                f"invalid value {target!r} in config key 'policy.lora_targets': no "
                f"{config['_class_name']} module has that name (e.g. to_q, to_k, to_v, "
                "to_out.0, proj_in, ff.net.2)"
            )


def compile_in_place(root: torch.nn.Module, mode: str, blocks: Sequence[str]) -> int:
    """torch.compile `root` in place (its parameter names, hence checkpoints and saved weights,
    stay as they are): `full` as one graph, `regional` every module whose class is named in
    `blocks` (all instances of a block share one compiled graph, so compilation takes seconds
    instead of the minutes a whole UNet or transformer takes). Returns how many modules were
    compiled."""
    if mode == "none":
        return 0
    if mode == "full":
        root.compile()
        return 1
    targets = [m for m in root.modules() if type(m).__name__ in blocks]
    # static shapes: a UNet's blocks come in a few sizes, each its own graph (inductor fails
    # on the symbolic shapes that dynamo would otherwise guess from them); enough graphs
    # for every size, for training and sampling, policy and reference
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in targets:
        module.compile(dynamic=False)
    return len(targets)


class Policy:
    """The trainable UNet of `model` (in place: `model.unet` / `model.pipe.unet` is the policy)
    and a way to call the reference."""

    def __init__(self, model: DiffusionModel, cfg: PolicyConfig) -> None:
        self.model = model
        self.cfg = cfg
        unet = model.unet
        self.reference_unet = None
        if cfg.mode == "lora":
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                    init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
                    target_modules=list(cfg.lora_targets),
                )
            )
            # Trainable adapters in float32 even when the frozen UNet is half precision.
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.to(torch.float32)
            self.reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
            if cfg.reference_offload and model.device.type != "cpu":
                from accelerate import cpu_offload

                self.reference_unet.to("cpu")
                cpu_offload(self.reference_unet, execution_device=model.device)
            unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = unet
        # of a sharded run (FSDP, DeepSpeed), the weights the next `save` writes, made whole
        # by `gather`
        self._gathered: dict[str, torch.Tensor] | None = None

    def compile(self, mode: str, *, announce: bool = False) -> int:
        """Compile the policy (and a full fine-tune's reference) in place, `mode` as
        `speed.compile` says, saying so when `announce`; returns the number of modules
        compiled."""
        blocks = self.model.family_module.compile_blocks
        count = compile_in_place(self.unet, mode, blocks)
        if self.reference_unet is not None:
            compile_in_place(self.reference_unet, mode, blocks)
        if count and announce:
            what = "the whole denoiser" if mode == "full" else f"{count} {'/'.join(blocks)}"
            print(f"speed.compile={mode}: {what} compiled; the first steps include compiling")
        return count

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self, unet=None) -> Iterator[torch.nn.Module]:
        """The reference UNet for the duration of the block (no gradients). `unet` is the
        (possibly accelerate-wrapped) policy; with LoRA its adapters are disabled meanwhile."""
        if self.reference_unet is not None:
            with torch.no_grad():
                yield self.reference_unet
            return
        target = self.unet
        target.disable_adapters()
        try:
            with torch.no_grad():
                yield target if unet is None else unet
        finally:
            target.enable_adapters()

    def _saved_state(self, state: dict[str, torch.Tensor] | None = None):
        """What `save` writes, as the denoiser names it: the adapters (peft's key format) for
        LoRA, every weight for a full fine-tune; taken from `state` (a state dict of the
        denoiser) when given, else from the denoiser itself."""
        if self.cfg.mode == "lora":
            from peft.utils import get_peft_model_state_dict

            return get_peft_model_state_dict(self.unet, state_dict=state)
        return self.unet.state_dict() if state is None else state

    def gather(self) -> None:
        """Every rank of a sharded run (FSDP, DeepSpeed) calls this before the main process
        saves: the weights that `save` writes are gathered whole (a collective; DeepSpeed's
        float32 masters) and kept for it."""
        state = self.unet.state_dict() | master_weights(self.unet)  # DeepSpeed: float32
        self._gathered = gathered(self._saved_state(state))

    def _peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters in peft's key format, float32 on the CPU."""
        state = self._saved_state() if self._gathered is None else self._gathered
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters named as the family's diffusers LoRA files name them (what
        `save_lora_weights` writes)."""
        return self.model.family_module.lora_file_state(self._peft_state_dict())

    def lora_config(self) -> dict[str, Any]:
        """The adapters' peft `LoraConfig` as JSON-ready values: what diffusers reads back from
        the weights' metadata and peft from adapter_config.json, so both apply alpha / rank as
        trained (without it diffusers assumes alpha = rank). The targets are sorted, so two
        identical runs write identical files, and the base model is named."""
        config = self.unet.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        config["base_model_name_or_path"] = str(self.model.pipe.name_or_path)
        return config

    def load_lora_state_dict(self, folder: Path) -> None:
        """Load adapters written by `save` (resume)."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(folder / LORA_WEIGHTS)
        prefix = f"{self.model.family_module.denoiser}."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        result = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(state))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ConfigError(f"{folder}: LoRA weights do not fit this UNet ({unexpected[0]})")

    def describe(self) -> dict[str, Any]:
        """What `policy.json` records: the mode, model family and base model, and for LoRA the
        rank, alpha and targets."""
        info: dict[str, Any] = {
            "mode": self.cfg.mode,
            "family": self.model.family,
            "base_model": str(self.model.pipe.name_or_path),
        }
        if self.cfg.mode == "lora":
            info |= {
                "rank": self.cfg.lora_rank,
                "alpha": self.cfg.lora_alpha or self.cfg.lora_rank,
                "targets": list(self.cfg.lora_targets),
            }
        return info

    def save(self, folder: Path, card: str | None = None) -> None:
        """Write the result for diffusers (and, for LoRA, peft), `policy.json`, and the model
        card `card` as README.md when given."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.mode == "lora":
            from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
            from safetensors.torch import save_file

            config = self.lora_config()
            denoiser = self.model.family_module.denoiser  # unet, or a flow family's transformer
            type(self.model.pipe).save_lora_weights(
                folder,
                safe_serialization=True,
                **{
                    f"{denoiser}_lora_layers": self.lora_state_dict(),
                    f"{denoiser}_lora_adapter_metadata": config,
                },
            )
            # peft's own layout (what PeftModel.save_pretrained writes): its keys are the
            # wrapped model's, `base_model.model.<module>.lora_A.weight`.
            peft_state = {f"base_model.model.{k}": v for k, v in self._peft_state_dict().items()}
            save_file(peft_state, folder / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
            text = json.dumps(config, indent=2, sort_keys=True)
            (folder / CONFIG_NAME).write_text(text + "\n")
        else:
            self._denoiser_to_save().save_pretrained(
                folder / self.model.family_module.denoiser, safe_serialization=True
            )
        (folder / "policy.json").write_text(json.dumps(self.describe(), indent=2) + "\n")
        if card is not None:
            (folder / "README.md").write_text(card)
        self._gathered = None

    def _denoiser_to_save(self) -> torch.nn.Module:
        """The full fine-tune as diffusers saves it: the policy itself, or when sharded a
        weightless copy of its class given the gathered weights (what `save_pretrained` writes
        is then the same folder as without sharding)."""
        if self._gathered is None:
            return self.unet
        import diffusers
        from accelerate import init_empty_weights

        cls = getattr(diffusers, self.unet.config["_class_name"])
        with init_empty_weights():
            whole = cls.from_config(self.unet.config)
        whole.load_state_dict(self._gathered, assign=True)
        return whole


def register_lora_checkpoint_hooks(accelerator, policy: Policy) -> None:
    """Checkpoints of LoRA runs hold the adapters only (MBs, not the GBs of the whole UNet).
    Not under FSDP or DeepSpeed: the engine then writes the model itself, each rank its part,
    frozen weights included."""
    if sharded(accelerator):
        return

    def save_hook(models, weights, output_dir: str) -> None:
        if accelerator.is_main_process:
            policy.save(Path(output_dir))
        while weights:
            weights.pop()

    def load_hook(models, input_dir: str) -> None:
        folder = Path(input_dir)
        if not (folder / LORA_WEIGHTS).is_file():
            raise ConfigError(f"{folder}: no {LORA_WEIGHTS}; not a checkpoint of a LoRA run")
        while models:
            models.pop()
        policy.load_lora_state_dict(folder)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

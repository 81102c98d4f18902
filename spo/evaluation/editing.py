"""The editing task of `spo compare` (SDEdit): its sources and its fidelity measure.

Why a block-colour fidelity: SDEdit is asked to keep a source's layout (where which colour is)
while it changes the details (the Diffusion-DPO paper's colour-layout edits). A pixel measure
(PSNR, SSIM) or a learned one (LPIPS) punishes exactly the detail changes an edit is for, and
LPIPS needs downloaded weights; comparing the two images' colours averaged over coarse blocks
measures the layout alone. It reads 1 for an edit with the source's block colours and falls
as they drift (0 would be every block off by the whole range in every channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from spo.config.schemas import EditConfig
from spo.data import decode_image, load_columns
from spo.errors import ConfigError
from spo.sources import read_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def block_colour_fidelity(edited: Tensor, source: Tensor, blocks: int) -> Tensor:
    """1 - the mean absolute difference of the images' colours averaged over `blocks` x
    `blocks` blocks, per image. `edited`, `source`: (N, 3, H, W) in [0, 1], the same size."""
    a = F.adaptive_avg_pool2d(edited.float(), blocks)
    b = F.adaptive_avg_pool2d(source.float(), blocks)
    return 1 - (a - b).abs().flatten(1).mean(dim=1)


@dataclass
class EditSources:
    """The sources of an editing comparison: RGB images and one edit prompt each."""

    images: list[Image.Image]
    prompts: list[str]
    names: list[str]  # file names, or row numbers of a table

    def pixels(self, resolution: int) -> Tensor:
        """(N, 3, resolution, resolution) in [0, 1]: every source resized (bicubic) to the size
        the models edit at."""
        arrays = [
            np.asarray(im.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
            for im in self.images
        ]
        return torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2).contiguous()


def load_edit_sources(edit: EditConfig, prompt_column: str, split: str) -> EditSources:
    """The sources of `edit`, every image decoded: a folder of images with its prompts file
    (one line per image, in name order), or a table with image and prompt columns. A source
    that does not decode, or prompts that do not match the images in number, is one line."""
    source = str(edit.sources)
    folder = Path(source)
    if folder.is_dir() and not (folder / "dataset_info.json").is_file():
        return _from_folder(folder, edit.prompts_file)
    columns = load_columns(source, [edit.image_column, prompt_column], split, what="edit sources")
    images = [
        _decode(value, f"{source} row {i} ({edit.image_column!r})")
        for i, value in enumerate(columns[edit.image_column])
    ]
    prompts = [str(p).strip() for p in columns[prompt_column]]
    if not images:
        raise ConfigError(f"edit sources {source}: no rows")
    return EditSources(images, prompts, [f"row {i}" for i in range(len(images))])


def _from_folder(folder: Path, prompts_file: str | None) -> EditSources:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"edit sources {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    path = Path(prompts_file) if prompts_file else folder / "prompts.txt"
    if not path.is_file():
        raise ConfigError(f"edit prompts file not found: {path} (one prompt per image)")
    prompts = [line.strip() for line in read_text(path, "edit prompts file").splitlines()]
    prompts = [p for p in prompts if p]
    if len(prompts) != len(files):
        raise ConfigError(
            f"edit prompts file {path} has {len(prompts)} prompts for the {len(files)} images "
            f"of {folder}: one prompt per image, in name order"
        )
    images = [_decode(f.read_bytes(), str(f)) for f in files]
    return EditSources(images, prompts, [f.name for f in files])


def _decode(value, where: str) -> Image.Image:
    try:
        return decode_image(value)
    except Exception as e:  # PIL raises several kinds on junk
        raise ConfigError(f"edit source {where} does not decode as an image: {e}") from e

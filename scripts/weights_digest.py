"""Print a digest of the tensors in every `final/` safetensors file of some run folders.

Why not sha256 of the files: safetensors writes its metadata map in no fixed order, so two
files with bitwise-equal tensors can differ in bytes. Used to check that a change to the code
leaves what is trained bitwise unchanged (`scripts/fixed_step_runs.sh`).

Usage: python scripts/weights_digest.py RUNS_ROOT [RUNS_ROOT ...]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def digest(path: Path) -> str:
    """sha256 over the sorted tensor names and their raw bytes."""
    tensors, h = load_file(path), hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path)
    for root in ap.parse_args().roots:
        for path in sorted(root.glob("*/final/**/*.safetensors")):
            print(digest(path)[:16], path.relative_to(root))


if __name__ == "__main__":
    main()

"""The real CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.

CLIP's vocabulary is the 256 byte-characters, the same with the end-of-word marker `</w>`, the
first 49,152 - 256 merges, then `<|startoftext|>` and `<|endoftext|>`: 49,408 tokens, exactly
the ids Stable Diffusion's tokenizer gives. The toy text encoder therefore reads prompts the way
SD's does, only with a shorter maximum length.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

VOCAB_SIZE = 49408


def build_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A transformers CLIPTokenizer equal to openai/clip-vit-large-patch14's, up to max length."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=model_max_length,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )

"""Where data and models come from: a local path or a Hugging Face Hub name.

Why a module of its own: the config checks need the rule (a hub dataset is streamed by default)
without importing torch, and every reader of a hub dataset needs the same fast check. Without
it, `datasets` retries an unreachable Hub for about 26 seconds and prints each retry before its
error, which does not say that local files work too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from spo.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# How long the Hub check waits for an answer: long enough for a slow link, short enough that an
# unreachable Hub fails in seconds.
HUB_TIMEOUT_S = 5.0

# What every hub-dataset error suggests instead.
LOCAL_FORMS = (
    "give a local copy instead: parquet files (a file, a folder of them or a glob such as "
    "/data/pickapic_v1/data/train-*.parquet), a folder laid out like the Hub repository, or a "
    "save_to_disk folder (docs/data.md)"
)


def read_text(path: str | Path | Traversable, what: str = "file") -> str:
    """A text file's content, read as UTF-8 (a leading byte-order mark dropped): every text
    file a command reads (prompts, captions, configs) comes through here, so undecodable bytes
    are one line naming the file, line and column rather than a UnicodeDecodeError."""
    data = Path(path).read_bytes() if isinstance(path, str) else path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{what} {path}: line {line}, column {column} is not UTF-8 text (byte "
            f"0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def is_local_path(source: str) -> bool:
    """A path-like source (absolute, relative with a separator, or existing) rather than a hub
    name such as `org/model`: hub names have exactly one slash and no leading dot."""
    if Path(source).exists() or source.startswith((".", "/", "~")):
        return True
    return source.count("/") != 1


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set to a true value, read from the
    environment (no library import: the config checks use it)."""
    values = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in values)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or datasets' own HF_DATASETS_OFFLINE) is set: the Hub is not asked."""
    import datasets
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def check_hub_dataset(name: str, what: str) -> None:
    """One line within about HUB_TIMEOUT_S seconds when the Hub cannot serve dataset `name`
    (unreachable, no such dataset, gated), naming the local forms that work instead. In offline
    mode nothing is asked: `datasets` then reads its cache, or fails at once."""
    if hub_offline():
        return
    _ask_hub(
        "dataset",
        name,
        what,
        LOCAL_FORMS,
        gone="removed, private or misspelt; yuvalkirstain/pickapic_v2 was removed in 2025",
        cache_hint="read what the datasets cache holds",
    )


def check_hub_model(name: str, what: str, file: str = "model_index.json") -> None:
    """The same fast one-line check for a model named like a Hub repository (`org/name`), made
    before any run folder exists: a model whose `file` is in the local Hugging Face cache
    passes at once; otherwise offline mode, an unreachable Hub, a missing or gated repository
    are one line naming the local form that works instead."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, file), str):
        return
    local = "give a local diffusers folder instead (save_pretrained / a downloaded snapshot)"
    if offline_requested() or _hub_constants_offline():
        raise ConfigError(
            f"{what} {name}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
            f"{local}"
        )
    _ask_hub("model", name, what, local, gone="private or misspelt", cache_hint="use the cache")


def _hub_constants_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _ask_hub(kind: str, name: str, what: str, local: str, *, gone: str, cache_hint: str) -> None:
    """Ask the Hub about repository `name` (a `kind`: model or dataset) with a short timeout;
    one line for each way it cannot serve it, naming `local` forms instead."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    info = HfApi().dataset_info if kind == "dataset" else HfApi().model_info
    try:
        info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(
            f"{what} {name}: a gated {kind}; accept its terms on the Hub and log in "
            f"(`hf auth login`), or {local}"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{what} {name}: no such {kind} on the Hugging Face Hub ({gone}); {local}"
        ) from None
    except Exception as e:  # httpx / OS errors of every kind: the Hub is out of reach
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ConfigError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) for {what} {name}: "
            f"{reason}; {local}; or set HF_HUB_OFFLINE=1 to {cache_hint}"
        ) from None

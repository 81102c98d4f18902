"""Where data and models come from: a local path or a Hugging Face Hub name.

Why a module of its own: the config checks need the rule (a hub dataset is streamed by default)
without importing torch, and every reader of a hub dataset needs the same fast check. Without
it, `datasets` retries an unreachable Hub for about 26 seconds and prints each retry before its
error, which does not say that local files work too.
"""

from __future__ import annotations

import os
from pathlib import Path

from spo.errors import ConfigError

# How long the Hub check waits for an answer: long enough for a slow link, short enough that an
# unreachable Hub fails in seconds.
HUB_TIMEOUT_S = 5.0

# What every hub-dataset error suggests instead.
LOCAL_FORMS = (
    "give a local copy instead: parquet files (a file, a folder of them or a glob such as "
    "/data/pickapic_v1/data/train-*.parquet), a folder laid out like the Hub repository, or a "
    "save_to_disk folder (docs/data.md)"
)


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
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(
            f"{what} {name}: a gated dataset; accept its terms on the Hub and log in "
            f"(`hf auth login`), or {LOCAL_FORMS}"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{what} {name}: no such dataset on the Hugging Face Hub (removed, private or "
            f"misspelt; yuvalkirstain/pickapic_v2 was removed in 2025); {LOCAL_FORMS}"
        ) from None
    except Exception as e:  # httpx / OS errors of every kind: the Hub is out of reach
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ConfigError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) for {what} {name}: "
            f"{reason}; {LOCAL_FORMS}; or set HF_HUB_OFFLINE=1 to read what the datasets cache "
            "holds"
        ) from None

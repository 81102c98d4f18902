"""SPO: step-aware preference optimisation for diffusers text-to-image models.

One installable package with the `spo` command: train a step-aware preference model, fine-tune
a diffusion model with SPO or the Diffusion-DPO baseline, compare models, and run the whole story
on a built-in toy world that needs no downloads and no GPU.
"""

__version__ = "0.1.0"

# The Python API (spo/api.py), imported on first use so that `import spo` stays light.
_API = ("compare", "load_config", "train_dpo", "train_preference_model", "train_spo")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from spo import api

        return getattr(api, name)
    raise AttributeError(f"module 'spo' has no attribute {name!r}")

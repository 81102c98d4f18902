"""SPO: step-aware preference optimisation for diffusers text-to-image models.

One installable package with the `spo` command: train a step-aware preference model, fine-tune
a diffusion model with SPO or the Diffusion-DPO baseline, compare models, and run the whole story
on a built-in toy world that needs no downloads and no GPU.
"""

__version__ = "0.1.0"

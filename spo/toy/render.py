"""The toy world's renderer: "a {colour} {shape} on a {background} background" at a hidden quality.

Quality q in [0, 1] sets the severity d = 1 - q of defects that a 4x-downsampling VAE keeps
(per-pixel speckle and mild blur do not survive its round trip, so they are not used):
off-centre placement (with partial cropping when far off), wrong (too small) size, clutter
objects, coarse background blotches, strong blur and washed-out (desaturated) colour.
Every defect's magnitude is d times a random factor in [0.6, 1], so quality orders images
reliably while no two renders are alike.
"""

from __future__ import annotations

import colorsys
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64
SUPERSAMPLE = 4
NOMINAL_RADIUS = 0.22 * SIZE  # half the side of a perfect object's bounding box, in pixels

# Object colours are far apart in hue so that hue identifies them even when washed out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 205, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 55, 200),
    "pink": (235, 60, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "teal": (0, 120, 120),
}


@dataclass(frozen=True)
class Prompt:
    colour: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """Inverse of `text`; raises ValueError naming the prompt when it is not a toy prompt."""
        words = text.strip().lower().split()
        ok = (
            len(words) == 7
            and words[0] == "a"
            and words[3:5] == ["on", "a"]
            and words[6] == "background"
            and words[1] in COLOURS
            and words[2] in SHAPES
            and words[5] in BACKGROUNDS
        )
        if not ok:
            raise ValueError(f"not a toy-world prompt: {text!r}")
        return cls(words[1], words[2], words[5])


def all_prompts() -> list[Prompt]:
    return [Prompt(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)]


def split_prompts() -> tuple[list[Prompt], list[Prompt]]:
    """Train / eval split by combination: eval holds 16 (colour, shape, background) combinations
    never in train, one per (shape, background), so every single word still appears in train."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    train, held_out = [], []
    for p in all_prompts():
        c, s, b = colours.index(p.colour), SHAPES.index(p.shape), backgrounds.index(p.background)
        (held_out if (c + 2 * s + b) % len(colours) == 0 else train).append(p)
    return train, held_out


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape in a 2r x 2r box centred at (cx, cy); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        a = r / 3.0
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Binary mask of a shape filling a size x size box (the oracle's template)."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    draw_shape(ImageDraw.Draw(img), shape, size * s / 2, size * s / 2, size * s / 2, 255)
    return np.asarray(img.resize((size, size), Image.BOX)) >= 128


def _desaturate(rgb: np.ndarray, amount: float) -> np.ndarray:
    """Move a colour toward its own grey by `amount` (hue kept, saturation reduced)."""
    h, s, v = colorsys.rgb_to_hsv(*(rgb / 255.0))
    return np.array(colorsys.hsv_to_rgb(h, s * (1.0 - amount), v)) * 255.0


def render(
    prompt: Prompt, quality: float, rng: np.random.Generator, scale: float = 1.0
) -> np.ndarray:
    """Draw `prompt` at `quality` in [0, 1], the object `scale` times its size (1: the nominal
    size less its defect; the two-group world's matter of taste); returns a (SIZE, SIZE, 3)
    uint8 array."""
    d = 1.0 - float(np.clip(quality, 0.0, 1.0))

    def mag() -> float:
        return d * rng.uniform(0.6, 1.0)

    s = SUPERSAMPLE
    bg = np.array(BACKGROUNDS[prompt.background], dtype=np.float64)
    obj = _desaturate(np.array(COLOURS[prompt.colour], dtype=np.float64), 0.75 * mag())
    img = Image.new("RGB", (SIZE * s, SIZE * s), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)

    r = NOMINAL_RADIUS * (1.0 - 0.5 * mag()) * scale
    angle = rng.uniform(0, 2 * np.pi)
    offset = 0.34 * SIZE * mag()
    cx, cy = SIZE / 2 + offset * np.cos(angle), SIZE / 2 + offset * np.sin(angle)

    # Clutter: small objects of other colours, kept away from the main object.
    n_clutter = int(6.0 * mag() + rng.uniform(0, 0.999))
    others = [c for c in COLOURS if c != prompt.colour]
    for _ in range(n_clutter):
        for _attempt in range(20):
            x, y = rng.uniform(2, SIZE - 2, size=2)
            if np.hypot(x - cx, y - cy) > r + 0.11 * SIZE:
                break
        colour = tuple(int(v) for v in COLOURS[others[rng.integers(len(others))]])
        draw_shape(
            draw,
            SHAPES[rng.integers(len(SHAPES))],
            x * s,
            y * s,
            rng.uniform(0.04, 0.07) * SIZE * s,
            colour,
        )

    draw_shape(draw, prompt.shape, cx * s, cy * s, r * s, tuple(int(v) for v in obj))
    arr = np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.float64)

    # Coarse blotches: a smooth random field added to the background only.
    amp = 55.0 * mag()
    if amp > 0:
        field = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), SIZE / 12)
        field /= field.std() + 1e-8
        background_px = np.linalg.norm(arr - bg, axis=-1) < 1.0
        arr += (amp * field)[..., None] * background_px[..., None] * np.array([1.0, 0.9, 0.8])

    # Strong blur only: mild blur does not survive the VAE.
    sigma = 0.05 * SIZE * mag() if d > 0.15 else 0.0
    if sigma > 0.25:
        arr = ndimage.gaussian_filter(arr, sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


LAYOUT_BLOCK = 8  # pixels per side of a colour layout's blocks (8 x 8 blocks at 64 px)


def colour_layout(
    prompt: Prompt, rng: np.random.Generator, block: int = LAYOUT_BLOCK
) -> np.ndarray:
    """A coarse colour layout of `prompt` (the SDEdit paper's stroke inputs, which the
    Diffusion-DPO paper edits): a render at a random quality in [0.3, 0.9] (so the object is
    somewhere, of some size, maybe among clutter) with each `block` x `block` square replaced
    by its mean colour. Returns (SIZE, SIZE, 3) uint8."""
    image = render(prompt, rng.uniform(0.3, 0.9), rng).astype(np.float64)
    n = SIZE // block
    means = image.reshape(n, block, n, block, 3).mean(axis=(1, 3))
    blocks = np.repeat(np.repeat(means, block, axis=0), block, axis=1)
    return np.clip(np.rint(blocks), 0, 255).astype(np.uint8)

"""The toy world's oracle reward R(image, prompt): the ground truth that plays the human.

R is computed from pixels alone, so it judges renders, VAE round trips and generated samples
alike. It is a weighted sum of seven terms, each in [0, 1], so R is in [0, 1]:

alignment (does the image show the prompt?)
  colour      0.20  hue of the main object near the prompted hue (gated by saturation)
  shape       0.10  IoU of the main object's mask, scaled to its bounding box, with the prompted
                    shape's template
  background  0.10  border colour near the prompted background colour
aesthetics (is it a good picture?)
  sharpness   0.05  steepest edge relative to the object/background contrast (low weight: the
                    toy VAE does not keep blur, so no generator can control it; measured in
                    docs/toy-world.md)
  clean       0.20  how little the background deviates from its own colour (clutter, blotches)
  framing     0.20  object centred, of the nominal size, not cropped by the border
  contrast    0.15  saturation of the object relative to the pure prompted colour

The main object is the largest connected region of pixels far from the border colour.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from spo.toy.render import (
    BACKGROUNDS,
    COLOURS,
    NOMINAL_RADIUS,
    SHAPES,
    SIZE,
    Prompt,
    shape_mask,
)

WEIGHTS = {
    "colour": 0.20,
    "shape": 0.10,
    "background": 0.10,
    "sharpness": 0.05,
    "clean": 0.20,
    "framing": 0.20,
    "contrast": 0.15,
}
OBJECT_THRESHOLD = 70.0  # RGB distance from the border colour that makes a pixel "object"
TEMPLATE = 24
_TEMPLATES = {s: shape_mask(s, TEMPLATE) for s in SHAPES}
_HUES = {c: colorsys.rgb_to_hsv(*(np.array(v) / 255.0))[0] * 360.0 for c, v in COLOURS.items()}
_SATS = {c: colorsys.rgb_to_hsv(*(np.array(v) / 255.0))[1] for c, v in COLOURS.items()}


@dataclass(kw_only=True)
class OracleReport:
    """Every term of R for one image, plus what the oracle recognised in it."""

    colour: float
    shape: float
    background: float
    sharpness: float
    clean: float
    framing: float
    contrast: float
    seen_colour: str | None
    seen_shape: str | None
    seen_background: str
    extent: float = 0.0  # the main object's bounding box over the nominal one (0: none seen)

    @property
    def alignment(self) -> float:
        return sum(WEIGHTS[k] * getattr(self, k) for k in ("colour", "shape", "background"))

    @property
    def aesthetic(self) -> float:
        return sum(
            WEIGHTS[k] * getattr(self, k) for k in ("sharpness", "clean", "framing", "contrast")
        )

    @property
    def reward(self) -> float:
        return self.alignment + self.aesthetic

    def as_dict(self) -> dict[str, float | str | None]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(alignment=self.alignment, aesthetic=self.aesthetic, reward=self.reward)
        return out


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def _to_array(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max() <= 1.0 else arr
    arr = arr.astype(np.float64)
    if arr.shape[:2] != (SIZE, SIZE):
        from PIL import Image

        arr = np.asarray(
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize(
                (SIZE, SIZE), Image.BILINEAR
            ),
            dtype=np.float64,
        )
    return arr


def evaluate(image, prompt: Prompt | str) -> OracleReport:
    """All terms of R for one RGB image (uint8 HxWx3 or floats in [0, 1]), resized to SIZE."""
    if isinstance(prompt, str):
        prompt = Prompt.parse(prompt)
    arr = _to_array(image)
    bg = _border_colour(arr)
    bg_dist = {name: float(np.linalg.norm(bg - np.array(v))) for name, v in BACKGROUNDS.items()}
    seen_background = min(bg_dist, key=bg_dist.get)
    background = float(np.exp(-((bg_dist[prompt.background] / 45.0) ** 2)))

    diff = np.linalg.norm(arr - bg, axis=-1)
    labels, n = ndimage.label(diff > OBJECT_THRESHOLD)
    if n == 0:
        return OracleReport(
            colour=0.0,
            shape=0.0,
            background=background,
            sharpness=0.0,
            clean=_clean(diff, np.zeros_like(diff, bool)),
            framing=0.0,
            contrast=0.0,
            seen_colour=None,
            seen_shape=None,
            seen_background=seen_background,
        )
    sizes = ndimage.sum_labels(np.ones_like(diff), labels, index=np.arange(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    area = int(mask.sum())

    # Colour: median of the object's inner pixels, judged by hue, gated by saturation.
    inner = ndimage.binary_erosion(mask) if area > 20 else mask
    inner = inner if inner.any() else mask
    rgb = np.median(arr[inner], axis=0) / 255.0
    hue, sat, _ = colorsys.rgb_to_hsv(*rgb)
    hue *= 360.0
    gate = float(np.clip(sat / 0.25, 0.0, 1.0))
    hue_dist = {c: _hue_distance(hue, h) for c, h in _HUES.items()}
    seen_colour = min(hue_dist, key=hue_dist.get) if sat > 0.12 else None
    colour = gate * float(np.exp(-((hue_dist[prompt.colour] / 22.0) ** 2)))
    contrast = float(np.clip(sat / _SATS[prompt.colour], 0.0, 1.0))

    # Shape: the mask cropped to its bounding box against each template.
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)
    zoom = (TEMPLATE / box.shape[0], TEMPLATE / box.shape[1])
    scaled = ndimage.zoom(box, zoom, order=1)[:TEMPLATE, :TEMPLATE] >= 0.5
    ious = {}
    for s, t in _TEMPLATES.items():
        pad = np.zeros_like(t)
        pad[: scaled.shape[0], : scaled.shape[1]] = scaled
        ious[s] = float((pad & t).sum() / max((pad | t).sum(), 1))
    seen_shape = max(ious, key=ious.get)
    shape = float(np.clip((ious[prompt.shape] - 0.45) / 0.5, 0.0, 1.0))

    # Sharpness: the steepest edges (95th percentile of the object's boundary gradient)
    # relative to the object/background contrast; a crisp edge rises over about one pixel.
    grad = (
        np.sqrt(sum(ndimage.sobel(arr[..., c], axis=a) ** 2 for c in range(3) for a in (0, 1)))
        / 8.0
    )
    edge = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    step = max(float(np.linalg.norm(np.median(arr[inner], axis=0) - bg)), 1.0)
    steep = float(np.percentile(grad[edge], 95)) / step
    sharpness = float(np.clip((steep - 0.2) / 0.35, 0.0, 1.0))

    # Framing: centred, nominal size, not touching the border.
    cy, cx = ys.mean(), xs.mean()
    off = float(np.hypot(cx - (SIZE - 1) / 2, cy - (SIZE - 1) / 2)) / (SIZE / 2)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / (2 * NOMINAL_RADIUS)
    touches = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    framing = float(np.clip(1.0 - 1.6 * off, 0, 1) * np.clip(1.0 - 1.5 * abs(1.0 - extent), 0, 1))
    framing *= 0.5 if touches else 1.0

    return OracleReport(
        colour=colour,
        shape=shape,
        background=background,
        sharpness=sharpness,
        clean=_clean(diff, mask),
        framing=framing,
        contrast=contrast,
        seen_colour=seen_colour,
        seen_shape=seen_shape,
        seen_background=seen_background,
        extent=float(extent),
    )


def _border_colour(arr: np.ndarray) -> np.ndarray:
    """The median colour of the image's 2-pixel border: the background as the oracle sees it."""
    border = np.concatenate(
        [
            arr[:2].reshape(-1, 3),
            arr[-2:].reshape(-1, 3),
            arr[:, :2].reshape(-1, 3),
            arr[:, -2:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def _clean(diff: np.ndarray, mask: np.ndarray) -> float:
    """1 for a flat background; falls as clutter and blotches deviate from the border colour."""
    rest = ~ndimage.binary_dilation(mask, iterations=2)
    if not rest.any():
        return 0.0
    return float(np.clip(1.0 - np.mean(np.minimum(diff[rest], 80.0)) / 45.0, 0.0, 1.0))


def reward(image, prompt: Prompt | str) -> float:
    """R(image, prompt) in [0, 1]."""
    return evaluate(image, prompt).reward


def rewards(images, prompts) -> np.ndarray:
    """R for a batch: images (N, H, W, 3) uint8 or an iterable of images; prompts one per image."""
    return np.array([reward(im, p) for im, p in zip(images, prompts, strict=True)])


def recognition_rates(reports: list[OracleReport], prompts: list[Prompt]) -> dict[str, float]:
    """Share of images in which the oracle sees the prompted colour, shape and background."""
    pairs = list(zip(reports, prompts, strict=True))
    return {
        "colour_right": float(np.mean([r.seen_colour == p.colour for r, p in pairs])),
        "shape_right": float(np.mean([r.seen_shape == p.shape for r, p in pairs])),
        "background_right": float(np.mean([r.seen_background == p.background for r, p in pairs])),
    }


# The two-group world: two annotator groups that agree on R (the object, its background, a good
# picture) and differ in taste: one likes the object large, the other small (its extent, which
# the toy VAE keeps: framing is one of R's terms it reproduces, docs/toy-world.md)
GROUPS = ("large", "small")
TASTE_WEIGHT = 0.2


def size_taste(extent: float, group: str) -> float:
    """How much `group` likes an object of `extent` (its bounding box over the nominal one), in
    [0, 1]: the large group's rises from extent 0.6 to 1.4, the small group's falls over it."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
    large = float(np.clip((extent - 0.6) / 0.8, 0.0, 1.0))
    return large if group == "large" else 1.0 - large


def group_reward(image, prompt: Prompt | str, group: str) -> float:
    """Group `group`'s oracle in [0, 1]: (1 - TASTE_WEIGHT) R + TASTE_WEIGHT size_taste."""
    report = evaluate(image, prompt)
    return (1 - TASTE_WEIGHT) * report.reward + TASTE_WEIGHT * size_taste(report.extent, group)

"""What a painted defect must agree with to look like part of its image, measured on the image.

Fixed absolute amplitudes ("darken by 30 grey levels") look right on one product and wrong on the
next: a dark, low-contrast tile needs subtler defects than a bright, high-contrast print, and a
void behind a broken edge is darker than the darkest surface pixel of *that* image, not a fixed
grey. So the classical recipes read their amplitudes from the image itself (`Appearance.of`): its
intensity range, the amplitude of its fine texture, and the direction its light comes from.
Nothing here is fitted to a data set; every figure is a statistic of the one image being painted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Below this intensity spread (grey levels, p98 - p2) an image is treated as flat: a defect on a
# blank surface must still be visible, so amplitudes never shrink below what this spread gives.
MIN_SPREAD = 32.0
# The low-frequency shading whose gradient gives the light's direction: blurred at this share of
# the image's shorter side, so texture does not count, only the illumination across the part.
SHADING_SCALE = 0.125
# A shading gradient weaker than this share of the spread across the image is no direction at all.
MIN_SHADING = 0.05
TEXTURE_SIGMA = 2.0  # px: the fine texture is what a blur of this width removes


@dataclass(frozen=True)
class Appearance:
    """Intensity statistics of one image (grey levels, 0-255) and its light direction."""

    low: float  # 2nd percentile of the luminance
    mid: float  # median
    high: float  # 98th percentile
    grain: float  # standard deviation of the fine texture (the image minus its blur)
    light: float | None  # angle (radians, x right, y down) the light comes from; None when flat

    @property
    def spread(self) -> float:
        """The image's contrast unit: p98 - p2, never below MIN_SPREAD."""
        return max(self.high - self.low, MIN_SPREAD)

    @classmethod
    def of(cls, image: np.ndarray) -> "Appearance":
        """Measure an (H, W, 3) uint8 image."""
        luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        low, mid, high = (float(v) for v in np.percentile(luma, (2, 50, 98)))
        grain = float((luma - cv2.GaussianBlur(luma, (0, 0), TEXTURE_SIGMA)).std())
        return cls(low, mid, high, grain, _light_direction(luma, max(high - low, MIN_SPREAD)))

    def light_angle(self, rng: np.random.Generator) -> float:
        """The light's direction with a little jitter (a random one on a flat image): rims and
        highlights then face the way the image's own shading does."""
        if self.light is None:
            return float(rng.uniform(0, 2 * np.pi))
        return self.light + float(rng.normal(0.0, 0.35))


def _light_direction(luma: np.ndarray, spread: float) -> float | None:
    """The mean gradient of the image's shading points towards the light (brighter side)."""
    sigma = SHADING_SCALE * min(luma.shape)
    shading = cv2.GaussianBlur(luma, (0, 0), sigma)
    gy, gx = np.gradient(shading)
    mean_x, mean_y = float(gx.mean()), float(gy.mean())
    # the gradient's change across the whole image, in units of the image's spread
    if math.hypot(mean_x, mean_y) * max(luma.shape) < MIN_SHADING * spread:
        return None
    return math.atan2(mean_y, mean_x)


def own_texture(image: np.ndarray, box: tuple[slice, slice], rng: np.random.Generator) -> np.ndarray:
    """A unit-variance field of the image's own fine texture, the size of `box`, taken from another
    place of the image (a wrapping shift of a quarter to three quarters of each side) and flipped,
    so it is the material's texture but not the very texture it covers."""
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    fine = luma - cv2.GaussianBlur(luma, (0, 0), TEXTURE_SIGMA)
    h, w = luma.shape
    dy, dx = int(rng.integers(h // 4, 3 * h // 4 + 1)), int(rng.integers(w // 4, 3 * w // 4 + 1))
    patch = np.roll(fine, (dy, dx), axis=(0, 1))[box][:: int(rng.choice((-1, 1))), :: int(rng.choice((-1, 1)))]
    return (patch / max(float(patch.std()), 1e-6)).astype(np.float32)

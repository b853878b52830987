"""The classical painting backend: procedural defects and pasted-defect blends, no weights.

Zero-shot, a recipe paints one kind of defect inside the mask (`RECIPES`, pure functions
`recipe(image, mask, strength, rng) -> image`); few-shot, the real defect already pasted into the
reference is blended into the normal image several ways and the caller keeps the candidate closest
to the reference (`synthesis.selection.ReferenceSSIMScorer`).

Every candidate goes through one final composite, `np.where(mask, painted, image)`, so pixels
outside the mask are exactly the source whatever a recipe did there. Recipes work in float32 on the
mask's bounding box only, which keeps a 256 px image well under 20 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import cv2
import numpy as np

from core.errors import InputError
from synthesis.backends.base import Candidate, PaintRequest
from synthesis.noise import fractal_noise
from synthesis.seeding import numpy_rng

Recipe = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------- geometry shared by the recipes


@dataclass(frozen=True)
class _Region:
    """The mask's bounding box (plus `pad`) and the float views the recipes paint on."""

    box: tuple[slice, slice]
    image: np.ndarray  # (h, w, 3) float32 crop of the image
    mask: np.ndarray  # (h, w) bool crop of the mask
    depth: np.ndarray  # (h, w) float32: distance to the mask border, 1 at the deepest pixel

    @classmethod
    def of(cls, image: np.ndarray, mask: np.ndarray, pad: int = 2) -> "_Region":
        ys, xs = np.nonzero(mask)
        h, w = mask.shape
        box = (
            slice(max(0, ys.min() - pad), min(h, ys.max() + pad + 1)),
            slice(max(0, xs.min() - pad), min(w, xs.max() + pad + 1)),
        )
        crop_mask = mask[box]
        dist = _distance_inside(crop_mask)
        return cls(box, image[box].astype(np.float32), crop_mask, dist / max(float(dist.max()), 1e-6))

    def paste(self, image: np.ndarray, painted_crop: np.ndarray) -> np.ndarray:
        """The full image with the painted crop put back (outside pixels are dropped later anyway)."""
        out = image.copy()
        out[self.box] = np.clip(np.rint(painted_crop), 0, 255).astype(np.uint8)
        return out

    def noise(self, rng: np.random.Generator, cells: int, octaves: int = 3) -> np.ndarray:
        """Fractal noise in [-0.5, 0.5] over the crop."""
        return fractal_noise(self.mask.shape, cells, rng, octaves) - 0.5

    def light_side(self, rng: np.random.Generator) -> np.ndarray:
        """Where the mask's walls face a random light direction, in [0, 1] (for rim highlights)."""
        angle = rng.uniform(0, 2 * np.pi)
        gx = cv2.Sobel(self.depth, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(self.depth, cv2.CV_32F, 0, 1, ksize=3)
        facing = np.clip(-(gx * np.cos(angle) + gy * np.sin(angle)), 0, None)
        return facing / max(float(facing.max()), 1e-6)


def _distance_inside(mask: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)


def _is_gray(image: np.ndarray) -> bool:
    """Grayscale photos stored as RGB get no colour tint (a tint would give the defect away)."""
    return bool(np.abs(image[..., 0].astype(np.int16) - image[..., 2]).mean() < 2.0)


def _sign(rng: np.random.Generator) -> float:
    return float(rng.choice((-1.0, 1.0)))


# ---------------------------------------------------------------- recipes


def texture(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A foreign procedural texture: contrasty fractal noise plus an offset of random sign."""
    region = _Region.of(image, mask)
    pattern = region.noise(rng, cells=int(rng.integers(2, 6)))
    amplitude = strength * rng.uniform(120, 200)
    offset = strength * _sign(rng) * rng.uniform(15, 40)
    delta = amplitude * pattern + offset
    return region.paste(image, region.image + delta[..., None])


def _pit(
    image: np.ndarray,
    mask: np.ndarray,
    strength: float,
    rng: np.random.Generator,
    darkness: tuple[float, float],
    steepness: tuple[float, float],
) -> np.ndarray:
    """A dark pit: darkest at the centre, shading with the distance to the rim, a lit wall."""
    region = _Region.of(image, mask)
    depth = region.depth ** rng.uniform(*steepness)
    dark = strength * rng.uniform(*darkness) * depth
    grain = 1.0 + 0.15 * region.noise(rng, cells=4, octaves=2)
    rim = strength * 40.0 * region.light_side(rng) * (1.0 - depth)
    painted = region.image * (1.0 - dark * grain)[..., None] - (25.0 * dark - rim)[..., None]
    return region.paste(image, painted)


def bright_spot(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A bright blob, brightest at the centre (reflective particle, burn)."""
    region = _Region.of(image, mask)
    lift = strength * rng.uniform(0.5, 0.9) * region.depth ** rng.uniform(0.4, 1.0)
    painted = region.image + ((255.0 - region.image) * lift[..., None]) + 20.0 * lift[..., None]
    return region.paste(image, painted)


def _stroke(
    image: np.ndarray,
    mask: np.ndarray,
    strength: float,
    rng: np.random.Generator,
    darkness: tuple[float, float],
    irregularity: float,
    highlight: float,
) -> np.ndarray:
    """A line defect along the mask: dark core on its centre line, one lit edge, broken-up length."""
    region = _Region.of(image, mask)
    dist = _distance_inside(region.mask)
    # Normalising by the local maximum puts the core on the skeleton however the width varies.
    reach = 2 * int(np.ceil(dist.max())) + 1
    local_max = cv2.dilate(dist, np.ones((reach, reach), np.uint8))
    core = np.where(region.mask, dist / np.maximum(local_max, 1e-6), 0.0).astype(np.float32)
    along = 1.0 + irregularity * 2.0 * region.noise(rng, cells=int(rng.integers(3, 8)), octaves=2)
    dark = strength * rng.uniform(*darkness) * core * np.clip(along, 0.0, 1.5)
    edge = strength * highlight * region.light_side(rng) * (1.0 - core)
    painted = region.image * (1.0 - dark)[..., None] - (30.0 * dark - edge)[..., None]
    return region.paste(image, painted)


def chip(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Missing material (a break, a chipped edge): the dark void behind the surface, a rough
    fracture texture in it and a bright broken rim on the lit side."""
    region = _Region.of(image, mask)
    void = rng.uniform(5.0, 35.0)  # the gap shows what lies behind: nearly black
    fracture = void + 60.0 * strength * region.noise(rng, cells=int(rng.integers(3, 7)))
    # the void deepens away from the rim, so the broken face keeps some of the surface's light
    depth = np.clip(region.depth * rng.uniform(2.0, 4.0), 0.0, 1.0)[..., None]
    keep = 1.0 - min(1.0, 0.4 + strength)
    painted = region.image * keep + (1.0 - keep) * ((1.0 - depth) * region.image * 0.5 + depth * fracture[..., None])
    rim = strength * rng.uniform(40.0, 90.0) * region.light_side(rng) * (1.0 - depth[..., 0])
    return region.paste(image, painted + rim[..., None])


def fray(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A frayed, rough area: fine high-contrast grain and streaks along one direction, lighter or
    darker than the surface, with a dark ragged border where the texture tears off."""
    region = _Region.of(image, mask)
    grain = region.noise(rng, cells=int(rng.integers(8, 16)), octaves=3)
    streaks = cv2.GaussianBlur(rng.normal(0.0, 1.0, region.mask.shape).astype(np.float32), (0, 0),
                               sigmaX=float(rng.uniform(0.5, 1.5)), sigmaY=float(rng.uniform(4.0, 10.0)))
    streaks /= max(float(np.abs(streaks).max()), 1e-6)
    tone = _sign(rng) * strength * rng.uniform(20.0, 60.0)
    border = strength * 70.0 * np.clip(1.0 - region.depth * 6.0, 0.0, 1.0)
    delta = strength * rng.uniform(80.0, 140.0) * (0.6 * grain + 0.4 * streaks) + tone - border
    return region.paste(image, region.image + delta[..., None])


def shift(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth intensity (and, on colour images, hue) shift: stains, uneven surfaces."""
    region = _Region.of(image, mask)
    field = 0.7 + 0.6 * region.noise(rng, cells=int(rng.integers(1, 3)), octaves=2)
    gain = _sign(rng) * strength * rng.uniform(0.3, 0.6) * field
    painted = region.image * (1.0 + gain)[..., None] + (40.0 * gain)[..., None]
    if not _is_gray(image):
        tint = rng.normal(0.0, 1.0, 3)
        painted += strength * 40.0 * field[..., None] * (tint / np.linalg.norm(tint))
    return region.paste(image, painted)


def smear(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A streak: the surface motion-blurred along a random direction, slightly lighter or darker."""
    length = 3 + 2 * int(round(strength * 10))
    region = _Region.of(image, mask, pad=length)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length))
    streak = cv2.filter2D(region.image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)
    tone = 1.0 + _sign(rng) * strength * rng.uniform(0.2, 0.4)
    return region.paste(image, streak * tone)


def cut_paste(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A patch of another place of the same image, flipped and re-toned (misplaced material)."""
    region = _Region.of(image, mask)
    h, w = mask.shape
    # Wrapping shifts of a quarter to three quarters of the image keep the source away from the box.
    dy, dx = int(rng.integers(h // 4, 3 * h // 4 + 1)), int(rng.integers(w // 4, 3 * w // 4 + 1))
    source = np.roll(image, (dy, dx), axis=(0, 1))[region.box].astype(np.float32)
    source = source[:: int(rng.choice((-1, 1))), :: int(rng.choice((-1, 1)))]
    source *= 1.0 + _sign(rng) * rng.uniform(0.1, 0.3)
    mix = min(1.0, 0.3 + strength)
    return region.paste(image, region.image + mix * (source - region.image))


# what a type whose name no keyword knows is painted with: one of these per image, so its synthetic
# rows teach "something unlike this surface" rather than one procedural look
MIX = ("texture", "dark_spot", "bright_spot", "chip", "fray", "shift", "smear", "cut_paste")


def mix(image: np.ndarray, mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A varied generic defect: one of the `MIX` recipes, drawn per call."""
    return RECIPES[MIX[int(rng.integers(len(MIX)))]](image, mask, strength, rng)


RECIPES: dict[str, Recipe] = {
    "texture": texture,
    "dark_spot": partial(_pit, darkness=(0.5, 0.8), steepness=(0.6, 1.2)),
    "hole": partial(_pit, darkness=(0.75, 0.95), steepness=(0.3, 0.6)),
    "bright_spot": bright_spot,
    "crack": partial(_stroke, darkness=(0.7, 0.95), irregularity=0.5, highlight=25.0),
    "scratch": partial(_stroke, darkness=(0.35, 0.6), irregularity=0.25, highlight=45.0),
    "chip": chip,
    "fray": fray,
    "shift": shift,
    "smear": smear,
    "cut_paste": cut_paste,
    "mix": mix,
}

# First match wins: "bright spot" must reach bright_spot before "spot" reaches dark_spot.
_KEYWORDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("bright", "white", "glare"), "bright_spot"),
    (("break", "broken", "chip", "missing"), "chip"),
    (("fray", "rough", "frazzle"), "fray"),
    (("crack",), "crack"),
    (("scratch", "line", "scrape"), "scratch"),
    (("hole", "pit", "pore"), "hole"),
    (("spot", "dot", "speck"), "dark_spot"),
    (("stain", "uneven", "color", "colour", "contamination", "discolo"), "shift"),
    (("smear", "blur", "streak"), "smear"),
    (("misplaced", "foreign", "extra"), "cut_paste"),
)


def default_recipe_for(anomaly_type: str) -> str:
    """The recipe an anomaly type gets when params.yaml names none, by keyword of its name."""
    name = anomaly_type.lower()
    for keywords, recipe in _KEYWORDS:
        if any(word in name for word in keywords):
            return recipe
    return "mix"


def feathered_composite(
    image: np.ndarray, painted: np.ndarray, mask: np.ndarray, width: float | None = None
) -> np.ndarray:
    """`painted` blended in with an alpha ramping up from the mask border; outside = `image` exactly.

    The default width follows the mask's thickness, so a thin stroke keeps its full contrast while
    a large blob fades in over a few pixels.
    """
    dist = _distance_inside(mask)
    if width is None:
        width = float(np.clip(0.3 * dist.max(), 1.0, 6.0))
    alpha = np.clip(dist / max(width, 1e-6), 0.0, 1.0)[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + painted.astype(np.float32) * alpha
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], blended, image)


# ---------------------------------------------------------------- few-shot blends


def _seamless(reference: np.ndarray, image: np.ndarray, mask: np.ndarray, mode: int) -> np.ndarray:
    """cv2.seamlessClone of the reference's defect, padded so masks at the image border work.

    The clone region is the mask grown by a few pixels: the defect's own edge (its contrast to the
    surface) then lies inside the Poisson domain and survives, instead of being replaced by the
    boundary condition. The ring outside the mask is dropped by the final composite.
    """
    pad = 4
    src = cv2.copyMakeBorder(reference, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    dst = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    grown = cv2.dilate(mask.astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
    mask8 = cv2.copyMakeBorder(grown, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    x, y, w, h = cv2.boundingRect(mask8)
    cloned = cv2.seamlessClone(src, dst, mask8, (x + w // 2, y + h // 2), mode)
    return cloned[pad:-pad, pad:-pad]


def _blend_feather(reference: np.ndarray, image: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """Feathered alpha paste: more strength, a wider fade from the source into the defect."""
    thickness = float(_distance_inside(mask).max())
    return feathered_composite(image, reference, mask, width=1.0 + strength * thickness)


def _blend_clone(
    reference: np.ndarray, image: np.ndarray, mask: np.ndarray, strength: float, mode: int
) -> np.ndarray:
    """Poisson clone mixed with the plain paste: more strength, more of the clone."""
    cloned = _seamless(reference, image, mask, mode).astype(np.float32)
    mixed = (1.0 - strength) * reference.astype(np.float32) + strength * cloned
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# A hard paste is deliberately absent: it equals the reference, so SSIM selection would always pick it.
FEW_SHOT_BLENDS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]] = {
    "feather": _blend_feather,
    "normal_clone": partial(_blend_clone, mode=cv2.NORMAL_CLONE),
    "mixed_clone": partial(_blend_clone, mode=cv2.MIXED_CLONE),
}


# ---------------------------------------------------------------- the backend


def _check_request(request: PaintRequest) -> None:
    image, mask = request.image, request.mask
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"image for '{request.anomaly_type}' must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask {mask.shape} does not match image {image.shape[:2]} for '{request.anomaly_type}'")
    if not mask.any():
        raise InputError(f"empty mask for '{request.anomaly_type}': nothing to paint")
    if request.reference is not None and request.reference.shape != image.shape:
        raise InputError(f"reference {request.reference.shape} does not match image {image.shape}")


class ClassicalBackend:
    """Paints with `RECIPES` (zero-shot) or `FEW_SHOT_BLENDS` (few-shot); no weights, CPU only.

    Zero-shot: each strength gives `candidates_per_strength` candidates, candidate k drawing from
    `numpy_rng(request.seed, k)`. Few-shot: each strength gives one candidate per blend (they are
    deterministic, so more per strength would only repeat them); strength is the harmonisation —
    feather width or share of the Poisson clone.
    """

    name = "classical"

    def __init__(self, recipes: dict[str, str] | None = None, candidates_per_strength: int = 1):
        self.recipes = dict(recipes or {})
        unknown = sorted(set(self.recipes.values()) - RECIPES.keys())
        if unknown:
            raise InputError(f"unknown classical recipe(s) {unknown}; known: {sorted(RECIPES)}")
        if candidates_per_strength < 1:
            raise InputError(f"candidates_per_strength must be >= 1, got {candidates_per_strength}")
        self.candidates_per_strength = int(candidates_per_strength)

    def recipe_for(self, anomaly_type: str) -> str:
        return self.recipes.get(anomaly_type) or default_recipe_for(anomaly_type)

    def paint(self, requests: Sequence[PaintRequest], strengths: Sequence[float]) -> list[list[Candidate]]:
        if not strengths or any(not 0.0 <= s <= 1.0 for s in strengths):
            raise InputError(f"strengths must be a non-empty list of values in [0, 1], got {list(strengths)}")
        for request in requests:
            _check_request(request)
        return [
            self._few_shot(r, strengths) if r.few_shot else self._zero_shot(r, strengths) for r in requests
        ]

    def _zero_shot(self, request: PaintRequest, strengths: Sequence[float]) -> list[Candidate]:
        recipe = RECIPES[self.recipe_for(request.anomaly_type)]
        plan = [s for s in strengths for _ in range(self.candidates_per_strength)]
        candidates = []
        for k, strength in enumerate(plan):
            painted = recipe(request.image, request.mask, float(strength), numpy_rng(request.seed, k))
            image = feathered_composite(request.image, painted, request.mask)
            candidates.append(Candidate(image, request.mask.copy(), float(strength), k))
        return candidates

    def _few_shot(self, request: PaintRequest, strengths: Sequence[float]) -> list[Candidate]:
        plan = [(s, blend) for s in strengths for blend in FEW_SHOT_BLENDS.values()]
        mask3 = request.mask[..., None]
        return [
            Candidate(
                np.where(mask3, blend(request.reference, request.image, request.mask, float(s)), request.image),
                request.mask.copy(),
                float(s),
                k,
            )
            for k, (s, blend) in enumerate(plan)
        ]

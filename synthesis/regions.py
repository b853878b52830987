"""Few-shot regions: cut real defects out of the shots, augment them, place them on normal images.

The placed composite is the few-shot `PaintRequest.reference`; a backend then harmonises it.
Images arrive at the working resolution (the renderer resizes), so nothing here resizes except a
patch too large for its target.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from core.errors import InputError
from synthesis.priors import PlacementError


@dataclass
class RegionPatch:
    image: np.ndarray  # (h, w, 3) uint8: the defect with `context` pixels of surface around it
    mask: np.ndarray  # (h, w) bool: the defect pixels of this patch only

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def cut_regions(image: np.ndarray, mask: np.ndarray, context: int = 8, min_area: int = 4) -> list[RegionPatch]:
    """One patch per defect: fragments closer than `2 * context` px are one defect.

    A crack broken into pieces or a cluster of pits is one defect to a human labeller, so the
    grouping is by connected components of the mask dilated by `context`. Groups with fewer than
    `min_area` defect pixels (anti-aliasing specks) are dropped, unless every group is that small,
    in which case the whole mask is one patch. Boxes are clipped at the image border.
    """
    mask = np.asarray(mask, dtype=bool)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise InputError(f"image {image.shape} and mask {mask.shape} must be (H, W, 3) and (H, W)")
    if not mask.any():
        raise InputError("empty defect mask: no region to cut")
    grown = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * context + 1,) * 2))
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    groups = [mask & (labels == label) for label in range(1, count)]
    kept = [g for g in groups if g.sum() >= min_area] or [mask]
    return [_crop(image, group, context) for group in kept]


def _crop(image: np.ndarray, defect: np.ndarray, context: int) -> RegionPatch:
    ys, xs = np.nonzero(defect)
    h, w = defect.shape
    box = (
        slice(max(0, ys.min() - context), min(h, ys.max() + context + 1)),
        slice(max(0, xs.min() - context), min(w, xs.max() + context + 1)),
    )
    return RegionPatch(image[box].copy(), defect[box].copy())


def augment_region(
    patch: RegionPatch,
    rng: np.random.Generator,
    max_angle: float = 20.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
) -> RegionPatch:
    """A random dihedral transform (transpose, flips), then a small rotation and rescale.

    The dihedral part is exact; the warp moves image (bilinear) and mask (bilinear, kept where at
    least half covered, so thin cracks survive) with one matrix, on a canvas grown to fit; the new
    corners repeat the patch border (reflecting could copy the defect into the context).
    """
    image, mask = patch.image, patch.mask
    if rng.random() < 0.5:
        image, mask = image.transpose(1, 0, 2), mask.T
    flip_y, flip_x = (-1 if rng.random() < 0.5 else 1), (-1 if rng.random() < 0.5 else 1)
    image, mask = image[::flip_y, ::flip_x], mask[::flip_y, ::flip_x]
    angle = rng.uniform(-max_angle, max_angle)
    scale = rng.uniform(*scale_range)
    image, mask = _warp(np.ascontiguousarray(image), np.ascontiguousarray(mask), angle, scale)
    if not mask.any():  # a one-pixel defect can vanish under a shrink; keep the unwarped one then
        image, mask = np.ascontiguousarray(patch.image), patch.mask.copy()
    return RegionPatch(image, mask)


def _warp(image: np.ndarray, mask: np.ndarray, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    out_w = max(1, int(np.ceil(h * sin + w * cos)))
    out_h = max(1, int(np.ceil(h * cos + w * sin)))
    matrix[0, 2] += (out_w - w) / 2
    matrix[1, 2] += (out_h - h) / 2
    warped = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    coverage = cv2.warpAffine(
        mask.astype(np.float32), matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    return warped, coverage >= 0.5


def _fit(patch: RegionPatch, height: int, width: int) -> RegionPatch:
    """Downscale a patch that does not fit the target (aspect kept)."""
    h, w = patch.mask.shape
    factor = min(height / h, width / w)
    if factor >= 1.0:
        return patch
    size = (max(1, int(w * factor)), max(1, int(h * factor)))
    image = cv2.resize(patch.image, size, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(patch.mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
    if not mask.any():
        mask = cv2.resize(patch.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return RegionPatch(image, mask)


def place_region(
    patch: RegionPatch,
    target: np.ndarray,
    foreground: np.ndarray | None,
    rng: np.random.Generator,
    max_tries: int = 30,
    min_kept: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Hard-paste the patch's defect pixels onto `target` where they land on the foreground.

    Each try anchors a random defect pixel on a random foreground pixel (so small foregrounds are
    hit quickly), clips the patch into the image and keeps the placement when at least `min_kept`
    of the defect stays on the foreground. Returns (composite, mask), mask = defect AND foreground;
    the composite equals `target` outside the mask. `foreground=None` means the whole image.
    """
    height, width = target.shape[:2]
    if foreground is None:
        foreground = np.ones((height, width), dtype=bool)
    foreground = np.asarray(foreground, dtype=bool)
    if foreground.shape != (height, width):
        raise InputError(f"foreground {foreground.shape} does not match target {target.shape[:2]}")
    if not patch.mask.any():
        raise InputError("region patch has an empty mask")
    if not foreground.any():
        raise InputError("empty foreground: nowhere to place the defect")
    patch = _fit(patch, height, width)
    ph, pw = patch.mask.shape
    defect_ys, defect_xs = np.nonzero(patch.mask)
    fore_ys, fore_xs = np.nonzero(foreground)
    for _ in range(max_tries):
        d, f = int(rng.integers(len(defect_ys))), int(rng.integers(len(fore_ys)))
        top = int(np.clip(fore_ys[f] - defect_ys[d], 0, height - ph))
        left = int(np.clip(fore_xs[f] - defect_xs[d], 0, width - pw))
        window = (slice(top, top + ph), slice(left, left + pw))
        placed = np.zeros((height, width), dtype=bool)
        placed[window] = patch.mask & foreground[window]
        if placed.sum() >= min_kept * len(defect_ys) and placed.any():
            composite = target.copy()
            composite[window][placed[window]] = patch.image[placed[window]]
            return composite, placed
    raise PlacementError(
        f"could not place a {ph}x{pw} defect with >= {min_kept:.0%} of it on the foreground in {max_tries} tries"
    )

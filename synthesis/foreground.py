"""Foreground masks: where on a normal image an anomaly may be placed.

Objects (a screw, a bottle) must not get defects painted on the background; textures and tiles
are foreground everywhere. The classical split needs no weights; a `transformers` segmentation
model can replace it when configured. Both fall back to the whole image when the foreground
found is under `min_fraction` of it, since a tiny "object" is more likely a failed split.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from core.errors import InputError
from synthesis.config import ForegroundConfig

ForegroundFn = Callable[[np.ndarray], np.ndarray]

# A side of the split touching more than this share of the image border is background-like on
# both sides (a texture), so the whole image is foreground.
_MAX_BORDER_SHARE = 0.35
# Components smaller than this share of the largest one are speckle, not object parts.
_MIN_COMPONENT_SHARE = 0.1
# An "object" both thin (under this share of it survives an erosion by 1/32 of the image side) and
# scattered (under this share of its convex hull) is no object: the traces and pads of a circuit
# board or the lines of a scanned drawing (0.01-0.11 and 0.14-0.30 on such images; compact objects,
# a screw or a transistor with legs included, 0.43+ and 0.69+). A thin needle is not scattered and
# a scatter of blobs is not thin, so both stay objects.
_MIN_INTERIOR_SHARE = 0.25
_MIN_SOLIDITY = 0.5


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"foreground needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")


def _whole_if_small(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    if mask.mean() < min_fraction:
        return np.ones(mask.shape, dtype=bool)
    return mask


def _border_share(mask: np.ndarray) -> float:
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(border.mean())


def _keep_large_components(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= _MIN_COMPONENT_SHARE * areas.max())
    return np.isin(labels, keep)


def _is_thin_and_scattered(mask: np.ndarray) -> bool:
    radius = max(1, min(mask.shape) // 32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    area = int(mask.sum())
    interior = int(cv2.erode(mask.astype(np.uint8), kernel).sum())
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(mask.astype(np.uint8))), 1)
    return interior < _MIN_INTERIOR_SHARE * area and area < _MIN_SOLIDITY * int(hull.sum())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes inside an object (a dark hole in a nut) are still the object."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def classical_foreground(image: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    """Object/background split without weights: Otsu on a blurred channel, border rule, clean-up.

    The channel (gray or HSV saturation) with the stronger Otsu separation is thresholded; the
    side touching the image border less is the object. When both sides touch the border a lot
    (a texture), the object is thin and scattered (the lines of a drawing or a circuit board: the
    other side is the background, so neither is an object) or under `min_fraction`, the whole
    image is foreground.
    """
    _check_image(image)
    h, w = image.shape[:2]
    k = max(3, (min(h, w) // 64) * 2 + 1)  # blur scale follows image size: ignore fine texture
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    sat = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[:, :, 1]
    best: tuple[float, np.ndarray] | None = None
    for channel in (gray, sat):
        blurred = cv2.GaussianBlur(channel, (k, k), 0)
        if blurred.std() < 2.0:  # flat channel: no split to find
            continue
        _, binary = cv2.threshold(blurred, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        side = binary.astype(bool)
        # separation = between-class variance share (Otsu's eta); higher means a cleaner split
        p = side.mean()
        if p in (0.0, 1.0):
            continue
        values = blurred.astype(np.float64)
        eta = p * (1 - p) * (values[side].mean() - values[~side].mean()) ** 2 / values.var()
        if best is None or eta > best[0]:
            best = (eta, side)
    if best is None:
        return np.ones((h, w), dtype=bool)
    side = best[1]
    obj = side if _border_share(side) <= _border_share(~side) else ~side
    if _border_share(obj) > _MAX_BORDER_SHARE:
        return np.ones((h, w), dtype=bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    cleaned = cv2.morphologyEx(obj.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, kernel).astype(bool)
    cleaned = _fill_holes(_keep_large_components(cleaned))
    if cleaned.any() and _is_thin_and_scattered(cleaned):
        return np.ones((h, w), dtype=bool)
    return _whole_if_small(cleaned, min_fraction)


class SegmentationForeground:
    """Foreground = every pixel a `transformers` semantic-segmentation model does not call background.

    `background_labels` are the class ids counted as background (class 0 by default, the
    convention of salient-object and ADE-style "background/other" heads).
    """

    def __init__(self, model, processor=None, min_fraction: float = 0.05, background_labels: tuple[int, ...] = (0,)):
        self.model = model.eval()
        self.processor = processor
        self.min_fraction = min_fraction
        self.background_labels = background_labels

    @classmethod
    def from_pretrained(
        cls, model_id_or_dir: str, local_files_only: bool = True, min_fraction: float = 0.05
    ) -> "SegmentationForeground":
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        try:
            model = AutoModelForSemanticSegmentation.from_pretrained(
                model_id_or_dir, local_files_only=local_files_only
            )
        except (OSError, ValueError) as err:
            raise InputError(
                "cannot load the foreground segmentation model (give a local directory with config.json "
                "and weights, or a Hub id with local_files_only: false in params.yaml "
                f"synthesis.foreground): {err}",
                path=model_id_or_dir,
            ) from err
        try:
            processor = AutoImageProcessor.from_pretrained(model_id_or_dir, local_files_only=local_files_only)
        except (OSError, ValueError):
            processor = None  # fall back to plain [0, 1] scaling + ImageNet normalisation
        return cls(model, processor, min_fraction=min_fraction)

    def _pixel_values(self, image: np.ndarray):
        import torch

        if self.processor is not None:
            return self.processor(images=image, return_tensors="pt")["pixel_values"]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        return (x - mean) / std

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        _check_image(image)
        h, w = image.shape[:2]
        param = next(self.model.parameters())
        pixel_values = self._pixel_values(image).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            logits = self.model(pixel_values=pixel_values).logits
        logits = torch.nn.functional.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        labels = logits.argmax(dim=1)[0].cpu().numpy()
        mask = ~np.isin(labels, self.background_labels)
        return _whole_if_small(mask, self.min_fraction)


def make_foreground(config: ForegroundConfig) -> ForegroundFn:
    """The configured image -> bool mask function: the model when one is set, classical otherwise."""
    if config.model:
        return SegmentationForeground.from_pretrained(
            config.model, local_files_only=config.local_files_only, min_fraction=config.min_fraction
        )
    return lambda image: classical_foreground(image, min_fraction=config.min_fraction)

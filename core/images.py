"""Image and mask IO: every pixel that enters the project from disk passes through here.

One place converts the zoo of on-disk formats (grayscale, RGBA, palette, 16-bit) into the two
arrays the rest of the code knows: RGB uint8 images (H, W, 3) and boolean masks (H, W). Bad files
raise `InputError` naming the file, so a broken dataset fails at `prepare`, not mid-training.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.atomic import write_bytes_atomic
from core.errors import InputError
from core.manifest import Sample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Real masks are not clean: MTD's carry anti-aliased edges and JPEG-like noise near 0 and 255 (in
# some of its masks most nonzero pixels are such noise, and up to 2.6% of all pixels are not exactly
# 0/255). Only mid-grey pixels spread over the image (a heat map, a photo...) mark a file that is not
# a binary mask: more than MAX_GREY_FRACTION of ALL pixels in GREY_RANGE (MTD's worst is 0.9%).
GREY_RANGE = (32, 223)
MAX_GREY_FRACTION = 0.05


def _decode(data: bytes | np.ndarray, path: str | Path | None) -> np.ndarray:
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    arr = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if arr is None:
        raise InputError("cannot decode image (corrupt or unsupported format)", path)
    return arr


def _load(path: str | Path) -> np.ndarray:
    """Raw pixels as stored (any depth, any channel count); np.fromfile copes with non-ASCII paths."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror or exc})", path) from None
    return _decode(data, path)


def _to_uint8(arr: np.ndarray, path: str | Path | None) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    raise InputError(f"unsupported pixel type {arr.dtype} (expected 8- or 16-bit)", path)


def _to_rgb(arr: np.ndarray, path: str | Path | None) -> np.ndarray:
    """OpenCV decodes to BGR(A) or grey; alpha is dropped (PIL's convert('RGB') does the same)."""
    arr = _to_uint8(arr, path)
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    raise InputError(f"unsupported image shape {arr.shape}", path)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour, so a resized mask stays binary and thin defects keep their class."""
    if mask.shape == (size, size):
        return mask
    resized = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def read_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image; resized to size×size when `size` is given."""
    image = _to_rgb(_load(path), path)
    return resize_image(image, size) if size else image


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header only: a cheap size check without decoding pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, Image.UnidentifiedImageError, ValueError):
        raise InputError("cannot read image header (corrupt or unsupported format)", path) from None
    return height, width


def _mask_plane(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """One channel: masks saved as RGB(A) by some tools carry the same value in every channel."""
    if raw.ndim == 3:
        raw = raw[..., :3]
        if not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
            raise InputError("mask has colour (channels differ); expected a grayscale mask", path)
        raw = raw[..., 0]
    return raw


def binarize_mask(plane: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """A boolean defect mask from an 8- or 16-bit mask plane.

    A two-valued 0/k mask marks the defect wherever it is non-zero, whatever k (0/1, 0/100, a
    class id such as 0/3, 0/255): read at > 127, any k <= 127 would silently become an empty mask.
    Anything else (anti-aliased or noisy 0/255 masks) is thresholded at > 127, and raises when it
    is clearly not binary: more than `MAX_GREY_FRACTION` of all its pixels mid-grey (`GREY_RANGE`).
    """
    nonzero = plane[plane != 0]
    if nonzero.size == 0 or nonzero.min() == nonzero.max():
        return plane != 0
    plane = _to_uint8(plane, path)
    lo, hi = GREY_RANGE
    grey = np.count_nonzero((plane >= lo) & (plane <= hi))
    if grey > MAX_GREY_FRACTION * plane.size:
        raise InputError(
            f"mask is not binary: {grey / plane.size:.0%} of its pixels are mid-grey "
            f"(at most {MAX_GREY_FRACTION:.0%} allowed); expected 0 = normal, 255 = defect",
            path,
        )
    return plane > 127


def read_mask(
    path: str | Path,
    image_hw: tuple[int, int] | None,
    mask_value: int | None = None,
    size: int | None = None,
) -> np.ndarray:
    """A boolean (H, W) defect mask, checked against the image's (height, width).

    `mask_value` set: the mask stores class ids (MVTec-FS) and the defect is `mask == mask_value`
    (raw values, 16-bit kept). Otherwise a binary mask, see `binarize_mask`.
    """
    plane = _mask_plane(_load(path), path)
    if image_hw is not None and tuple(plane.shape[:2]) != tuple(image_hw):
        raise InputError(
            f"mask size {plane.shape[1]}x{plane.shape[0]} (WxH) differs from its image's "
            f"{image_hw[1]}x{image_hw[0]}",
            path,
        )
    if mask_value is not None:
        mask = plane == mask_value
    else:
        mask = binarize_mask(plane, path)
    return resize_mask(mask, size) if size else mask


def read_sample(sample: Sample, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask of one sample, size-checked at full resolution, then resized together.

    A sample without a mask file (normal) gets an all-False mask.
    """
    image = read_image(sample.path)
    hw = image.shape[:2]
    if sample.mask_path:
        mask = read_mask(sample.mask_path, hw, sample.mask_value)
    else:
        mask = np.zeros(hw, dtype=bool)
    if size:
        image, mask = resize_image(image, size), resize_mask(mask, size)
    return image, mask


def _to_png_pixels(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 or bool pixels, got {arr.dtype}")
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    raise ValueError(f"encode_png expects (H, W) or (H, W, 3), got {arr.shape}")


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or grey (H, W) uint8 array; bool masks become 0/255.

    Deterministic: the same pixels always give the same bytes (no timestamps in the file).
    """
    ok, buffer = cv2.imencode(".png", _to_png_pixels(np.ascontiguousarray(arr)))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of `encode_png`: (H, W, 3) RGB for colour, (H, W) uint8 for grey."""
    arr = _to_uint8(_decode(data, None), None)
    return arr if arr.ndim == 2 else _to_rgb(arr, None)


def write_png(path: str | Path, arr: np.ndarray) -> None:
    """Write a PNG atomically (temp file + rename): a crash never leaves a truncated image."""
    write_bytes_atomic(path, encode_png(arr))


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")

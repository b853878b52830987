"""Dummy datasets in every on-disk layout the readers support, plus bad-input makers.

Images are tiny (default 32 px) and carry their index in the pixels so a test can tell them
apart. Every reader test builds its data here (anomalib's tests/helpers/data.py style).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.images import write_png
from core.manifest import NORMAL

SIZE = 32


def image_array(index: int, size: int = SIZE, height: int | None = None) -> np.ndarray:
    """An RGB image whose colour encodes `index` (distinct images, no RNG needed)."""
    height = height or size
    arr = np.zeros((height, size, 3), np.uint8)
    arr[..., 0] = (37 * index) % 256
    arr[..., 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    arr[..., 2] = 128
    return arr


def defect_mask(size: int = SIZE, height: int | None = None, value: int = 255) -> np.ndarray:
    """A square defect in the middle: uint8, 0 outside, `value` inside."""
    height = height or size
    mask = np.zeros((height, size), np.uint8)
    mask[height // 4 : height // 2, size // 4 : size // 2] = value
    return mask


def write_image(path: Path, arr: np.ndarray) -> Path:
    """PNG through the project's writer; other extensions through OpenCV (expects RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        write_png(path, arr)
    else:
        bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
        assert cv2.imwrite(str(path), bgr), path
    return path


@dataclass
class DummySpec:
    """How many images of each kind a dummy dataset gets."""

    types: tuple[str, ...] = ("crack", "hole")
    n_train: int = 3
    n_test_good: int = 2
    n_per_type: int = 2
    size: int = SIZE
    empty_masks: dict[str, list[int]] = field(default_factory=dict)  # type -> indices


@dataclass(frozen=True)
class DummyImage:
    """One image of a dummy dataset, before a layout decides where it goes."""

    anomaly_type: str  # NORMAL or a defect type
    pool: str  # "train" or "test"
    index: int  # within (pool, type)
    image: np.ndarray
    mask: np.ndarray | None  # uint8 0/255; None for normal images


def dummy_images(spec: DummySpec, train_anomalies: bool = False) -> list[DummyImage]:
    """The images every layout maker writes: train normals, test normals, defects per type
    (in the train pool too when `train_anomalies`, as MVTec-FS has)."""
    pools = ("train", "test") if train_anomalies else ("test",)
    out = [DummyImage(NORMAL, "train", i, image_array(i, spec.size), None) for i in range(spec.n_train)]
    out += [
        DummyImage(NORMAL, "test", i, image_array(100 + i, spec.size), None) for i in range(spec.n_test_good)
    ]
    for t, anomaly_type in enumerate(spec.types):
        for pool in pools:
            for i in range(spec.n_per_type):
                mask = defect_mask(spec.size) * (i not in spec.empty_masks.get(anomaly_type, []))
                out.append(DummyImage(anomaly_type, pool, i, image_array(200 + 10 * t + i, spec.size), mask))
    return out


def make_mvtec(root: Path, category: str = "widget", spec: DummySpec | None = None) -> Path:
    """``<root>/<category>/{train/good, test/<type>, ground_truth/<type>}``; returns the category dir."""
    folder = root / category
    for d in dummy_images(spec or DummySpec()):
        name = f"{d.index:03d}.png"
        if d.mask is None:
            write_image(folder / d.pool / "good" / name, d.image)
        else:
            write_image(folder / "test" / d.anomaly_type / name, d.image)
            write_png(folder / "ground_truth" / d.anomaly_type / f"{d.index:03d}_mask.png", d.mask)
    return folder


def make_mvtec_fs(root: Path, category: str = "widget", spec: DummySpec | None = None) -> Path:
    """The UniADC / MVTec-FS jsonl layout: ``samples/{train,test}_<category>.jsonl`` (keys
    filename, maskname, label, label_name; masks store the class id); types get ids in
    REVERSE name order so tests can see that declared ids, not names, set the order."""
    spec = spec or DummySpec()
    ids = {t: len(spec.types) - i for i, t in enumerate(spec.types)}
    lines: dict[str, list[dict]] = {"train": [], "test": []}
    for d in dummy_images(spec, train_anomalies=True):
        folder = "good" if d.mask is None else d.anomaly_type
        rel = f"{category}/{d.pool}/{folder}/{d.index:03d}.png"
        write_image(root / rel, d.image)
        record = {"filename": rel, "label": ids.get(d.anomaly_type, 0), "label_name": d.anomaly_type}
        if d.mask is not None:
            record["maskname"] = f"{category}/ground_truth/{d.pool}/{folder}/{d.index:03d}.png"
            write_png(root / record["maskname"], (d.mask > 0).astype(np.uint8) * record["label"])
        lines[d.pool].append(record)
    for pool, records in lines.items():
        path = root / "samples" / f"{pool}_{category}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def make_mtd(root: Path, spec: DummySpec | None = None) -> Path:
    """``<root>/MT_<Class>/Imgs/<stem>.jpg`` + ``<stem>.png`` masks (MT_Free normal, with blank masks
    as upstream, grayscale photos). Index i gets stem ``exp1_num_<n - i>``, so sorted file-name
    order is the REVERSE of index order (index n-1 is the first shot). No train pool."""
    spec = spec or DummySpec(types=("blowhole", "crack"))
    for d in dummy_images(spec):
        if d.pool == "train":
            continue
        normal = d.mask is None
        n = spec.n_test_good if normal else spec.n_per_type
        folder = root / ("MT_Free" if normal else f"MT_{d.anomaly_type.capitalize()}") / "Imgs"
        stem = f"exp1_num_{n - d.index}"
        write_image(folder / f"{stem}.jpg", d.image[..., 1] if normal else d.image)
        write_png(folder / f"{stem}.png", np.zeros(d.image.shape[:2], np.uint8) if normal else d.mask)
    return root


def make_folder(root: Path, spec: DummySpec | None = None, normal_in: str = "good") -> Path:
    """Plain folder: normal images in ``<root>/<normal_in>`` ("" = in root itself), defects in
    ``<root>/<type>/`` with masks in ``<root>/<type>/masks/<stem>.png``. No train pool."""
    for d in dummy_images(spec or DummySpec()):
        name = f"{d.index:03d}.png"
        if d.pool == "train":
            continue
        if d.mask is None:
            write_image((root / normal_in if normal_in else root) / name, d.image)
        else:
            write_image(root / d.anomaly_type / name, d.image)
            write_png(root / d.anomaly_type / "masks" / name, d.mask)
    return root


# ---- bad and unusual inputs ------------------------------------------------------------------


def corrupt_file(path: Path) -> Path:
    """Overwrite with bytes no decoder accepts (keeps the name and extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


def truncated_png(path: Path, arr: np.ndarray) -> Path:
    write_png(path, arr)
    path.write_bytes(path.read_bytes()[:40])
    return path


def wrong_size_mask(path: Path, size: int = SIZE) -> Path:
    write_png(path, defect_mask(size + 8, height=size + 4))
    return path


def non_binary_mask(path: Path, size: int = SIZE) -> Path:
    """A smooth ramp: mostly mid-grey, like a saved heat map."""
    write_png(path, np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1)))
    return path


def noisy_binary_mask(size: int = SIZE) -> np.ndarray:
    """Binary with MTD-like noise: faint values near 0 and 255 around a defect, a few grey edges."""
    mask = defect_mask(size)
    mask[mask == 255] = 250
    mask[0, :] = 3
    mask[size // 4 - 1, size // 4 : size // 2] = 140  # anti-aliased edge
    return mask


def empty_mask(path: Path, size: int = SIZE) -> Path:
    write_png(path, np.zeros((size, size), np.uint8))
    return path


def grayscale_image(path: Path, size: int = SIZE) -> Path:
    write_png(path, image_array(1, size)[..., 1])
    return path


def rgba_image(path: Path, size: int = SIZE) -> Path:
    rgba = np.concatenate([image_array(1, size), np.full((size, size, 1), 77, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def uint16_image(path: Path, size: int = SIZE, channels: int = 3) -> Path:
    """16-bit PNG whose 8-bit equivalent is `image_array(1)`."""
    arr = image_array(1, size).astype(np.uint16) * 257
    if channels == 1:
        arr = arr[..., 1]
    else:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return path


def palette_image(path: Path, size: int = SIZE) -> Path:
    Image.fromarray(image_array(1, size)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    return path

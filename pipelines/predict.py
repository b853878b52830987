"""`uniadc predict`: score images with a checkpoint, one record per image (JSON lines for scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from discriminator.deploy.inferencers import load_inferencer
from discriminator.predict import images_to_tensor
from discriminator.report import save_overlay
from core.errors import InputError
from core.images import read_image

BATCH_SIZE = 8


def overlay_paths(image_paths: list[str], out_dir: Path) -> list[Path]:
    """`<stem>.png` per image; a repeated stem (same name in two folders) gets `-1`, `-2`, ..."""
    seen: dict[str, int] = {}
    paths = []
    for path in image_paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        paths.append(out_dir / (f"{stem}.png" if count == 0 else f"{stem}-{count}.png"))
    return paths


def _read_or_error(path: str, size: int) -> np.ndarray | InputError:
    """One unreadable file must not stop a batch: its error becomes that file's record."""
    try:
        return read_image(path, size)
    except InputError as exc:
        return exc


def run_predict(image_paths: list[str], model_dir: str | Path, out_dir: str | Path | None = None,
                device: str = "auto", batch_size: int = BATCH_SIZE) -> Iterator[dict]:
    """Per image: path, score, anomalous, type (name), type_id and overlay (PNG path or None).

    `model_dir` is a checkpoint folder, or an export of one (an .onnx file, an OpenVINO folder or
    .xml), which gives the same records. Images are read at the model's resolution; an unreadable
    one gets a record `{"path", "error"}` and the others are scored as usual.
    """
    predictor = load_inferencer(model_dir, device)
    names, size = predictor.class_names, predictor.image_size
    targets = overlay_paths(image_paths, Path(out_dir)) if out_dir is not None else [None] * len(image_paths)
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start : start + batch_size]
        images = [_read_or_error(path, size) for path in paths]
        readable = [i for i, image in enumerate(images) if not isinstance(image, InputError)]
        prediction = predictor(images_to_tensor([images[i] for i in readable])) if readable else None
        row = {i: r for r, i in enumerate(readable)}  # batch index -> row of `prediction`
        for i, (path, image) in enumerate(zip(paths, images)):
            if isinstance(image, InputError):
                yield {"path": str(path), "error": image.problem}
                continue
            overlay, r = targets[start + i], row[i]
            if overlay is not None:
                save_overlay(image, prediction.type_maps[r].numpy(), names, overlay)
            type_id = int(prediction.types[r])
            yield {
                "path": str(path),
                "score": round(float(prediction.scores[r]), 6),
                "anomalous": bool(prediction.anomalous[r]),
                "type": names[type_id],
                "type_id": type_id,
                "overlay": None if overlay is None else str(overlay),
            }

"""`uniadc predict`: score images with a checkpoint, one record per image (JSON lines for scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from discriminator.model import Discriminator
from discriminator.predict import Predictor, images_to_tensor, resolve_device
from discriminator.report import save_overlay
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


def run_predict(image_paths: list[str], model_dir: str | Path, out_dir: str | Path | None = None,
                device: str = "auto", batch_size: int = BATCH_SIZE) -> Iterator[dict]:
    """Per image: path, score, anomalous, type (name), type_id and overlay (PNG path or None).

    Images are read at the checkpoint's resolution; an unreadable one raises `InputError` naming it.
    """
    torch_device = resolve_device(device)
    model = Discriminator.from_pretrained(model_dir, device=torch_device)
    predictor = Predictor(model, device=torch_device)
    names, size = predictor.class_names, model.config.image_size
    targets = overlay_paths(image_paths, Path(out_dir)) if out_dir is not None else [None] * len(image_paths)
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start : start + batch_size]
        images = [read_image(path, size) for path in paths]
        prediction = predictor(images_to_tensor(images))
        for i, (path, image) in enumerate(zip(paths, images)):
            overlay = targets[start + i]
            if overlay is not None:
                save_overlay(image, prediction.type_maps[i].numpy(), names, overlay)
            type_id = int(prediction.types[i])
            yield {
                "path": str(path),
                "score": round(float(prediction.scores[i]), 6),
                "anomalous": bool(prediction.anomalous[i]),
                "type": names[type_id],
                "type_id": type_id,
                "overlay": None if overlay is None else str(overlay),
            }

"""The `evaluate` stage: score the manifest's real test set with a trained checkpoint.

Writes under `out_dir`:
- `metrics.json` (DVC metrics): image AUROC, pixel AUROC, AUPRO@0.3, image-type accuracy (C+1),
  pixel mIoU (C+1), image/pixel F1-max, throughput; decisions use the checkpoint's calibrated
  thresholds, nothing is tuned on the test set. A `reference_protocol` section repeats the numbers
  under the reference implementation's protocol: maps min-max normalised over the test set and
  thresholded at 0.5 — it looks at the test set, so it is labelled and kept apart. Ranking metrics
  (AUROC, AUPRO, F1-max) are unchanged by that affine normalisation; only accuracy and mIoU move.
- `plots/{image,pixel}_{roc,pr}.json` (DVC plots), `confusion_matrix.png`, `overlays.png`.
- `report.md`: the same numbers for people, with what each protocol means and the device (words
  stay out of metrics.json: DVC shows every value there as a column).
- `per_type.json`: per class, image AUROC against the normals, recall, pixel IoU, and the image
  confusion matrix; `failures.png`: the worst false positives and negatives with their maps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from discriminator import metrics as M
from discriminator.model import Discriminator
from discriminator.predict import Prediction, Predictor, decide, images_to_tensor, resolve_device
from discriminator.report import OverlayRow, save_confusion_matrix, save_overlay_grid
from pipelines.config import Params
from core.errors import InputError
from core.images import read_sample
from core.manifest import Manifest, Sample, write_text_atomic

REFERENCE_THRESHOLD = 0.5  # on min-max normalised maps and scores
REPORT_NAME = "report.md"
REFERENCE_NOTE = (
    "maps min-max normalised over the test set, pixel and image thresholds 0.5 on the normalised "
    "values (the reference implementation's protocol; it looks at the test set)"
)


@dataclass
class ScoredTestSet:
    """Everything the metrics need, for the whole test set (type ids: 0 normal, 1..C)."""

    prediction: Prediction  # under the checkpoint's calibrated thresholds
    true_types: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int
    overlay_rows: list[OverlayRow]
    model_seconds: float
    total_seconds: float


def load_checkpoint(model_dir: str | Path, manifest: Manifest, device: torch.device) -> Discriminator:
    """The checkpoint, refused unless it was trained for this manifest's category and types."""
    model = Discriminator.from_pretrained(model_dir, device=device, expected_category=manifest.category)
    if list(model.config.class_names) != list(manifest.anomaly_types):
        raise InputError(
            f"checkpoint anomaly types {list(model.config.class_names)} differ from the manifest's "
            f"{list(manifest.anomaly_types)}",
            model_dir,
        )
    return model


def select_detection_part(model: Discriminator, part: str | None, model_dir: str | Path) -> None:
    """Ablation: score with one part of the detection alone (None: all of it). `knn`: the distance to
    the normal shots; `self`: the distance to the image's own cells; `learned`: what training learned
    (the `knn` head's learned evidence, a knn_residual's residual)."""
    if part is None:
        return
    head, memory = model.detection_head, model.memory
    if part == "learned":
        if not getattr(head, "has_learned", False):
            raise InputError(f"evaluate.detection_part 'learned' needs a knn_residual detection head or a knn "
                             f"head with learned evidence (train.learned_weight > 0), this checkpoint has "
                             f"{model.config.detection_head!r}", model_dir)
        head.parts = ("learned",)
        return
    if memory is None or (part == "self" and not memory.self_similarity):
        needs = "a memory with self_similarity" if memory is not None else "a detection head with a memory"
        raise InputError(f"evaluate.detection_part {part!r} needs {needs}, this checkpoint has "
                         f"{model.config.detection_head!r}", model_dir)
    memory.parts = ("shots",) if part == "knn" else ("self",)
    if "knn" in getattr(head, "PARTS", ()):
        head.parts = ("knn",)


def overlay_indices(labels: np.ndarray, count: int) -> set[int]:
    """`count` test images spread over the (label-sorted) test set, so every type shows up."""
    order = np.argsort(labels, kind="stable")
    picks = np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)
    return {int(order[i]) for i in picks} if count > 0 else set()


def concat_predictions(parts: list[Prediction]) -> Prediction:
    return Prediction(*(torch.cat([getattr(p, name) for p in parts]) for name in Prediction.__dataclass_fields__))


def score_test_set(predictor: Predictor, samples: list[Sample], size: int, batch_size: int,
                   overlays: int, class_names: list[str]) -> ScoredTestSet:
    labels = np.array([s.label for s in samples])
    wanted = overlay_indices(labels, overlays)
    parts, true_types, rows = [], [], []
    model_seconds, started = 0.0, time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pairs = [read_sample(s, size) for s in batch]
        tick = time.perf_counter()
        prediction = predictor(images_to_tensor([image for image, _ in pairs]))
        model_seconds += time.perf_counter() - tick
        parts.append(prediction)
        for offset, (sample, (image, mask)) in enumerate(zip(batch, pairs)):
            true_types.append(mask.astype(np.uint8) * sample.label)
            if start + offset in wanted:
                rows.append(OverlayRow(
                    image, true_types[-1], prediction.anomaly_maps[offset].numpy(),
                    prediction.type_maps[offset].numpy(),
                    f"{Path(sample.path).name}\ntrue {sample.anomaly_type}, "
                    f"pred {class_names[int(prediction.types[offset])]}",
                ))
    return ScoredTestSet(concat_predictions(parts), np.stack(true_types), labels, rows, model_seconds,
                         time.perf_counter() - started)


def _defined(metric: Callable[..., float], *args) -> float:
    """A metric undefined on this test set (e.g. AUROC without normal images) is NaN, not a crash."""
    try:
        return float(metric(*args))
    except ValueError:
        return math.nan


def compute_metrics(scored: ScoredTestSet, prediction: Prediction, num_classes: int) -> M.Metrics:
    maps, scores = prediction.anomaly_maps.numpy(), prediction.scores.numpy()
    image_truth, pixel_truth = scored.labels > 0, scored.true_types > 0
    return M.Metrics(
        image_auroc=_defined(M.auroc, image_truth, scores),
        pixel_auroc=_defined(M.pixel_auroc, pixel_truth, maps),
        aupro=_defined(M.aupro, pixel_truth, maps, 0.3),
        type_accuracy=_defined(M.type_accuracy, scored.labels, prediction.types.numpy()),
        pixel_miou=_defined(M.pixel_miou, scored.true_types, prediction.type_maps.numpy(), num_classes),
        image_f1_max=_defined(M.f1_max, image_truth, scores),
        pixel_f1_max=_defined(M.f1_max, pixel_truth, maps),
        balanced_accuracy=_defined(M.balanced_accuracy, scored.labels, prediction.types.numpy(), num_classes),
    )


def _numbers(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def per_type_report(scored: ScoredTestSet, class_names: list[str]) -> dict:
    """Per class (normal first): test images, image AUROC against the normal images, image-level
    recall of the type decision, pixel IoU; and the image-level confusion matrix. Numbers only,
    lists in class order, so a reader (or DVC) can compare runs type by type."""
    prediction, n = scored.prediction, len(class_names)
    matrix = M.confusion_matrix(scored.labels, prediction.types.numpy(), n)
    pixel_matrix = M.confusion_matrix(scored.true_types, prediction.type_maps.numpy(), n)
    return {
        "class_names": list(class_names),
        "images": np.bincount(scored.labels, minlength=n).tolist(),
        "image_auroc": _numbers(M.per_type_image_auroc(scored.labels, prediction.scores.numpy(), n)),
        "recall": _numbers(M.class_recall(matrix)),
        "pixel_iou": _numbers(M.class_iou(pixel_matrix)),
        "confusion_matrix": matrix.tolist(),
    }


def failure_rows(scored: ScoredTestSet, samples: list[Sample], size: int, count: int, threshold: float,
                 class_names: list[str]) -> list[OverlayRow]:
    """The worst false positives (normal images, highest scores) then false negatives (anomalous
    images, lowest scores), with their maps; images are read again, only these few."""
    prediction = scored.prediction
    scores = prediction.scores.numpy()
    positives, negatives = M.worst_failures(scored.labels, scores, count)
    rows = []
    for kind, indices in (("normal, highest score", positives), ("anomalous, lowest score", negatives)):
        for i in indices:
            image, _ = read_sample(samples[i], size)
            rows.append(OverlayRow(
                image, scored.true_types[i], prediction.anomaly_maps[i].numpy(), prediction.type_maps[i].numpy(),
                f"{Path(samples[i].path).name}\n{kind}\n{scores[i]:.3f} (cut {threshold:.3f}), "
                f"{class_names[scored.labels[i]]} -> {class_names[int(prediction.types[i])]}",
            ))
    return rows


def reference_prediction(prediction: Prediction, top_k: int, pixel_types: str = "image") -> Prediction:
    """Decisions at 0.5 on maps min-max normalised over the test set: the normalisation is affine,
    so the same decisions come from the raw maps at the de-normalised threshold. The image scores
    are the prediction's own (top-k means of the model's image map, which with self-similarity is
    not the anomaly map) and take that same threshold."""
    lo, hi = float(prediction.anomaly_maps.min()), float(prediction.anomaly_maps.max())
    raw_threshold = lo + REFERENCE_THRESHOLD * (hi - lo)
    return decide(prediction.anomaly_maps, prediction.class_ids, prediction.type_mass,
                  raw_threshold, raw_threshold, top_k, pixel_types, prediction.scores)


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: an undefined metric is written as null."""
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_curves(out_dir: Path, scored: ScoredTestSet) -> list[Path]:
    """ROC and PR curves at image and pixel level, as DVC plot records; undefined ones skipped."""
    prediction = scored.prediction
    sources = {
        "image": (scored.labels > 0, prediction.scores.numpy()),
        "pixel": (scored.true_types > 0, prediction.anomaly_maps.numpy()),
    }
    written = []
    for level, (truth, scores) in sources.items():
        for kind, curve_of in (("roc", M.roc_curve_points), ("pr", M.pr_curve_points)):
            try:
                records = curve_of(truth, scores).to_records()
            except ValueError:
                continue
            path = out_dir / "plots" / f"{level}_{kind}.json"
            write_json(path, records)
            written.append(path)
    return written


def check_test_set(manifest: Manifest, manifest_path: str | Path) -> None:
    """Refuse a test set without normal or without anomalous images: half the metrics would be
    undefined and the rest (pixel mIoU 1.0 when nothing is anomalous) would look perfect."""
    if not manifest.test:
        raise InputError("the manifest has no test images", manifest_path)
    anomalous = sum(not s.is_normal for s in manifest.test)
    if anomalous == 0:
        raise InputError(
            f"the test set has {len(manifest.test)} normal and no anomalous images, so detection cannot be "
            "measured; were its anomalous images excluded for empty masks (see `uniadc prepare`'s output)?",
            manifest_path,
        )
    if anomalous == len(manifest.test):
        raise InputError(
            f"the test set has {anomalous} anomalous and no normal images, so detection cannot be measured "
            "(image AUROC needs both); give the data normal test images",
            manifest_path,
        )


def write_report(path: Path, manifest: Manifest, result: dict, device: torch.device) -> None:
    """The words that do not belong in metrics.json (DVC shows each of its values as a column, so
    it holds numbers only): what each protocol means, the device, and the headline numbers."""
    anomalous = sum(not s.is_normal for s in manifest.test)

    def cell(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    rows = [f"| {name} | {cell(result.get(name))} | {cell(result['reference_protocol'].get(name))} |"
            for name in M.Metrics.__dataclass_fields__]
    lines = [
        f"# Evaluation: {manifest.category}",
        "",
        f"{len(manifest.test)} test images ({len(manifest.test) - anomalous} normal, {anomalous} anomalous), "
        f"scored on {device}; values in %.",
        "",
        "| metric | ours | reference protocol |",
        "|---|---|---|",
        *rows,
        "",
        f"- **ours**: decisions at the checkpoint's thresholds (pixel {result['pixel_threshold']:.4f}, image "
        f"{result['image_threshold']:.4f}), calibrated on held-out synthetic images and the normal shots; "
        "nothing is tuned on the test set.",
        f"- **reference protocol**: {REFERENCE_NOTE}. Ranking metrics (AUROC, AUPRO, F1-max) are the same "
        "under both; only accuracy and mIoU move.",
        "",
    ]
    write_text_atomic(path, "\n".join(lines))


def run_evaluate(params: Params, model_dir: str | Path, manifest_path: str | Path, out_dir: str | Path) -> dict:
    """Score the test set; returns the dict written to metrics.json."""
    out_dir = Path(out_dir)
    # 1. inputs: manifest and a checkpoint trained for it
    manifest = Manifest.load(manifest_path)
    check_test_set(manifest, manifest_path)
    device = resolve_device(params.evaluate.device)
    model = load_checkpoint(model_dir, manifest, device)
    select_detection_part(model, params.evaluate.detection_part, model_dir)
    predictor = Predictor(model, device=device)
    class_names = manifest.class_names
    num_classes = len(class_names)

    # 2. score every test image (resized to image_size, masks nearest) under the calibrated thresholds
    scored = score_test_set(predictor, manifest.test, params.image_size, params.evaluate.batch_size,
                            params.evaluate.overlays, class_names)

    # 3. metrics: ours, then the reference protocol's, labelled
    ours = compute_metrics(scored, scored.prediction, num_classes)
    reference = compute_metrics(
        scored, reference_prediction(scored.prediction, predictor.top_k, predictor.pixel_types), num_classes)
    n = len(manifest.test)
    result = {
        **_finite(ours.to_dict()),
        "images_per_second": n / scored.model_seconds if scored.model_seconds > 0 else None,
        "end_to_end_images_per_second": n / scored.total_seconds if scored.total_seconds > 0 else None,
        "test_images": n,
        "pixel_threshold": predictor.pixel_threshold,
        "image_threshold": predictor.image_threshold,
        "reference_protocol": _finite(reference.to_dict()),
    }

    # 4. curves, confusion matrix, overlays, then metrics.json last (its presence marks a finished run)
    write_curves(out_dir, scored)
    matrix = M.confusion_matrix(scored.labels, scored.prediction.types.numpy(), num_classes)
    save_confusion_matrix(matrix, class_names, out_dir / "confusion_matrix.png",
                          f"{manifest.category}: image-level types (calibrated thresholds)")
    save_overlay_grid(scored.overlay_rows, class_names, out_dir / "overlays.png")
    write_json(out_dir / "per_type.json", per_type_report(scored, class_names))
    if params.evaluate.overlays > 0:
        failures = failure_rows(scored, manifest.test, params.image_size, max(params.evaluate.overlays // 2, 1),
                                predictor.image_threshold, class_names)
        save_overlay_grid(failures, class_names, out_dir / "failures.png")
    write_report(out_dir / REPORT_NAME, manifest, result, device)
    write_json(out_dir / "metrics.json", result)
    return result

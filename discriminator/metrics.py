"""Evaluation metrics: detection (AUROC, F1-max, AUPRO) and classification (accuracy, mIoU).

Pure numpy, exact (no score binning), and memory-sane at pixel level: ranking metrics split the
scores by class and sort each part once, so a 1000×256×256 evaluation needs about one extra copy of
the maps rather than an argsort (8 bytes per pixel) of them.

Metrics of an undefined case (AUROC with one class only, AUPRO without anomalous pixels, ...) raise
``ValueError`` naming the reason; the evaluate step decides whether to report them as missing.
These are programming-level checks on arrays, not user-file input, hence not ``InputError``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage

# Elements per chunk where an int64 temporary per element would otherwise cost 8 bytes/pixel.
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Binary labels as bool; 0/1 integers are accepted, anything else is a caller bug."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    if not np.issubdtype(labels.dtype, np.integer) or not ((labels == 0) | (labels == 1)).all():
        raise ValueError(f"{name} must be bool or 0/1 integers")
    return labels.astype(bool)


def _as_scores(scores: np.ndarray, shape: tuple[int, ...], name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores)
    if scores.shape != shape:
        raise ValueError(f"{name} shape {scores.shape} does not match the labels' {shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return scores


def _masks_and_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = _as_labels(masks, "masks")
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    return masks, _as_scores(maps, masks.shape, "maps")


def _split_sorted(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the positives and of the negatives, each sorted ascending.

    Every ranking metric below is a count of "scores >= t" per class, which ``searchsorted`` on
    these two arrays answers exactly, ties included.
    """
    labels = _as_labels(labels)
    scores = _as_scores(scores, labels.shape)
    positives, negatives = scores[labels], scores[~labels]
    if positives.size == 0:
        raise ValueError("no positive labels: the metric is undefined")
    positives.sort()
    negatives.sort()
    return positives, negatives


def _count_at_or_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


# --------------------------------------------------------------------------------------------
# image scores
# --------------------------------------------------------------------------------------------


def image_scores(maps: np.ndarray, top_k: int) -> np.ndarray:
    """Image anomaly score = mean of its ``top_k`` highest pixel scores (robust to lone hot pixels).

    >>> maps = np.array([[[0.0, 1.0], [0.5, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])
    >>> image_scores(maps, top_k=2).tolist()
    [0.75, 0.2]
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {maps.shape}")
    flat = maps.reshape(len(maps), -1)
    if not 1 <= top_k <= flat.shape[1]:
        raise ValueError(f"top_k must be in [1, {flat.shape[1]}] (pixels per map), got {top_k}")
    return np.partition(flat, -top_k, axis=1)[:, -top_k:].mean(axis=1, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# ranking metrics: AUROC, F1-max, curves
# --------------------------------------------------------------------------------------------


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2.

    Exact (Mann-Whitney), any shape; raises ``ValueError`` unless both classes are present.

    >>> auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    >>> auroc(np.array([0, 1]), np.array([0.5, 0.5]))
    0.5
    """
    positives, negatives = _split_sorted(labels, scores)
    if negatives.size == 0:
        raise ValueError("no negative labels: AUROC is undefined")
    # chunked so the int64 ranks never cost 8 bytes per positive pixel at once
    twice_wins = 0
    for start in range(0, positives.size, _CHUNK):
        chunk = positives[start : start + _CHUNK]
        below = np.searchsorted(negatives, chunk, side="left")
        below_or_tied = np.searchsorted(negatives, chunk, side="right")
        twice_wins += int(below.sum()) + int(below_or_tied.sum())
    return twice_wins / (2.0 * positives.size * negatives.size)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of every map; exact, extra memory ≈ one copy of ``maps``.

    >>> masks = np.array([[[False, True], [False, False]]])
    >>> pixel_auroc(masks, np.array([[[0.1, 0.9], [0.2, 0.3]]]))
    1.0
    """
    masks, maps = _masks_and_maps(masks, maps)
    return auroc(masks, maps)


@dataclass(frozen=True)
class F1Point:
    """The best F1 and the lowest threshold reaching it (predict anomalous when score >= threshold)."""

    f1: float
    threshold: float


def best_f1(labels: np.ndarray, scores: np.ndarray) -> F1Point:
    """Maximum F1 over all thresholds, with its threshold (the evaluate step reuses it).

    Only thresholds equal to a positive's score can be optimal (raising a threshold up to the next
    positive score keeps every true positive and drops false ones), so those are the candidates.

    >>> best_f1(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.8, 0.3]))
    F1Point(f1=0.8, threshold=0.3)
    """
    positives, negatives = _split_sorted(labels, scores)
    candidates = np.unique(positives)
    true_pos = _count_at_or_above(positives, candidates)
    false_pos = _count_at_or_above(negatives, candidates)
    f1 = 2.0 * true_pos / (true_pos + false_pos + positives.size)
    best = int(np.argmax(f1))
    return F1Point(f1=float(f1[best]), threshold=float(candidates[best]))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 over thresholds, for image labels/scores or pixel masks/maps alike.

    >>> f1_max(np.array([0, 1, 1]), np.array([0.2, 0.6, 0.7]))
    1.0
    """
    return best_f1(labels, scores).f1


@dataclass(frozen=True)
class Curve:
    """A curve sampled at a few hundred thresholds, for plots; ``to_records`` suits DVC plots."""

    x_name: str
    y_name: str
    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray  # +inf for the start point where nothing is predicted positive

    def to_records(self) -> list[dict[str, float | None]]:
        """One dict per point; the infinite start threshold becomes ``None`` (valid JSON)."""
        return [
            {self.x_name: float(x), self.y_name: float(y), "threshold": float(t) if np.isfinite(t) else None}
            for x, y, t in zip(self.x, self.y, self.thresholds)
        ]


def _sample_thresholds(positives: np.ndarray, negatives: np.ndarray, num_points: int) -> np.ndarray:
    """Descending thresholds taken at evenly spaced ranks of each class, so both axes of a curve are
    sampled evenly; the lowest score of each class is included, so the curve reaches its end."""
    per_class = max(num_points // 2 - 1, 2)
    picks = [
        scores[np.linspace(0, scores.size - 1, min(per_class, scores.size)).round().astype(np.int64)]
        for scores in (positives, negatives)
        if scores.size
    ]
    return np.r_[np.inf, np.unique(np.concatenate(picks))[::-1]]


def roc_curve_points(labels: np.ndarray, scores: np.ndarray, num_points: int = 200) -> Curve:
    """Exact ROC points (fpr, tpr) at <= ``num_points`` thresholds, from (0, 0) to (1, 1).

    >>> curve = roc_curve_points(np.array([0, 1]), np.array([0.2, 0.7]))
    >>> curve.x.tolist(), curve.y.tolist()
    ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    positives, negatives = _split_sorted(labels, scores)
    if negatives.size == 0:
        raise ValueError("no negative labels: the ROC curve is undefined")
    thresholds = _sample_thresholds(positives, negatives, num_points)
    tpr = _count_at_or_above(positives, thresholds) / positives.size
    fpr = _count_at_or_above(negatives, thresholds) / negatives.size
    return Curve("fpr", "tpr", fpr, tpr, thresholds)


def pr_curve_points(labels: np.ndarray, scores: np.ndarray, num_points: int = 200) -> Curve:
    """Exact precision-recall points at <= ``num_points`` thresholds; precision is 1 where nothing
    is predicted positive (sklearn's convention).

    >>> curve = pr_curve_points(np.array([0, 1]), np.array([0.2, 0.7]))
    >>> curve.x.tolist(), curve.y.tolist()
    ([0.0, 1.0, 1.0], [1.0, 1.0, 0.5])
    """
    positives, negatives = _split_sorted(labels, scores)
    thresholds = _sample_thresholds(positives, negatives, num_points)
    true_pos = _count_at_or_above(positives, thresholds)
    predicted = true_pos + _count_at_or_above(negatives, thresholds)
    precision = np.divide(true_pos, predicted, out=np.ones(len(thresholds)), where=predicted > 0)
    return Curve("recall", "precision", true_pos / positives.size, precision, thresholds)


# --------------------------------------------------------------------------------------------
# classification metrics: accuracy, confusion matrix, mIoU
# --------------------------------------------------------------------------------------------


def _class_arrays(true: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true shape {true.shape} does not match pred shape {pred.shape}")
    if true.size == 0:
        raise ValueError("no samples")
    for name, values in (("true", true), ("pred", pred)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class ids, got {values.dtype}")
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} holds class ids outside [0, {num_classes})")
    return true.ravel(), pred.ravel()


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]`` over all elements (any shape, e.g. label maps).

    >>> confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), 3).tolist()
    [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
    """
    true, pred = _class_arrays(true, pred, num_classes)
    counts = np.zeros(num_classes * num_classes, dtype=np.int64)
    for start in range(0, true.size, _CHUNK):  # bounded int64 temporaries for pixel-level use
        pairs = true[start : start + _CHUNK].astype(np.int64) * num_classes + pred[start : start + _CHUNK]
        counts += np.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def type_accuracy(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Share of images whose predicted class (0 = normal, 1..C = anomaly types) is right.

    >>> type_accuracy(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]))
    0.75
    """
    true, pred = np.asarray(true_labels), np.asarray(pred_labels)
    if true.shape != pred.shape:
        raise ValueError(f"true shape {true.shape} does not match pred shape {pred.shape}")
    if true.size == 0:
        raise ValueError("no samples")
    return float(np.mean(true == pred))


def class_recall(matrix: np.ndarray) -> np.ndarray:
    """Recall per true class (row) of a confusion matrix; NaN for a class absent from the truth.

    >>> class_recall(np.array([[3, 1], [0, 0]])).tolist()
    [0.75, nan]
    """
    hits = np.diag(matrix).astype(np.float64)
    rows = matrix.sum(axis=1)
    return np.divide(hits, rows, out=np.full(len(hits), np.nan), where=rows > 0)


def balanced_accuracy(true_labels: np.ndarray, pred_labels: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in the truth: a classifier that calls every image
    normal scores 1/(number of classes) here, however many normal images the test set holds.

    >>> balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2)
    0.5
    """
    return float(np.nanmean(class_recall(confusion_matrix(true_labels, pred_labels, num_classes))))


def per_type_image_auroc(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> np.ndarray:
    """(C+1,) image AUROC of each anomaly type's images against the normal images (index 0 and
    types without images are NaN): which types the image score finds and which it misses.

    >>> per_type_image_auroc(np.array([0, 0, 1, 2]), np.array([0.1, 0.3, 0.2, 0.9]), 3).tolist()
    [nan, 0.5, 1.0]
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    out = np.full(num_classes, np.nan)
    normal = labels == 0
    if not normal.any():
        return out
    for c in range(1, num_classes):
        chosen = normal | (labels == c)
        if (labels == c).any():
            out[c] = auroc(labels[chosen] == c, scores[chosen])
    return out


def worst_failures(labels: np.ndarray, scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(normal images with the highest scores, anomalous images with the lowest), up to `count`
    each, worst first: the false positives and negatives a person should look at first.

    >>> [a.tolist() for a in worst_failures(np.array([0, 0, 1, 1]), np.array([0.2, 0.9, 0.1, 0.8]), 1)]
    [[1], [2]]
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels > 0)
    positives = normal[np.argsort(-scores[normal], kind="stable")][:count]
    negatives = anomalous[np.argsort(scores[anomalous], kind="stable")][:count]
    return positives, negatives


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """IoU per class from a confusion matrix; NaN for a class absent from truth and prediction.

    >>> class_iou(np.array([[1, 0, 0], [0, 0, 1], [0, 0, 2]])).tolist()
    [1.0, 0.0, 0.6666666666666666]
    """
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - hits
    return np.divide(hits, union, out=np.full(len(hits), np.nan), where=union > 0)


def pixel_miou(true_label_maps: np.ndarray, pred_label_maps: np.ndarray, num_classes: int) -> float:
    """Macro mean IoU over the C+1 classes of per-pixel class maps.

    A class absent from both truth and prediction is skipped: its IoU is 0/0, and counting it as 0
    or 1 would reward or punish a test set for the types it happens not to contain.

    >>> true = np.array([[[0, 0], [1, 1]]])
    >>> pixel_miou(true, np.array([[[0, 0], [0, 1]]]), num_classes=3)
    0.5833333333333333
    """
    ious = class_iou(confusion_matrix(true_label_maps, pred_label_maps, num_classes))
    return float(np.nanmean(ious))


# --------------------------------------------------------------------------------------------
# AUPRO: area under the per-region-overlap curve
# --------------------------------------------------------------------------------------------


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y) over [0, limit]; x is non-decreasing from 0 and
    reaches past ``limit``, which is interpolated on the segment that crosses it."""
    inside = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


@dataclass(frozen=True)
class _RegionPixels:
    """Every ground-truth anomalous pixel with its 8-connected region (ids 0..count-1 over the set)."""

    region_ids: np.ndarray
    scores: np.ndarray
    count: int


def _region_pixels(masks: np.ndarray, maps: np.ndarray) -> _RegionPixels:
    ids, scores, count = [], [], 0
    for index in np.flatnonzero(masks.any(axis=(1, 2))):
        found, labels = cv2.connectedComponents(masks[index].astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        ids.append(labels[masks[index]] - 1 + count)
        scores.append(maps[index][masks[index]])
        count += found - 1  # cv2 counts the background as a component
    if not ids:
        return _RegionPixels(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=maps.dtype), 0)
    return _RegionPixels(np.concatenate(ids), np.concatenate(scores), count)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve (mean overlap per GT region vs. FPR on normal pixels) up to
    ``fpr_limit``, divided by ``fpr_limit`` so it lies in [0, 1]; a random detector scores
    ``fpr_limit / 2``. Raises ``ValueError`` without anomalous or without normal pixels.

    Exact over every distinct score, not a threshold grid. Regions are labelled once; the region
    pixels are sorted once, and cumulative sums of their weights 1 / (regions × region size) give PRO
    at each of their scores; the normal pixels are sorted once, and ``searchsorted`` gives FPR there.
    Between two region scores PRO is flat, so region scores are the only vertices the area needs (a
    tie group is a diagonal segment, as in the ROC convention). ``aupro_reference`` is the textbook
    loop over thresholds.

    >>> masks = np.zeros((1, 4, 4), dtype=bool); masks[0, :2, :2] = True
    >>> maps = np.where(masks, 0.9, 0.1)
    >>> aupro(masks, maps), aupro(masks, 1.0 - maps)
    (1.0, 0.0)
    """
    masks, maps = _masks_and_maps(masks, maps)
    _check_fpr_limit(fpr_limit)
    regions = _region_pixels(masks, maps)
    if regions.count == 0:
        raise ValueError("no anomalous pixels: AUPRO is undefined")
    normal_sorted = maps[~masks]
    if normal_sorted.size == 0:
        raise ValueError("no normal pixels: the FPR of AUPRO is undefined")
    normal_sorted.sort()

    # every region counts once whatever its size: its pixels share a weight of 1 / regions.count
    weights = 1.0 / (regions.count * np.bincount(regions.region_ids)[regions.region_ids])
    order = np.argsort(regions.scores)[::-1]  # the order inside a tie group is irrelevant
    region_scores = regions.scores[order]
    pro_at_or_above = np.cumsum(weights[order])
    last_of_tie = np.r_[region_scores[1:] != region_scores[:-1], True]
    values = region_scores[last_of_tie]
    pro_ge = pro_at_or_above[last_of_tie]
    fpr_ge = _count_at_or_above(normal_sorted, values) / normal_sorted.size
    fpr_gt = (normal_sorted.size - np.searchsorted(normal_sorted, values, side="right")) / normal_sorted.size

    # vertices starting past the limit only continue the flat stretch after the last one kept
    kept = int(np.searchsorted(fpr_gt, fpr_limit, side="right"))
    pro_steps = np.r_[0.0, pro_ge[:kept]]
    fpr = np.r_[0.0, np.column_stack([fpr_gt[:kept], fpr_ge[:kept]]).ravel(), 1.0]
    pro = np.r_[0.0, np.column_stack([pro_steps[:-1], pro_steps[1:]]).ravel(), pro_steps[-1]]
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_reference(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 200
) -> float:
    """The straightforward AUPRO loop (as in the common MVTec AD evaluation scripts), kept to
    check and benchmark ``aupro``.

    For each of ``num_thresholds`` evenly spaced thresholds from max to min score, for each image:
    binarise the map (score >= t), label the ground truth's connected components (8-connected,
    scipy, independent of ``aupro``'s cv2 labelling), take each region's overlap, and count false
    positives on normal pixels. The curve starts at (0, 0) and is integrated by trapezoids up to
    ``fpr_limit``. The coarse grid makes it slightly lower than the exact ``aupro`` on concave
    curves.

    >>> masks = np.zeros((1, 4, 4), dtype=bool); masks[0, :2, :2] = True
    >>> aupro_reference(masks, np.where(masks, 0.9, 0.1))
    1.0
    """
    masks, maps = _masks_and_maps(masks, maps)
    _check_fpr_limit(fpr_limit)
    if not masks.any():
        raise ValueError("no anomalous pixels: AUPRO is undefined")
    n_normal = int((~masks).sum())
    if n_normal == 0:
        raise ValueError("no normal pixels: the FPR of AUPRO is undefined")
    structure = np.ones((3, 3), dtype=bool)

    fprs, pros = [0.0], [0.0]
    for threshold in np.linspace(maps.max(), maps.min(), num_thresholds):
        overlaps, false_positives = [], 0
        for mask, amap in zip(masks, maps):
            predicted = amap >= threshold
            false_positives += int(np.count_nonzero(predicted & ~mask))
            labels, found = ndimage.label(mask, structure=structure)
            for region in range(1, found + 1):
                overlaps.append(predicted[labels == region].mean())
        fprs.append(false_positives / n_normal)
        pros.append(float(np.mean(overlaps)))
    return _area_up_to(np.array(fprs), np.array(pros), fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------
# the evaluate step's result
# --------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Everything the evaluate step reports; NaN marks a metric undefined on the test set."""

    image_auroc: float
    pixel_auroc: float
    aupro: float
    type_accuracy: float
    pixel_miou: float
    image_f1_max: float
    pixel_f1_max: float
    balanced_accuracy: float = float("nan")  # mean per-class recall over the C+1 classes

    def to_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in asdict(self).items()}

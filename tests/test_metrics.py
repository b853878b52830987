"""Metrics: hand-computed cases, agreement with scikit-learn, fast AUPRO vs the textbook loop."""

from __future__ import annotations

import doctest
import json

import cv2
import numpy as np
import pytest
from sklearn import metrics as skm

from discriminator import metrics
from discriminator.metrics import (
    Metrics,
    aupro,
    aupro_reference,
    auroc,
    best_f1,
    confusion_matrix,
    f1_max,
    image_scores,
    pixel_auroc,
    pixel_miou,
    pr_curve_points,
    roc_curve_points,
    type_accuracy,
)


def _tied_scores(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and rounded scores (many ties) that only partly separate the classes."""
    labels = rng.random(size) < 0.3
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)
    return labels, scores


def _blob_data(seed: int, count: int = 12, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Masks of random ellipses and imperfect score maps (weak responses, noisy background)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for mask in masks:
        for _ in range(rng.integers(0, 3)):
            centre = tuple(int(c) for c in rng.integers(0, size, 2))
            axes = tuple(int(a) for a in rng.integers(1, size // 4, 2))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    masks[0, 5:9, 5:9] = 1  # at least one region whatever the seed
    strength = rng.uniform(0.1, 1.0, (count, 1, 1)).astype(np.float32)
    maps = np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2) for m in masks]) * strength
    maps += rng.normal(0, 0.15, maps.shape).astype(np.float32)
    return masks.astype(bool), maps


def test_docstring_examples_run():
    result = doctest.testmod(metrics)
    assert result.attempted >= 15 and result.failed == 0


# ---------------------------------------------------------------- image scores


def test_image_scores_top_k_spans_max_to_mean():
    maps = np.random.default_rng(0).random((3, 4, 5))
    np.testing.assert_allclose(image_scores(maps, 1), maps.max(axis=(1, 2)))
    np.testing.assert_allclose(image_scores(maps, 20), maps.mean(axis=(1, 2)))
    top3 = np.sort(maps.reshape(3, -1), axis=1)[:, -3:].mean(axis=1)
    np.testing.assert_allclose(image_scores(maps, 3), top3)


@pytest.mark.parametrize("top_k", [0, 21])
def test_image_scores_rejects_top_k_outside_the_map(top_k):
    with pytest.raises(ValueError, match="top_k"):
        image_scores(np.zeros((1, 4, 5)), top_k)


# ---------------------------------------------------------------- AUROC


@pytest.mark.parametrize(
    ("scores", "expected"),
    [([0.1, 0.2, 0.8, 0.9], 1.0), ([0.9, 0.8, 0.2, 0.1], 0.0), ([0.5, 0.5, 0.5, 0.5], 0.5), ([0.1, 0.7, 0.7, 0.9], 0.875)],
)
def test_auroc_hand_computed(scores, expected):
    assert auroc(np.array([0, 0, 1, 1]), np.array(scores)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    labels, scores = _tied_scores(np.random.default_rng(seed), 2000)
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn_and_chunking_changes_nothing(monkeypatch):
    masks, maps = _blob_data(3)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(metrics, "_CHUNK", 97)
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auroc_single_class_is_an_error(labels):
    with pytest.raises(ValueError, match="no (positive|negative) labels"):
        auroc(np.array(labels), np.array([0.1, 0.2, 0.3]))


def test_ranking_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3)))


# ---------------------------------------------------------------- F1-max and curves


def _sklearn_f1_max(labels, scores) -> float:
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_sklearn_at_image_and_pixel_level(seed):
    labels, scores = _tied_scores(np.random.default_rng(seed), 500)
    assert f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)
    masks, maps = _blob_data(seed)
    assert f1_max(masks, maps) == pytest.approx(_sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-12)


def test_best_f1_threshold_reproduces_its_f1():
    labels, scores = _tied_scores(np.random.default_rng(4), 500)
    best = best_f1(labels, scores)
    assert skm.f1_score(labels, scores >= best.threshold) == pytest.approx(best.f1)


def test_f1_max_perfect_detector():
    assert f1_max(np.array([0, 0, 1]), np.array([0.3, 0.2, 0.4])) == 1.0


def test_roc_curve_points_lie_on_the_exact_curve():
    labels, scores = _tied_scores(np.random.default_rng(5), 20_000)
    curve = roc_curve_points(labels, scores, num_points=200)
    assert len(curve.x) <= 200
    assert (curve.x[0], curve.y[0], curve.x[-1], curve.y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(curve.x) >= 0) and np.all(np.diff(curve.y) >= 0)
    finite = np.isfinite(curve.thresholds)
    predicted = scores[None, :] >= curve.thresholds[finite, None]
    np.testing.assert_allclose(curve.y[finite], (predicted & labels).sum(1) / labels.sum())
    np.testing.assert_allclose(curve.x[finite], (predicted & ~labels).sum(1) / (~labels).sum())
    # abs 0.01 is no rounding allowance: straight lines between 200 points of the exact curve miss
    # the area of the steps dropped between them (2.5e-6 on this data); it caps that thinning error
    assert np.trapezoid(curve.y, curve.x) == pytest.approx(auroc(labels, scores), abs=0.01)


def test_pr_curve_points_match_direct_counts_and_serialise():
    labels, scores = _tied_scores(np.random.default_rng(6), 5000)
    curve = pr_curve_points(labels, scores, num_points=100)
    assert len(curve.x) <= 100 and (curve.x[0], curve.y[0]) == (0.0, 1.0) and curve.x[-1] == 1.0
    finite = np.isfinite(curve.thresholds)
    predicted = scores[None, :] >= curve.thresholds[finite, None]
    true_pos = (predicted & labels).sum(1)
    np.testing.assert_allclose(curve.y[finite], true_pos / predicted.sum(1))
    np.testing.assert_allclose(curve.x[finite], true_pos / labels.sum())
    records = json.loads(json.dumps(curve.to_records(), allow_nan=False))
    assert records[0] == {"recall": 0.0, "precision": 1.0, "threshold": None}
    assert set(records[-1]) == {"recall", "precision", "threshold"}


# ---------------------------------------------------------------- classification metrics


def test_confusion_matrix_matches_sklearn_also_chunked(monkeypatch):
    rng = np.random.default_rng(7)
    true, pred = rng.integers(0, 4, (5, 9, 9)), rng.integers(0, 4, (5, 9, 9))
    expected = skm.confusion_matrix(true.ravel(), pred.ravel(), labels=range(4))
    np.testing.assert_array_equal(confusion_matrix(true, pred, 4), expected)
    monkeypatch.setattr(metrics, "_CHUNK", 50)
    np.testing.assert_array_equal(confusion_matrix(true, pred, 4), expected)


def test_confusion_matrix_rejects_unknown_classes():
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 3)


def test_type_accuracy():
    true, pred = np.array([0, 1, 2, 3, 3]), np.array([0, 1, 1, 3, 0])
    assert type_accuracy(true, pred) == pytest.approx(0.6) == skm.accuracy_score(true, pred)
    with pytest.raises(ValueError, match="no samples"):
        type_accuracy(np.array([]), np.array([]))


def test_pixel_miou_skips_classes_absent_from_truth_and_prediction():
    true = np.array([[[0, 0], [1, 1]]])
    # class 2 absent everywhere: skipped; class 3 only predicted: IoU 0, counted
    pred = np.array([[[0, 0], [1, 3]]])
    assert pixel_miou(true, pred, num_classes=4) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert pixel_miou(true, true, num_classes=4) == 1.0


def test_pixel_miou_matches_sklearn_jaccard():
    rng = np.random.default_rng(8)
    true, pred = rng.integers(0, 3, (4, 8, 8)), rng.integers(0, 4, (4, 8, 8))
    expected = skm.jaccard_score(true.ravel(), pred.ravel(), average="macro")
    assert pixel_miou(true, pred, num_classes=5) == pytest.approx(expected)


# ---------------------------------------------------------------- AUPRO


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """Region A = one pixel (0.9); region B = two pixels (0.8, 0.1); 9 normals: 0.85, 0.5, seven 0."""
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 2, 2] = masks[0, 2, 3] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, 0], maps[0, 2, 2], maps[0, 2, 3] = 0.9, 0.8, 0.1
    maps[0, 1, 1], maps[0, 0, 3] = 0.85, 0.5
    return masks, maps


@pytest.mark.parametrize(("fpr_limit", "expected"), [(0.3, 13 / 18), (0.2, 11 / 18)])
def test_aupro_hand_computed(fpr_limit, expected):
    # PRO vs FPR: (0,0) (0,.5) (1/9,.5) (1/9,.75) (2/9,.75) (2/9,1) ... (1,1); area / fpr_limit
    masks, maps = _two_region_case()
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected)
    # the reference sees the curve only at 2001 evenly spaced thresholds (exact here: the maps hold
    # few values); abs 2e-3 allows a few grid steps of 1/2000 should the grid fall between scores
    assert aupro_reference(masks, maps, fpr_limit, num_thresholds=2001) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("implementation", [aupro, aupro_reference])
def test_aupro_uses_8_connected_regions(implementation):
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True  # one region diagonally, two 4-connected
    maps = np.where(np.arange(16).reshape(1, 4, 4) == 0, 1.0, 0.0)
    # one region, 1/3 found at FPR 0, then a straight line to (1, 1): (0.3/3 + 0.09/3) / 0.3
    assert implementation(masks, maps) == pytest.approx(13 / 30)


@pytest.mark.parametrize("implementation", [aupro, aupro_reference])
def test_aupro_perfect_inverted_and_constant(implementation):
    masks, _ = _blob_data(1)
    perfect = masks.astype(float)
    assert implementation(masks, perfect) == pytest.approx(1.0)
    assert implementation(masks, 1.0 - perfect) == pytest.approx(0.0)
    # a constant map jumps from (0, 0) to (1, 1): the diagonal, area fpr_limit² / 2
    assert implementation(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_fast_agrees_with_reference(seed):
    masks, maps = _blob_data(seed)
    assert abs(aupro(masks, maps) - aupro_reference(masks, maps)) < 0.005


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_is_exact_when_the_grid_holds_every_score(fpr_limit):
    # integer scores 0..20 with ties everywhere: a 21-threshold grid visits every distinct score
    masks, maps = _blob_data(5)
    quantised = np.clip(np.round(maps * 10 + 5), 0, 20)
    quantised[0, 0, 0], quantised[0, 0, 1] = 0, 20
    expected = aupro_reference(masks, quantised, fpr_limit, num_thresholds=21)
    assert aupro(masks, quantised, fpr_limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("implementation", [aupro, aupro_reference])
def test_aupro_undefined_cases_are_errors(implementation):
    with pytest.raises(ValueError, match="no anomalous pixels"):
        implementation(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal pixels"):
        implementation(np.ones((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        implementation(np.ones((2, 4, 4), bool), np.zeros((2, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        implementation(np.ones((4, 4), bool), np.zeros((4, 4)))


# ---------------------------------------------------------------- result record


def test_metrics_to_dict_is_json_ready():
    result = Metrics(np.float64(0.9), 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
    as_dict = result.to_dict()
    assert list(as_dict) == [
        "image_auroc", "pixel_auroc", "aupro", "type_accuracy", "pixel_miou", "image_f1_max", "pixel_f1_max",
        "balanced_accuracy",
    ]
    assert json.loads(json.dumps(as_dict))["image_auroc"] == 0.9


# ---------------------------------------------------------------- per-class diagnostics


def test_balanced_accuracy_is_not_fooled_by_the_majority_class():
    # 7 normal, 2 + 1 anomalous: "all normal" has 70 % accuracy but a third balanced accuracy
    true = np.array([0] * 7 + [1, 1, 2])
    all_normal = np.zeros_like(true)
    assert metrics.type_accuracy(true, all_normal) == pytest.approx(0.7)
    assert metrics.balanced_accuracy(true, all_normal, 3) == pytest.approx(1 / 3)
    # one of each anomalous class found, one normal lost: (6/7 + 1/2 + 1) / 3
    pred = np.array([0] * 6 + [1, 1, 0, 2])
    assert metrics.balanced_accuracy(true, pred, 3) == pytest.approx((6 / 7 + 0.5 + 1.0) / 3)
    assert metrics.balanced_accuracy(true, pred, 3) == pytest.approx(skm.balanced_accuracy_score(true, pred))


def test_class_recall_skips_classes_absent_from_the_truth():
    recall = metrics.class_recall(confusion_matrix(np.array([0, 0, 2]), np.array([0, 1, 2]), 3))
    assert recall[0] == 0.5 and np.isnan(recall[1]) and recall[2] == 1.0


def test_per_type_image_auroc_ranks_each_type_against_the_normals_only():
    labels = np.array([0, 0, 0, 1, 1, 2])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9, 0.05])
    out = metrics.per_type_image_auroc(labels, scores, 4)
    assert np.isnan(out[0]) and np.isnan(out[3])  # normal itself, and a type without images
    assert out[1] == pytest.approx(skm.roc_auc_score([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.9]))
    assert out[2] == 0.0  # the lone type-2 image scores below every normal
    assert np.isnan(metrics.per_type_image_auroc(np.array([1, 2]), np.array([0.1, 0.2]), 3)).all()


def test_worst_failures_are_the_highest_normals_and_lowest_anomalies():
    labels = np.array([0, 1, 0, 2, 0, 1])
    scores = np.array([0.3, 0.2, 0.9, 0.95, 0.5, 0.1])
    positives, negatives = metrics.worst_failures(labels, scores, 2)
    assert positives.tolist() == [2, 4] and negatives.tolist() == [5, 1]
    positives, negatives = metrics.worst_failures(labels, scores, 10)
    assert sorted(positives.tolist()) == [0, 2, 4] and len(negatives) == 3

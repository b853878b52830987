"""Evaluate: every output file written with sane values, the reference protocol kept apart, and a
checkpoint that does not fit the manifest refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from discriminator.predict import decide, type_mass_by_level
from core.errors import InputError
from pipelines.evaluate import overlay_indices, reference_prediction, run_evaluate
from core.images import read_image
from core.manifest import Manifest
from pipelines.train import run_train
from tests.test_data import write_frozen_dataset, write_manifest
from tests.test_train import tiny_params

METRIC_NAMES = ["image_auroc", "pixel_auroc", "aupro", "type_accuracy", "pixel_miou", "image_f1_max", "pixel_f1_max",
                "balanced_accuracy"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    manifest = write_manifest(root / "prepared", anomaly_shots=1)
    run_train(tiny_params(steps=16), write_frozen_dataset(root / "synthetic"), manifest, root / "model",
              show_progress=False)
    result = run_evaluate(tiny_params(), root / "model", manifest, root / "reports")
    return root, manifest, result


def test_metrics_json_holds_both_protocols_with_sane_values(evaluated):
    root, _, result = evaluated
    written = json.loads((root / "reports/metrics.json").read_text())
    assert written == result
    for protocol in (written, written["reference_protocol"]):
        for name in METRIC_NAMES:
            assert 0.0 <= protocol[name] <= 1.0, name
    # the easy problem is learnt even in a few steps
    assert written["image_auroc"] > 0.9 and written["pixel_auroc"] > 0.9 and written["type_accuracy"] > 0.5
    # min-max normalisation is affine: ranking metrics cannot move, only threshold-based ones may
    for name in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
        assert written["reference_protocol"][name] == pytest.approx(written[name])
    assert written["test_images"] == 12 and written["images_per_second"] > 0


def leaves(tree, prefix=""):
    """(dotted key, value) of every leaf of a nested JSON object: what `dvc metrics show` tabulates."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_metrics_json_holds_numbers_only_and_the_words_go_to_report_md(evaluated):
    """DVC shows every metrics.json value as a column: a sentence there made it hundreds wide."""
    root, _, result = evaluated
    written = json.loads((root / "reports/metrics.json").read_text())
    for key, value in leaves(written):
        assert value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), key
    report = (root / "reports/report.md").read_text()
    assert "normalised over the test set" in report and "scored on cpu" in report
    assert f"| image_auroc | {100 * result['image_auroc']:.1f} |" in report


def test_curves_and_figures_are_written(evaluated):
    root, *_ = evaluated
    reports = root / "reports"
    roc = json.loads((reports / "plots/image_roc.json").read_text())
    assert roc[0]["fpr"] == 0.0 and roc[-1]["fpr"] == 1.0 and roc[-1]["tpr"] == 1.0
    pr = json.loads((reports / "plots/pixel_pr.json").read_text())
    assert {"recall", "precision", "threshold"} == set(pr[0])
    assert (reports / "plots/pixel_roc.json").is_file() and (reports / "plots/image_pr.json").is_file()
    for figure in ("confusion_matrix.png", "overlays.png", "failures.png"):
        assert read_image(reports / figure).shape[0] > 100


def test_per_type_report_agrees_with_the_overall_metrics(evaluated):
    root, manifest_path, result = evaluated
    report = json.loads((root / "reports/per_type.json").read_text())
    class_names = Manifest.load(manifest_path).class_names
    n = len(class_names)
    assert report["class_names"] == class_names
    assert sum(report["images"]) == result["test_images"]
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (n, n) and matrix.sum() == result["test_images"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(result["type_accuracy"])
    recalls = [r for r in report["recall"] if r is not None]
    assert np.mean(recalls) == pytest.approx(result["balanced_accuracy"])
    assert report["image_auroc"][0] is None
    assert all(len(report[key]) == n for key in ("image_auroc", "recall", "pixel_iou"))


def test_checkpoint_for_other_types_or_category_is_refused(evaluated, tmp_path):
    root, manifest_path, _ = evaluated
    manifest = Manifest.load(manifest_path)
    for change in ({"anomaly_types": ["spot", "scratch"]}, {"category": "carpet"}):
        other = tmp_path / f"{next(iter(change))}.json"
        dataclasses.replace(manifest, **change).save(other)
        with pytest.raises(InputError) as err:
            run_evaluate(tiny_params(), root / "model", other, tmp_path / "reports")
        assert str(root / "model") in str(err.value)
    empty = tmp_path / "empty.json"
    dataclasses.replace(manifest, test=[]).save(empty)
    with pytest.raises(InputError, match="no test images"):
        run_evaluate(tiny_params(), root / "model", empty, tmp_path / "reports")


@pytest.mark.parametrize("keep, fragment", [
    ("normal", r"the test set has \d+ normal and no anomalous images"),
    ("anomalous", r"the test set has \d+ anomalous and no normal images"),
])
def test_a_test_set_without_both_kinds_is_refused_and_writes_nothing(evaluated, tmp_path, keep, fragment):
    root, manifest_path, _ = evaluated
    manifest = Manifest.load(manifest_path)
    test = [s for s in manifest.test if s.is_normal == (keep == "normal")]
    one_sided = tmp_path / "one_sided.json"
    dataclasses.replace(manifest, test=test).save(one_sided)
    with pytest.raises(InputError, match=fragment) as err:
        run_evaluate(tiny_params(), root / "model", one_sided, tmp_path / "reports")
    assert str(one_sided) in str(err.value)
    assert not (tmp_path / "reports").exists()


def test_reference_protocol_equals_thresholding_normalised_maps():
    gen = torch.Generator().manual_seed(0)
    maps = 0.2 + 0.5 * torch.rand(4, 8, 8, generator=gen)
    probs = torch.softmax(torch.randn(4, 3, 8, 8, generator=gen), dim=1)
    class_ids = (probs.argmax(dim=1) + 1).to(torch.uint8)
    calibrated = decide(maps, class_ids, type_mass_by_level(maps, probs), 0.9, 0.9, top_k=5)
    reference = reference_prediction(calibrated, top_k=5)
    normalised = (maps - maps.min()) / (maps.max() - maps.min())
    expected = decide(normalised, class_ids, type_mass_by_level(normalised, probs), 0.5, 0.5, top_k=5)
    assert torch.equal(reference.type_maps, expected.type_maps)
    assert torch.equal(reference.anomalous, expected.anomalous)
    assert reference.type_maps.any() and not calibrated.type_maps.any()


def test_overlays_cover_every_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 3)
    picked = overlay_indices(labels, 4)
    assert len(picked) == 4 and {int(labels[i]) for i in picked} == {0, 1, 2}
    assert overlay_indices(labels, 0) == set()

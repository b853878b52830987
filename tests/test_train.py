"""Training: the loss falls on an easy problem, thresholds are calibrated and stored, the checkpoint
round-trips, and `train` reruns alone (and identically) from the frozen dataset."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from discriminator.config import (NORMAL_EMBEDDING, EvaluateConfig, TrainConfig, uses_evidence_branch,
                                  uses_normal_embedding)
from core.images import read_sample
from core.manifest import Manifest
from discriminator.memory import DEFECT_IMAGE_WEIGHT, FLIPS
from discriminator.model import Discriminator
from discriminator.predict import Predictor, images_to_tensor
from discriminator.train import (balanced_threshold, fit_platt, floored_threshold, matched_rate_threshold, poly_schedule,
                                 separating_threshold)
from pipelines.config import Params
from pipelines.train import run_train
from tests.test_data import SIZE, TYPES, write_frozen_dataset, write_manifest


def tiny_params(steps: int = 24) -> Params:
    # the paper's head: the loop's tests should not depend on the kNN memory of two random shots
    return Params(
        seed=0,
        image_size=SIZE,
        train=TrainConfig(steps=steps, batch_size=8, width=32, lr=3e-3, holdout_fraction=0.25, device="cpu",
                          detection_head="mean_logit"),
        evaluate=EvaluateConfig(batch_size=8, image_top_k=20, overlays=4, device="cpu"),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dataset = write_frozen_dataset(root / "synthetic", rows=24)
    manifest = write_manifest(root / "prepared", anomaly_shots=1)
    result = run_train(tiny_params(), dataset, manifest, root / "model", show_progress=False)
    return root, dataset, manifest, result


def train_knn(trained, name: str, steps: int, **train_settings):
    """Train a `knn`-head variant on the module's dataset: (its TrainResult, its checkpoint folder)."""
    root, dataset, manifest, _ = trained
    params = tiny_params(steps=steps)
    params.train.detection_head = "knn"
    for key, value in train_settings.items():
        setattr(params.train, key, value)
    return run_train(params, dataset, manifest, root / name, show_progress=False), root / name


def test_loss_decreases_on_an_easy_problem(trained):
    root, *_, result = trained
    log = json.loads((root / "model/train_log.json").read_text())
    losses = [entry["total"] for entry in log["log"]]
    assert len(losses) == result.steps == 24
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert {"focal", "dice", "ce", "lr"} <= set(log["log"][0])
    assert log["images_per_second"] > 0 and log["device"] == "cpu"


def test_calibrated_thresholds_are_stored_in_the_checkpoint(trained):
    root, *_, result = trained
    calibration = result.calibration
    assert calibration.holdout_images == 6 and calibration.normal_images == 2
    assert calibration.pixel_f1 is not None and calibration.pixel_f1 > 0.3
    config = json.loads((root / "model/config.json").read_text())
    assert config["pixel_threshold"] == pytest.approx(calibration.pixel_threshold)
    assert 0 < config["pixel_threshold"] < 1 and config["image_top_k"] == 20
    assert config["image_threshold"] == pytest.approx(calibration.image_threshold)


def test_checkpoint_round_trip_gives_identical_outputs(trained):
    root, *_ = trained
    model = Discriminator.from_pretrained(root / "model", expected_category="tile")
    again = Discriminator.from_pretrained(root / "model")
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(images), again(images)
    assert torch.equal(a.detection_logits, b.detection_logits) and torch.equal(a.class_logits, b.class_logits)
    assert model.config.class_names == TYPES


def test_train_reruns_alone_and_reproducibly(trained):
    root, dataset, manifest, _ = trained
    first = run_train(tiny_params(steps=2), dataset, manifest, root / "rerun_a", show_progress=False)
    second = run_train(tiny_params(steps=2), dataset, manifest, root / "rerun_b", show_progress=False)
    a = Discriminator.from_pretrained(root / "rerun_a").state_dict()
    b = Discriminator.from_pretrained(root / "rerun_b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.final_loss == second.final_loss


@pytest.mark.parametrize("head", ["memory", "knn"])
def test_memory_head_trains_with_a_filled_memory_and_loads_in_full_mode(trained, head):
    root, dataset, manifest, _ = trained
    params = tiny_params(steps=3)
    params.train.detection_head = head
    run_train(params, dataset, manifest, root / head, show_progress=False)
    model = Discriminator.from_pretrained(root / head)
    memory = model.memory
    # 2 normal shots x a quarter of one view's stride-8 cells (the default fraction; a coreset of 4 flips)
    assert model.config.memory_shape == [2, (SIZE // 8) ** 2 // 4]
    assert memory.bank.abs().sum() > 0 and memory.stats[1] > 0
    assert memory.leave_one_out is False  # leave-one-out is for training data painted on the shots only
    # the manifest has a real anomaly shot per type: its defect cells form the memory's second bank
    assert model.config.defect_memory_entries == memory.defect_entries > 0 and "defects" in memory.parts
    # ... whose term reaches the image map above its maximum on the normal shots' views
    assert model.config.defect_image_weight == memory.defect_image_weight == DEFECT_IMAGE_WEIGHT
    assert "defect_ceiling" in dict(memory.named_buffers())  # saved with the checkpoint, loaded back


def test_defect_memory_off_keeps_the_real_defects_out_of_the_memory(trained):
    root, dataset, manifest, _ = trained
    params = tiny_params(steps=3)
    params.train.detection_head, params.train.defect_memory = "knn", False
    run_train(params, dataset, manifest, root / "no_defects", show_progress=False)
    model = Discriminator.from_pretrained(root / "no_defects")
    assert model.config.defect_memory_entries == 0 and model.memory.defect_entries == 0
    assert model.config.defect_image_weight == 0.0
    assert "defects" not in model.memory.parts


@pytest.mark.parametrize("image_weight", [0.0, 2.0])
def test_learned_evidence_leaves_the_pixel_cut_and_the_floor_to_the_distance(trained, image_weight):
    # the evidence is built after training, so both runs train the same weights; the pixel cut's F1
    # is chosen on the distance alone (held-out synthetic rows are what the evidence knows best) and
    # the cut carried over to the new map; the image score adds the evidence only above the normal
    # shots' maximum, so the floor from their views is the distance's
    results, models = [], []
    for weight in (0.0, 2.0):
        result, out = train_knn(trained, f"learned_{weight}_{image_weight}", steps=3, learned_weight=weight,
                                image_evidence_weight=image_weight)
        results.append(result)
        models.append(Discriminator.from_pretrained(out))
    assert models[1].config.learned_weight == 2.0 and models[1].detection_head.has_learned
    assert models[1].config.image_evidence_weight == image_weight and models[0].config.image_evidence_weight == 0
    assert results[0].calibration.pixel_f1 == results[1].calibration.pixel_f1
    assert results[0].calibration.pixel_threshold != results[1].calibration.pixel_threshold
    floors = [result.calibration.normal_view_max_score for result in results]
    assert floors[1] == pytest.approx(floors[0], rel=1e-5, abs=1e-7)
    if not image_weight:  # the image score is the distance's: so is its cut
        assert results[0].calibration.image_threshold == results[1].calibration.image_threshold
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(models[0](images).detection_logits, models[1](images).detection_logits)


def test_matched_rate_threshold_flags_the_same_share_of_the_other_scores():
    reference = np.arange(1000, dtype=np.float32)  # a cut at 949.5 flags 50 of them: 5 %
    scores = np.linspace(0, 1, 2000, dtype=np.float32) ** 2  # another spread of the same pixels
    threshold = matched_rate_threshold(reference, 949.5, scores)
    assert np.sum(scores > threshold) == 100
    # a cut that flags nothing stays above every score
    assert np.sum(scores > matched_rate_threshold(reference, 5000.0, scores)) == 0


def test_balanced_threshold_gives_up_a_normal_shot_and_the_floor_takes_it_back():
    # two normals: catching four more anomalies (TPR 0.2 -> 1.0) outweighs flagging one normal (FPR 0.5)
    labels = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    scores = np.array([0.9, 0.5, 0.45, 0.42, 0.41, 0.6, 0.3])
    threshold, _ = balanced_threshold(labels, scores)
    assert threshold < 0.6  # the 0.6 normal is flagged
    floored = floored_threshold(threshold, np.array([0.6, 0.58, 0.3]))
    assert floored == 0.6 and not 0.6 > floored  # decisions are score > threshold
    assert floored_threshold(threshold, np.zeros(0)) == threshold
    assert floored_threshold(0.7, np.array([0.6])) == 0.7  # a floor never lowers the cut


def test_no_flipped_normal_shot_is_flagged_by_the_calibrated_image_threshold(trained):
    """The image threshold's floor: every flip of every normal shot, scored leave-one-out as in
    calibration (as a new normal image would be), stays below it."""
    root, dataset, manifest, _ = trained
    params = tiny_params(steps=3)
    params.train.detection_head = "knn"
    result = run_train(params, dataset, manifest, root / "knn_floor", show_progress=False)
    calibration = result.calibration
    assert calibration.normal_view_max_score is not None
    model = Discriminator.from_pretrained(root / "knn_floor")
    model.memory.leave_one_out = True
    shots = images_to_tensor([read_sample(s, SIZE)[0] for s in Manifest.load(manifest).normal_shots])
    views = torch.cat([shots.flip(dims) if dims else shots for dims in FLIPS])
    prediction = Predictor(model, device="cpu")(views)
    assert float(prediction.scores.max()) == pytest.approx(calibration.normal_view_max_score, abs=1e-6)
    assert not prediction.anomalous.any()


def test_knn_head_scale_and_bias_are_platt_fitted_on_the_holdout_then_frozen(trained):
    root, dataset, manifest, _ = trained
    params = tiny_params(steps=3)
    params.train.detection_head = "knn"
    result = run_train(params, dataset, manifest, root / "knn_platt", show_progress=False)
    scale, bias = result.calibration.detection_scale, result.calibration.detection_bias
    assert scale is not None and bias is not None and (scale, bias) != (1.0, 0.0)
    head = Discriminator.from_pretrained(root / "knn_platt").detection_head
    # frozen: the three training steps left the fitted values exactly as they were
    assert head.scale.item() == pytest.approx(scale, rel=1e-6) and head.bias.item() == pytest.approx(bias, rel=1e-6)
    # the paper's head has nothing to fit
    assert json.loads((root / "model/train_log.json").read_text())["calibration"]["detection_scale"] is None


def test_knn_residual_head_starts_as_the_knn_head_and_training_moves_only_its_residual(trained):
    root, dataset, manifest, _ = trained
    params = tiny_params(steps=3)
    params.train.detection_head = "knn_residual"
    result = run_train(params, dataset, manifest, root / "knn_residual", show_progress=False)
    model = Discriminator.from_pretrained(root / "knn_residual")
    head = model.detection_head
    assert head.scale.item() == pytest.approx(result.calibration.detection_scale, rel=1e-6)
    assert head.residual[-1].weight.abs().sum() > 0  # trained away from its zero start
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(images).detection_logits
        head.parts = ("knn",)
        knn = model(images).detection_logits
        head.parts = ("learned",)
        learned = model(images).detection_logits
    # the two parts add up to the whole map (interpolation is linear)
    torch.testing.assert_close(whole, knn + learned, rtol=1e-4, atol=1e-4)
    # the knn part is the knn head's calibrated distance; zeroing the residual's last layer gives it back
    with torch.no_grad():
        head.residual[-1].weight.zero_()
        head.residual[-1].bias.zero_()
        head.parts = head.PARTS
        torch.testing.assert_close(model(images).detection_logits, knn)


def test_fit_platt_recovers_the_logistic_that_generated_the_labels():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-10, 30, 200_000)
    labels = rng.random(scores.size) < 1 / (1 + np.exp(-(0.25 * scores - 5.0)))
    scale, bias = fit_platt(scores, labels)
    assert scale == pytest.approx(0.25, abs=0.01) and bias == pytest.approx(-5.0, abs=0.2)
    # separable classes: the ridge keeps the fit finite
    scale, bias = fit_platt(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 0, 1, 1]))
    assert np.isfinite([scale, bias]).all() and scale > 0


def test_threshold_separates_neighbouring_float32_scores():
    low = np.float32(0.7)
    high = np.nextafter(low, np.float32(1))  # one float32 step apart: the float64 midpoint rounds onto `high`
    scores, labels = np.array([low, high], np.float32), np.array([0, 1])
    threshold, f1 = separating_threshold(labels, scores)
    assert f1 == 1.0
    np.testing.assert_array_equal(scores > np.float32(threshold), labels.astype(bool))
    threshold, _ = separating_threshold(np.array([1, 1]), scores)  # nothing below the cut
    assert (scores > np.float32(threshold)).all()


def test_separating_threshold_splits_the_classes_with_a_margin():
    labels = np.array([0, 0, 1, 1])
    threshold, f1 = separating_threshold(labels, np.array([0.1, 0.3, 0.7, 0.9]))
    assert f1 == 1.0 and threshold == pytest.approx(0.5)
    threshold, _ = separating_threshold(np.array([1, 1]), np.array([0.4, 0.6]))
    assert 0.39 < threshold < 0.4  # nothing below: just under the lowest positive, decisions are `>`


def test_balanced_threshold_protects_the_few_normals_that_f1_would_sacrifice():
    # 10 anomalies (3 scoring below the normals), 2 normals: F1 keeps every anomaly and accepts
    # both normals as false positives; balanced accuracy gives up the 3 anomalies instead
    labels = np.r_[np.ones(10, bool), np.zeros(2, bool)]
    scores = np.r_[np.linspace(0.6, 0.9, 7), 0.1, 0.15, 0.2, 0.3, 0.4]
    f1_cut, _ = separating_threshold(labels, scores)
    cut, balanced = balanced_threshold(labels, scores)
    assert f1_cut < 0.1 and 0.4 < cut < 0.6 and balanced == pytest.approx(0.85)
    assert balanced_threshold(np.array([1, 1], bool), np.array([0.4, 0.6]))[1] == 1.0


def test_poly_schedule_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = poly_schedule(optimizer, steps=10, power=1.0)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 1.0 and rates[5] == pytest.approx(0.5) and optimizer.param_groups[0]["lr"] == 0.0


def test_prototype_sources_are_the_real_shots_else_the_synthetic_training_rows():
    from types import SimpleNamespace

    from discriminator.data import ANOMALY_POOL, SYNTHETIC_POOL, LabelledImage, ShotPool
    from discriminator.train import prototype_sources

    def pool(value: int, n: int) -> ShotPool:
        return ShotPool.from_items([LabelledImage(np.full((4, 4, 3), value, np.uint8), np.ones((4, 4), np.int64))
                                    for _ in range(n)])

    real, synthetic = pool(200, 2), pool(100, 3)
    few_shot = SimpleNamespace(dataset=SimpleNamespace(pools={ANOMALY_POOL: real, SYNTHETIC_POOL: synthetic}),
                               anomaly_shots=len(real))
    zero_shot = SimpleNamespace(dataset=SimpleNamespace(pools={ANOMALY_POOL: pool(0, 0), SYNTHETIC_POOL: synthetic}),
                                anomaly_shots=0)
    sources = list(prototype_sources(few_shot))
    assert len(sources) == 2 and all(image.max() == pytest.approx(200 / 255) for image, _ in sources)
    sources = list(prototype_sources(zero_shot))
    assert len(sources) == 3 and all(image.max() == pytest.approx(100 / 255) for image, _ in sources)


def test_prototype_sources_are_decoded_as_they_are_read():
    """Thousands of synthetic rows feed the prototypes: never all of their tensors at once."""
    from types import SimpleNamespace

    from discriminator.data import SYNTHETIC_POOL, LabelledImage
    from discriminator.train import prototype_sources

    class CountingPool:
        decoded = 0

        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> LabelledImage:
            CountingPool.decoded += 1
            return LabelledImage(np.full((4, 4, 3), index, np.uint8), np.ones((4, 4), np.int64))

    data = SimpleNamespace(dataset=SimpleNamespace(pools={SYNTHETIC_POOL: CountingPool()}), anomaly_shots=0)
    sources = prototype_sources(data)
    assert CountingPool.decoded == 0  # nothing decoded before it is read
    first = next(sources)
    assert CountingPool.decoded == 1 and first[0].max() == 0
    assert [round(float(image.max()) * 255) for image, _ in sources] == [1, 2] and CountingPool.decoded == 3


def test_normal_embedding_is_trained_and_saved(trained):
    root, *_ = trained  # the module's checkpoint: real anomaly shots, so `auto` left it out
    assert json.loads((root / "model/config.json").read_text())["normal_embedding"] is False
    result, out = train_knn(trained, "normal_embedding", steps=4, normal_embedding="always")
    model = Discriminator.from_pretrained(out)
    assert model.config.normal_embedding and math.isfinite(result.final_loss)
    untrained = Discriminator(dataclasses.replace(model.config))  # the same seed's initial weights
    assert not torch.equal(model.normal_embedding, untrained.normal_embedding)


def test_auto_normal_embedding_only_without_real_anomaly_shots(tmp_path):
    assert [uses_normal_embedding(s, 0) for s in NORMAL_EMBEDDING] == [True, True, False]
    assert [uses_normal_embedding(s, 5) for s in NORMAL_EMBEDDING] == [False, True, False]
    dataset = write_frozen_dataset(tmp_path / "synthetic", rows=8)
    manifest = write_manifest(tmp_path / "prepared", anomaly_shots=0)
    run_train(tiny_params(steps=2), dataset, manifest, tmp_path / "model", show_progress=False)
    assert Discriminator.from_pretrained(tmp_path / "model").config.normal_embedding


def test_auto_with_real_anomaly_shots_trains_an_evidence_branch_with_the_normal_class(trained):
    assert [uses_evidence_branch(s, 1, "knn") for s in NORMAL_EMBEDDING] == [True, False, False]
    assert not uses_evidence_branch("auto", 0, "knn") and not uses_evidence_branch("auto", 1, "mean_logit")
    _, out = train_knn(trained, "evidence_branch", steps=4)  # the module's data has real anomaly shots
    model = Discriminator.from_pretrained(out)
    assert model.config.evidence_branch and not model.config.normal_embedding
    assert all(step["branch_ce"] > 0 for step in json.loads((out / "train_log.json").read_text())["log"])
    # its type prototypes are its own (the module's dataset predates the `mode` column: every row counts)
    assert model.config.branch_prototypes and model.branch_prototype_valid.all()
    assert not torch.allclose(model.branch_prototypes, model.type_prototypes)
    untrained = Discriminator(dataclasses.replace(model.config))  # the same seed's initial weights
    for name in ("normal_embedding", "embed.weight", "type_embeddings.weight"):
        trained_value = model.evidence_branch.get_parameter(name)
        assert not torch.equal(trained_value, untrained.evidence_branch.get_parameter(name)), name
    # `never`: no branch and no branch loss, and the very type logits the branch left alone (the same
    # seed and batches; each loss reaches only its own fusion)
    _, out = train_knn(trained, "no_branch", steps=4, normal_embedding="never")
    plain = Discriminator.from_pretrained(out)
    assert not plain.config.evidence_branch
    assert all(step["branch_ce"] == 0 for step in json.loads((out / "train_log.json").read_text())["log"])
    shared = [key for key in plain.state_dict() if key.startswith(("fusion.", "embed.", "type_embeddings."))]
    assert shared and not torch.equal(plain.embed.weight, untrained.embed.weight)  # trained, not initial
    for key in [*shared, "log_temperature"]:
        assert torch.equal(plain.state_dict()[key], model.state_dict()[key]), key


def test_the_evidence_branch_takes_its_prototypes_from_recipe_made_rows_only(tmp_path, trained):
    _, _, manifest, _ = trained
    labels = [i % len(TYPES) for i in range(24)]  # write_frozen_dataset's labels
    modes = ["few_shot" if label == 0 else "zero_shot" for label in labels]  # type 0: only pasted rows
    dataset = write_frozen_dataset(tmp_path / "synthetic", rows=24, modes=modes)
    params = tiny_params(steps=2)
    params.train.detection_head = "knn"
    run_train(params, dataset, manifest, tmp_path / "model", show_progress=False)
    model = Discriminator.from_pretrained(tmp_path / "model")
    assert model.config.branch_prototypes and model.branch_prototype_valid.tolist() == [False, *[True] * (len(TYPES) - 1)]
    assert model.prototype_valid.all()  # the type logits' from the real shots, one of each type


def test_evidence_loss_trains_the_type_logits_on_normal_pixels_too_and_is_not_saved(trained):
    # with the knn head the detection loss reaches no trained weight; the evidence objective is what
    # makes normal pixels (the shots, the synthetic rows' surroundings) count for the type logits
    # (`never`: the type logits' own evidence, no branch)
    logs, states = [], []
    for weight in (0.0, 1.0):
        _, out = train_knn(trained, f"evidence_{weight}", steps=4, evidence_loss=weight, normal_embedding="never")
        logs.append(json.loads((out / "train_log.json").read_text())["log"])
        states.append(Discriminator.from_pretrained(out).state_dict())
    assert all(step["evidence"] == 0.0 for step in logs[0])
    assert all(step["evidence"] > 0.0 for step in logs[1])
    assert states[0].keys() == states[1].keys()  # the objective's affine is a training device only
    assert not torch.equal(states[0]["embed.weight"], states[1]["embed.weight"])

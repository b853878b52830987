"""The learned evidence in the `knn` head's pixel map: what training on synthetic defects adds to the
distance to the normal shots (`Discriminator.build_learned_evidence`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import InputError
from discriminator.config import TrainConfig
from discriminator.memory import flipped_views
from discriminator.model import LEARNED_WEIGHT, Discriminator, learned_evidence
from discriminator.train import evidence_objective
from pipelines.evaluate import select_detection_part
from tests.test_memory import load_as_saved_before, make_model, shots

WEIGHT = LEARNED_WEIGHT


def knn_model(**overrides) -> Discriminator:
    model = make_model(detection_head="knn", **overrides).eval()
    model.build_memory(shots())
    with torch.no_grad():  # a Platt scale and bias as training would leave them
        model.detection_head.scale.fill_(2.0)
        model.detection_head.bias.fill_(-3.0)
    return model


def test_evidence_is_the_soft_maximum_of_the_type_logits():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]]).T.reshape(1, 2, 1, 2)  # pixel 0 ties, pixel 1 is one type
    evidence = learned_evidence(logits)
    assert evidence.shape == (1, 1, 1, 2)
    assert evidence[0, 0, 0, 0] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert evidence[0, 0, 0, 1] == pytest.approx(10.0, abs=1e-6)


def test_stats_are_those_of_the_normal_shots_and_their_flips():
    model = knn_model()
    normal = shots()
    with torch.no_grad():
        views = torch.cat([flipped_views(shot) for shot in normal])
        expected = learned_evidence(model.embed_and_type(views)[2])
        model.build_learned_evidence(normal, WEIGHT)
    assert model.config.learned_weight == WEIGHT
    torch.testing.assert_close(model.detection_head.learned_stats,
                               torch.stack([expected.mean(), expected.std()]))


@pytest.mark.parametrize("self_similarity", [False, True])
def test_without_an_image_weight_the_evidence_adds_to_the_pixel_map_only(self_similarity):
    model = knn_model(self_similarity=self_similarity)
    batch = torch.stack(shots(3))
    with torch.no_grad():
        before = model(batch)
        model.build_learned_evidence(shots(), WEIGHT)
        after = model(batch)
        head = model.detection_head
        z = head.evidence(model.embed_and_type(batch)[2])
    lift = F.interpolate(head.scale * WEIGHT * z, size=batch.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(after.detection_logits, before.detection_logits + lift, atol=1e-4, rtol=0)
    # image scores keep the distance to the shots: the image map is the old one (or, without
    # self-similarity, the old single map)
    old_image = before.image_logits if self_similarity else before.detection_logits
    torch.testing.assert_close(after.image_logits, old_image)


@pytest.mark.parametrize("self_similarity", [False, True])
def test_image_map_adds_the_evidence_above_its_maximum_on_the_shots(self_similarity):
    model = knn_model(self_similarity=self_similarity)
    normal, others = shots(), torch.stack(shots(4)[2:])
    with torch.no_grad():
        views = torch.cat([flipped_views(shot) for shot in normal])
        before = model(others)
        before_views = model(views)
        model.build_learned_evidence(normal, WEIGHT, image_weight=2.0)
        head = model.detection_head
        evidence = learned_evidence(model.embed_and_type(views)[2])
        after_views = model(views)
    assert model.config.image_evidence_weight == 2.0
    torch.testing.assert_close(head.evidence_ceiling, (evidence.max() - evidence.mean()) / evidence.std())
    # the shots' own views never exceed the maximum: their image scores, the threshold's floor, stay
    old_views = before_views.image_logits if self_similarity else before_views.detection_logits
    torch.testing.assert_close(after_views.image_logits, old_views, atol=1e-5, rtol=0)
    # a random model's other images stay below it too, so lower the ceiling to see the hinge at work
    with torch.no_grad():
        z = head.evidence(model.embed_and_type(others)[2])
        head.evidence_ceiling.fill_(float(z.median()))
        after = model(others)
    lift = F.interpolate(head.scale * 2.0 * (z - head.evidence_ceiling).clamp_min(0), size=others.shape[-2:],
                         mode="bilinear", align_corners=False)
    assert (lift > 0).float().mean() > 0.2 and (lift == 0).any()
    old_image = before.image_logits if self_similarity else before.detection_logits
    torch.testing.assert_close(after.image_logits, old_image + lift, atol=1e-4, rtol=0)


def test_ablation_scores_with_either_part_alone():
    model = knn_model(self_similarity=True)
    batch = torch.stack(shots(3))
    with torch.no_grad():
        before = model(batch).detection_logits
        with pytest.raises(InputError, match="learned_weight"):  # nothing learned to score with yet
            select_detection_part(model, "learned", "model")
        model.build_learned_evidence(shots(), WEIGHT)
        head = model.detection_head
        select_detection_part(model, "learned", "model")
        learned_only = model(batch)
        z = head.evidence(model.embed_and_type(batch)[2])
        expected = F.interpolate(head.scale * z + head.bias, size=batch.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(learned_only.detection_logits, expected)
        assert learned_only.image_logits is None  # one map, which the image score then reads
        head.parts, model.memory.parts = head.PARTS, ("shots", "self")
        select_detection_part(model, "knn", "model")  # the distance to the shots alone, no evidence
        knn_only = model(batch).detection_logits
    assert head.parts == ("knn",)
    assert not torch.allclose(knn_only, before)  # (before also had the image's own cells)
    model.memory.parts = ("shots", "self")
    head.parts = ("knn",)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).detection_logits, before)


def test_weight_zero_and_other_heads_leave_the_model_as_it_was():
    model = knn_model()
    model.build_learned_evidence(shots(), 0.0, image_weight=1.0)
    assert model.config.learned_weight == 0.0 and not hasattr(model.detection_head, "learned_stats")
    assert model.config.image_evidence_weight == 0.0 and not hasattr(model.detection_head, "evidence_ceiling")
    residual = make_model(detection_head="knn_residual").eval()
    residual.build_memory(shots())
    residual.build_learned_evidence(shots(), WEIGHT)
    assert residual.config.learned_weight == 0.0


def test_round_trips_and_older_checkpoints_load_without_it(tmp_path):
    model = knn_model(self_similarity=True)
    batch = torch.stack(shots(2))
    with torch.no_grad():
        plain = model(batch).detection_logits
    old = load_as_saved_before(model, tmp_path / "old", "learned_weight")
    assert old.config.learned_weight == 0.0
    with torch.no_grad():
        torch.testing.assert_close(old(batch).detection_logits, plain)
        model.build_learned_evidence(shots(), WEIGHT)
        pixel_only = model(batch)
    older = load_as_saved_before(model, tmp_path / "older", "image_evidence_weight")
    assert older.config.image_evidence_weight == 0.0 and not hasattr(older.detection_head, "evidence_ceiling")
    with torch.no_grad():
        torch.testing.assert_close(older(batch).image_logits, pixel_only.image_logits)
        model.build_learned_evidence(shots(), WEIGHT, image_weight=1.0)
    model.save_pretrained(tmp_path / "new")
    loaded = Discriminator.from_pretrained(tmp_path / "new")
    assert (loaded.config.learned_weight, loaded.config.image_evidence_weight) == (WEIGHT, 1.0)
    torch.testing.assert_close(loaded.detection_head.evidence_ceiling, model.detection_head.evidence_ceiling)
    with torch.no_grad():
        for name in ("detection_logits", "image_logits"):
            torch.testing.assert_close(getattr(loaded(batch), name), getattr(model(batch), name))


def test_evidence_objective_only_when_asked_and_the_knn_head_adds_the_evidence():
    model = knn_model()
    assert evidence_objective(model, TrainConfig()) is None  # off by default
    assert evidence_objective(model, TrainConfig(evidence_loss=0.5)).weight == 0.5
    assert evidence_objective(model, TrainConfig(evidence_loss=1.0, learned_weight=0.0)) is None  # nothing adds it
    assert evidence_objective(make_model(detection_head="mean_logit"), TrainConfig(evidence_loss=1.0)) is None

"""Self-similarity in the normal-shot memory: each cell against the rest of its own image."""

from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from discriminator.memory import NormalMemory, patch_features, self_distances, self_reference_mask
from discriminator.model import Discriminator
from discriminator.predict import Predictor, top_k_scores
from pipelines.evaluate import select_detection_part
from tests.test_memory import load_as_saved_before, make_model, shots


def test_self_distance_finds_the_one_odd_cell():
    features = torch.zeros(1, 2, 8, 8)
    features[0, :, 3, 5] = torch.tensor([3.0, 4.0])
    out = self_distances(features, radius=1, k=1, step=1)
    assert out.shape == (1, 1, 8, 8)
    assert out[0, 0, 3, 5] == pytest.approx(5.0)
    out[0, 0, 3, 5] = 0.0
    assert torch.all(out == 0)  # every other cell has identical cells outside its window


def test_self_distance_ignores_look_alikes_inside_the_window():
    features = torch.arange(64.0).view(1, 1, 8, 8) * 10  # every cell unique
    features[0, 0, 0, 1] = features[0, 0, 0, 0]  # except a twin right next to cell (0, 0)
    assert self_distances(features, radius=0, k=1, step=1)[0, 0, 0, 0] == 0  # the twin counts
    # radius 1 hides the twin; the nearest cell outside the window is (0, 2) (value 20)
    assert self_distances(features, radius=1, k=1, step=1)[0, 0, 0, 0] == pytest.approx(20.0)


def test_self_distance_takes_the_kth_nearest_so_a_few_repeats_do_not_vouch_for_each_other():
    features = torch.zeros(1, 1, 8, 8)
    features[0, 0, 0, 0] = features[0, 0, 7, 7] = 9.0  # a defect that appears twice, far apart
    assert self_distances(features, radius=1, k=1, step=1)[0, 0, 0, 0] == 0  # matches its repeat
    assert self_distances(features, radius=1, k=2, step=1)[0, 0, 0, 0] == pytest.approx(9.0)


@pytest.mark.parametrize("h, w, step", [(32, 32, 2), (8, 8, 2), (2, 2, 2), (1, 5, 1)])
def test_reference_mask_leaves_every_cell_k_candidates(h, w, step):
    near, k = self_reference_mask(h, w, 4, 5, step)
    refs = len(range(0, h, step)) * len(range(0, w, step))
    assert near.shape == (h * w, refs)
    assert 1 <= k <= 5 and (~near).sum(axis=1).min() >= k
    if (h, w) == (32, 32):  # a full grid keeps the window and k as asked
        assert k == 5 and near[0].sum() == 9  # refs at rows / columns 0, 2, 4 of the top-left corner


def test_memory_forward_is_the_mean_of_both_distances_then_the_image_part():
    generator = torch.Generator().manual_seed(0)
    shot_features = [torch.rand(4, 3, 16, 16, generator=generator) for _ in range(2)]
    memory = NormalMemory(0, 0, 3, [0], self_similarity=True)
    memory.fill(shot_features)
    # the stats describe the shots' own distances: a shot standardises to mean 0
    own = self_distances(shot_features[0][:1])
    assert memory.self_stats[1] > 0 and memory.self_stats[0] == pytest.approx(
        float(torch.cat([own.flatten(), self_distances(shot_features[1][:1]).flatten()]).mean()))
    query = [torch.rand(2, 3, 16, 16, generator=generator)]
    both = memory(query)
    memory.parts = ("shots",)
    to_shots = memory(query)
    memory.parts = ("self",)
    to_self = memory(query)
    assert both.shape == (2, 2, 16, 16) and to_shots.shape == to_self.shape == (2, 1, 16, 16)
    torch.testing.assert_close(both[:, :1], (to_shots + to_self) / 2)  # the pixel map
    torch.testing.assert_close(both[:, 1:], to_shots)  # the image map: the shots alone (IMAGE_PART)
    mean, std = memory.stats
    torch.testing.assert_close(to_shots, (memory.distances(patch_features(query, [0])) - mean) / std)


def test_self_similarity_alone_flags_a_foreign_square_on_a_periodic_surface():
    model = make_model(detection_head="knn", self_similarity=True).eval()
    model.build_memory(shots(size=128))
    select_detection_part(model, "self", "model")
    stripes = torch.zeros(3, 128, 128)
    stripes[:, :, ::8] = 1.0  # a regular surface: every patch has twins elsewhere in the image
    test = stripes.clone()
    test[:, 48:80, 48:80] = 0.5  # a grey square: unlike the rest of this image
    logits = model(test[None]).detection_logits[0, 0]
    assert logits[56:72, 56:72].mean() > logits[:24].mean() + 1.0


def test_checkpoint_round_trips_and_old_checkpoints_load_without_self_similarity(tmp_path):
    model = make_model(detection_head="knn", self_similarity=True).eval()
    model.build_memory(shots())
    model.save_pretrained(tmp_path / "new")
    batch = torch.stack(shots())
    loaded = Discriminator.from_pretrained(tmp_path / "new")
    assert loaded.memory.self_similarity
    torch.testing.assert_close(loaded(batch).detection_logits, model(batch).detection_logits)
    # saved before the key existed: loads with self-similarity off and scores as saved
    old = make_model(detection_head="knn").eval()
    old.build_memory(shots())
    loaded = load_as_saved_before(old, tmp_path / "old", "self_similarity")
    assert not loaded.memory.self_similarity
    torch.testing.assert_close(loaded(batch).detection_logits, old(batch).detection_logits)


def test_detection_part_needs_the_part_it_names():
    with pytest.raises(InputError, match="self_similarity"):
        select_detection_part(make_model(detection_head="knn"), "self", "model")
    with pytest.raises(InputError, match="knn_residual"):
        select_detection_part(make_model(detection_head="knn", self_similarity=True), "learned", "model")
    with pytest.raises(InputError, match="memory"):
        select_detection_part(make_model(detection_head="mean_logit"), "knn", "model")
    residual = make_model(detection_head="knn_residual", self_similarity=True)
    select_detection_part(residual, "knn", "model")
    assert residual.memory.parts == ("shots",) and residual.detection_head.parts == ("knn",)


def test_image_scores_read_the_distance_to_the_shots_and_maps_read_both():
    model = make_model(detection_head="knn", self_similarity=True).eval()
    model.build_memory(shots())
    batch = torch.stack(shots(size=64))
    output = model(batch)
    assert output.image_logits is not None and output.image_logits.shape == output.detection_logits.shape
    assert not torch.allclose(output.image_logits, output.detection_logits)
    prediction = Predictor(model, device="cpu")(batch)
    # (the Predictor runs channels-last: float32 sums in another order)
    torch.testing.assert_close(prediction.anomaly_maps, torch.sigmoid(output.detection_logits[:, 0]),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(prediction.scores, top_k_scores(torch.sigmoid(output.image_logits[:, 0]),
                                                               model.config.image_top_k), atol=1e-3, rtol=0)
    assert not torch.allclose(prediction.scores, top_k_scores(prediction.anomaly_maps, model.config.image_top_k),
                              atol=1e-2)
    # an ablation to one part leaves a single map, which the scores then read
    select_detection_part(model, "knn", "model")
    assert model(batch).image_logits is None

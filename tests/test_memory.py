"""The normal-shot memory and the memory detection head, on 64 px images and a random-weight backbone."""

from __future__ import annotations

import json

import pytest
import torch

from discriminator.memory import (DEFECT_IMAGE_WEIGHT, MEMORY_GAINS, NormalMemory, flipped_views, k_center_coreset,
                                  memory_levels, memory_views, nearest_distances, patch_features)
from discriminator.model import Discriminator, DiscriminatorConfig
from core.errors import InputError

RANDOM_LITE0 = {"name": "efficientnet_lite0", "pretrained": False}


def make_model(**overrides) -> Discriminator:
    torch.manual_seed(0)  # the random backbone's weights come from the global generator: same model every run
    config = DiscriminatorConfig(**{"category": "tile", "class_names": ["crack", "hole"], "backbone": RANDOM_LITE0,
                                    "width": 16, "detection_head": "memory", **overrides})
    return Discriminator(config)


def load_as_saved_before(model: Discriminator, folder, key: str) -> Discriminator:
    """Save `model`, drop `key` from its config.json (a checkpoint saved before the key existed), load it."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return Discriminator.from_pretrained(folder)


def shots(count: int = 2, size: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, size, size, generator=generator) for _ in range(count)]


def test_memory_levels_pick_the_wanted_strides_or_everything():
    assert memory_levels([4, 8, 16, 32]) == [1, 2, 3]  # default: strides 8, 16, 32
    assert memory_levels([4, 8, 16, 32], (8, 16)) == [1, 2]
    assert memory_levels([14, 14, 14]) == [0, 1, 2]


def test_nearest_distances_per_shot():
    bank = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[1.0, 0.0], [10.0, 0.0]]])  # 2 shots x 2 entries
    queries = torch.tensor([[0.0, 3.0], [0.0, 4.0]]).view(1, 2, 1, 2)  # points (0, 0) and (3, 4)
    out = nearest_distances(queries, bank, chunk=1)
    assert out.shape == (1, 2, 1, 2)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[0.0, 0.0], [1.0, 2.0 * 5 ** 0.5]]))


def test_leave_one_out_ignores_the_shot_an_image_matches_best():
    memory = NormalMemory(0, 0, 4, [0])
    a, b = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    memory.fill([a, b])
    assert torch.all(memory.distances(a) == 0)  # a is in the memory
    assert torch.allclose(memory.distances(a, leave_one_out=True), torch.full((1, 1, 2, 2), 2.0))  # only b left
    # the stats are those leave-one-out distances: a new normal image lands near 0 after standardising
    assert torch.allclose(memory.stats[0], torch.tensor(2.0))


def test_k_center_coreset_keeps_one_entry_per_cluster_and_bounds_the_gap():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    entries = (centres[:, None] + torch.randn(4, 25, 2, generator=generator)).reshape(-1, 2)
    picked = k_center_coreset(entries, 4)
    # one per cluster, each an actual entry
    assert sorted(int(i) for i in (picked[:, None] - centres).norm(dim=-1).argmin(dim=1)) == [0, 1, 2, 3]
    assert all(bool((entries == p).all(dim=1).any()) for p in picked)
    # a query's nearest distance rises by at most the largest gap of an entry to the coreset
    gap = torch.cdist(entries, picked).min(dim=1).values.max()
    queries = torch.randn(50, 2, generator=generator) * 60 + 50
    full, core = torch.cdist(queries, entries).min(dim=1).values, torch.cdist(queries, picked).min(dim=1).values
    assert bool((core >= full - 1e-4).all()) and bool((core <= full + gap + 1e-4).all())
    assert gap < 10  # within a cluster's spread, far below the clusters' distance
    assert torch.equal(k_center_coreset(entries, 200), entries)  # asked for more: all of them


def test_flipped_views_are_the_four_flips():
    image = torch.arange(12.0).view(1, 3, 4).expand(3, 3, 4)
    views = flipped_views(image)
    assert views.shape == (4, 3, 3, 4)
    assert torch.equal(views[1], image.flip(-1)) and torch.equal(views[3], image.flip(-1).flip(-2))


def test_memory_views_are_the_flips_at_each_exposure():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    views = memory_views(image)
    assert views.shape == (4 * len(MEMORY_GAINS), 3, 8, 8) and MEMORY_GAINS[0] == 1.0
    assert torch.equal(views[:4], flipped_views(image))  # view 0 is the shot: the stats are computed on it
    for i, gain in enumerate(MEMORY_GAINS[1:], start=1):
        torch.testing.assert_close(views[4 * i : 4 * i + 4], (flipped_views(image) * gain).clamp(0, 1))
    assert views.min() >= 0 and views.max() <= 1


@pytest.mark.parametrize("head", ["memory", "knn"])
def test_memory_head_needs_a_memory_then_scores_foreign_pixels_higher(head):
    model = make_model(detection_head=head).eval()
    normal = shots()
    with pytest.raises(RuntimeError, match="build_memory"):
        model(torch.stack(normal))
    model.build_memory(normal)
    # shots x a quarter of one view's stride-8 cells (the default fraction), from the 4 flips
    assert model.config.memory_shape == [2, 8 * 8 // 4]
    test = normal[0].clone()
    test[:, 16:48, 16:48] = 0.0  # a large black square: unlike anything in the memory
    logits = model(test[None]).detection_logits[0, 0]
    assert logits[24:40, 24:40].mean() > logits[:8].mean() + 1.0


@pytest.mark.parametrize("head", ["memory", "knn"])
def test_memory_head_round_trips_through_a_checkpoint(tmp_path, head):
    model = make_model(detection_head=head).eval()
    model.build_memory(shots())
    model.save_pretrained(tmp_path)
    loaded = Discriminator.from_pretrained(tmp_path)
    assert loaded.config.memory_shape == model.config.memory_shape
    batch = torch.stack(shots(size=64))
    torch.testing.assert_close(loaded(batch).detection_logits, model(batch).detection_logits)


def test_checkpoint_without_recorded_strides_loads_with_the_legacy_ones(tmp_path):
    """Checkpoints saved before `memory_strides` existed used strides 8 and 16: they must load with
    those (the bank's width says so) and score exactly as saved, not with today's default."""
    model = make_model(detection_head="knn", memory_strides=[8, 16]).eval()
    model.build_memory(shots())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["memory_strides"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Discriminator.from_pretrained(tmp_path)
    assert loaded.config.memory_strides == [8, 16] and loaded.memory.levels == [1, 2]
    batch = torch.stack(shots(size=64))
    torch.testing.assert_close(loaded(batch).detection_logits, model(batch).detection_logits)
    assert make_model(detection_head="knn").memory.levels == [1, 2, 3]  # today's default adds stride 32


@pytest.mark.parametrize("fraction, entries", [(1.0, 64), (0.5, 32), (4.0, 256), (0.001, 1)])
def test_memory_fraction_sets_the_entries_per_shot(fraction, entries):
    model = make_model(detection_head="knn", memory_fraction=fraction)
    model.build_memory(shots())
    assert model.config.memory_shape == [2, entries]  # 64 px: 8 x 8 stride-8 cells per view, 4 views


def test_bad_memory_fraction_is_an_input_error():
    with pytest.raises(InputError, match="memory_fraction"):
        make_model(memory_fraction=0.0)


@pytest.mark.parametrize("bad", [[], [0], ["8"], 8])
def test_bad_memory_strides_are_an_input_error(bad):
    with pytest.raises(InputError, match="memory_strides"):
        make_model(memory_strides=bad)


def test_memory_head_without_shots_is_an_input_error():
    with pytest.raises(InputError, match="normal shot"):
        make_model().build_memory([])


def test_other_heads_ignore_build_memory():
    model = make_model(detection_head="mean_logit")
    model.build_memory(shots())
    assert model.memory is None and model.config.memory_shape is None


def test_knn_head_detection_ignores_the_type_logits():
    model = make_model(detection_head="knn").eval()
    model.build_memory(shots())
    batch = torch.stack(shots(size=64))
    before = model(batch)
    with torch.no_grad():
        for p in model.embed.parameters():
            p.add_(torch.randn_like(p))
    after = model(batch)
    assert not torch.allclose(before.class_logits, after.class_logits)
    torch.testing.assert_close(after.detection_logits, before.detection_logits)


def defect_shot(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal-looking image with a saturated red square and its type map (type 1 on the square)."""
    image = shots(count=3, size=size)[2]
    type_map = torch.zeros(size, size, dtype=torch.long)
    image[:, 8:32, 8:32] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    type_map[8:32, 8:32] = 1
    return image, type_map


def with_red_square(image: torch.Tensor) -> torch.Tensor:
    test = image.clone()
    test[:, 32:56, 32:56] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return test


def test_fill_defects_keeps_the_cells_mostly_inside_the_mask():
    memory = NormalMemory(1, 4, 2, [0])
    features = torch.zeros(1, 2, 4, 4)
    features[0, :, 1, 1] = torch.tensor([5.0, 5.0])  # the cell under the mask
    features[0, :, 1, 2] = torch.tensor([7.0, 7.0])  # a cell only a quarter under it
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 4:8, 4:9] = True  # all of cell (1, 1), a quarter of cell (1, 2)
    memory.fill_defects([features], [mask])
    assert memory.defect_entries == 1 and memory.defect_bank.tolist() == [[5.0, 5.0]]
    assert memory.parts == ("shots", "defects")


def test_fill_defects_falls_back_to_the_most_defect_cell_and_caps_the_bank():
    memory = NormalMemory(1, 4, 2, [0])
    features = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)
    tiny = torch.zeros(1, 16, 16, dtype=torch.bool)
    tiny[0, 5, 5] = True  # under half of any cell
    memory.fill_defects([features], [tiny])
    assert memory.defect_bank.tolist() == [features[0, :, 1, 1].tolist()]
    empty = NormalMemory(1, 4, 2, [0])
    empty.fill_defects([features], [torch.zeros(1, 16, 16, dtype=torch.bool)])  # no defect, no cells
    assert empty.defect_entries == 0 and "defects" not in empty.parts
    everything = torch.ones(1, 16, 16, dtype=torch.bool)
    memory.fill_defects([features, features], [everything, everything], fraction=0.25)
    assert memory.defect_entries == 4  # a quarter of one view's 16 cells, for all shots together


def test_defect_memory_lifts_pixels_like_a_real_defect_in_the_pixel_map():
    model = make_model(detection_head="knn", self_similarity=True).eval()
    normal = shots()
    model.build_memory(normal)
    test = with_red_square(normal[0])[None]
    with torch.no_grad():
        before = model(test)
        model.build_defect_memory([defect_shot()], normal)
        after = model(test)
    assert model.config.defect_memory_entries == model.memory.defect_entries > 0
    lift = after.detection_logits[0, 0] - before.detection_logits[0, 0]
    assert lift.min() >= -1e-5 and lift[36:52, 36:52].mean() > 0.5  # the red square scores higher
    assert lift[:16, :16].abs().max() < lift[36:52, 36:52].mean() / 4  # plain texture barely moves


def test_defect_term_reaches_the_image_map_only_above_its_maximum_on_the_normal_views():
    """The image threshold's floor is the normal views' scores: they must not move, while a cell
    nearer to a real defect than anything normal ever was lifts the image map."""
    model = make_model(detection_head="knn", self_similarity=True).eval()
    normal = shots()
    model.build_memory(normal)
    memory = model.memory
    test = with_red_square(normal[0])[None]
    with torch.no_grad():
        features = model.backbone_features(test)
        views = [model.backbone_features(flipped_views(shot)) for shot in normal]  # each shot's flips
        before, views_before = memory(features), [memory(v) for v in views]
        memory.leave_one_out = True
        before_leave_one_out = memory(features)
        memory.leave_one_out = False
        model.build_defect_memory([defect_shot()], normal)
        assert model.config.defect_image_weight == memory.defect_image_weight == DEFECT_IMAGE_WEIGHT
        mean, std = memory.stats  # the ceiling: the largest term of a view scored leave-one-out
        queries = [patch_features(v, memory.levels) for v in views]
        expected = max(float(memory.defect_term(q, (memory.distances(q, leave_one_out=True) - mean) / std).max())
                       for q in queries)
        assert float(memory.defect_ceiling) == pytest.approx(expected)
        for v, v_before in zip(views, views_before):  # every view scores as before in the image map
            torch.testing.assert_close(memory(v)[:, 1:], v_before[:, 1:])
        after = memory(features)
        term = memory.defect_term(patch_features(features, memory.levels), before[:, 1:])
        hinge = DEFECT_IMAGE_WEIGHT * (term - memory.defect_ceiling).clamp_min(0)
        torch.testing.assert_close(after[:, 1:], before[:, 1:] + hinge)
        assert hinge.max() > 0  # the red square exceeds anything the normal views showed
        memory.leave_one_out = True  # training and calibration never see it
        torch.testing.assert_close(memory(features), before_leave_one_out)


def test_defect_ceiling_needs_a_defect_bank_and_round_trips(tmp_path):
    assert NormalMemory(1, 4, 2, [0], defect_image_weight=1.0).defect_image_weight == 0.0  # no bank, no term
    model = make_model(detection_head="knn", self_similarity=True).eval()
    normal = shots()
    model.build_memory(normal)
    test = with_red_square(normal[0])[None]
    with torch.no_grad():
        plain = model(test).image_logits
        model.build_defect_memory([defect_shot()], normal)
        memory = model.memory
        memory.defect_ceiling.fill_(-1.0)  # as if the views were far from every defect: the hinge fires
        model.save_pretrained(tmp_path / "new")
        loaded = Discriminator.from_pretrained(tmp_path / "new")
        assert float(loaded.memory.defect_ceiling) == -1.0
        torch.testing.assert_close(loaded(test).image_logits, model(test).image_logits)
        assert not torch.allclose(model(test).image_logits, plain)
        # a checkpoint saved before the ceiling existed: its image map reads the shots alone
        del memory._buffers["defect_ceiling"]
        memory.defect_image_weight = 0.0
        old = load_as_saved_before(model, tmp_path / "old", "defect_image_weight")
        assert old.memory.defect_image_weight == 0.0 and old.memory.defect_entries > 0
        torch.testing.assert_close(old(test).image_logits, plain)


def test_defect_memory_is_off_leave_one_out_and_in_the_one_part_ablation():
    """Training and calibration score synthetic rows pasted from these very defects, and the ablation
    asks what the normal shots alone say: neither may see the defect term."""
    model = make_model(detection_head="knn").eval()
    model.build_memory(shots())
    test = with_red_square(shots()[0])[None]
    memory = model.memory
    with torch.no_grad():
        memory.leave_one_out = True
        plain_leave_one_out = model(test).detection_logits
        memory.leave_one_out = False
        plain = model(test).detection_logits
        model.build_defect_memory([defect_shot()], shots())
        assert memory.parts == ("shots", "defects")
        assert not torch.allclose(model(test).detection_logits, plain)
        memory.leave_one_out = True
        torch.testing.assert_close(model(test).detection_logits, plain_leave_one_out)
        memory.leave_one_out, memory.parts = False, ("shots",)  # evaluate.detection_part=knn
        torch.testing.assert_close(model(test).detection_logits, plain)


def test_defect_memory_round_trips_and_older_checkpoints_load_without_it(tmp_path):
    model = make_model(detection_head="knn").eval()
    model.build_memory(shots())
    old = load_as_saved_before(model, tmp_path / "old", "defect_memory_entries")
    assert old.memory.defect_entries == 0 and "defects" not in old.memory.parts
    model.build_defect_memory([defect_shot()], shots())
    model.save_pretrained(tmp_path / "new")
    loaded = Discriminator.from_pretrained(tmp_path / "new")
    assert loaded.config.defect_memory_entries == model.memory.defect_entries
    assert loaded.memory.parts == model.memory.parts == ("shots", "defects")
    test = with_red_square(shots()[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(test).detection_logits, model(test).detection_logits)

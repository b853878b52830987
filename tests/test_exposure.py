"""Exposure matching: every image brought to the normal shots' mean and contrast before the backbone."""

from __future__ import annotations

import pytest
import torch

from discriminator.exposure import exposure_statistics, match_exposure
from discriminator.model import Discriminator
from tests.test_memory import load_as_saved_before, make_model, shots


def test_statistics_are_each_images_mean_and_standard_deviation():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = exposure_statistics(images)
    torch.testing.assert_close(stats[:, 0], images.flatten(1).mean(dim=1))
    torch.testing.assert_close(stats[:, 1], images.flatten(1).std(dim=1, unbiased=False))


def test_matched_images_take_the_reference_statistics_and_stay_in_range():
    generator = torch.Generator().manual_seed(1)
    dim = 0.1 + 0.2 * torch.rand(2, 3, 16, 16, generator=generator)  # dark, low contrast
    matched = match_exposure(dim, torch.tensor([0.5, 0.1]))
    torch.testing.assert_close(exposure_statistics(matched), torch.tensor([[0.5, 0.1], [0.5, 0.1]]),
                               rtol=0, atol=1e-5)
    bright = match_exposure(torch.rand(1, 3, 16, 16, generator=generator), torch.tensor([0.9, 0.3]))
    assert bright.min() >= 0 and bright.max() <= 1  # clipped, never out of range
    flat = match_exposure(torch.full((1, 3, 4, 4), 0.7), torch.tensor([0.4, 0.1]))
    torch.testing.assert_close(flat, torch.full((1, 3, 4, 4), 0.4))  # a flat image: the mean, no blow-up


def test_a_model_with_exposure_matching_ignores_a_global_gain_and_offset():
    model = make_model(detection_head="knn", exposure_match=True).eval()
    normals = shots()
    model.set_exposure_reference(normals)
    expected = exposure_statistics(torch.stack(normals)).mean(dim=0)
    torch.testing.assert_close(model.exposure_reference, expected)
    model.build_memory(normals)
    image = 0.25 + 0.5 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    darker = 0.6 * image + 0.05  # stays inside [0, 1]: no clipping, the same image up to exposure
    same, other = model(image), model(darker)
    torch.testing.assert_close(other.detection_logits, same.detection_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(other.class_logits, same.class_logits, rtol=1e-3, atol=1e-3)
    plain = make_model(detection_head="knn").eval()  # without it, the exposure change shows
    plain.build_memory(normals)
    assert not torch.allclose(plain(darker).detection_logits, plain(image).detection_logits, atol=1e-2)


def test_reference_round_trips_and_old_checkpoints_load_without_matching(tmp_path):
    model = make_model(detection_head="knn", exposure_match=True).eval()
    model.set_exposure_reference(shots())
    model.build_memory(shots())
    model.save_pretrained(tmp_path / "new")
    loaded = Discriminator.from_pretrained(tmp_path / "new")
    assert loaded.config.exposure_match
    torch.testing.assert_close(loaded.exposure_reference, model.exposure_reference)
    batch = torch.stack(shots())
    torch.testing.assert_close(loaded(batch).detection_logits, model(batch).detection_logits)
    old = make_model(detection_head="knn").eval()
    old.build_memory(shots())
    loaded = load_as_saved_before(old, tmp_path / "old", "exposure_match")
    assert not loaded.config.exposure_match and not hasattr(loaded, "exposure_reference")
    torch.testing.assert_close(loaded(batch).detection_logits, old(batch).detection_logits)


@pytest.mark.parametrize("on", [False, True])
def test_setting_the_reference_is_a_no_op_when_matching_is_off(on):
    model = make_model(exposure_match=on)
    model.set_exposure_reference(shots())
    assert hasattr(model, "exposure_reference") == on

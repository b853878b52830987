"""Few-shot regions: cut, augment and place keep defect pixels and mask aligned."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from core.errors import InputError
from synthesis.regions import RegionPatch, augment_region, cut_regions, place_region

SIZE = 96
RED = np.array([220, 30, 30], np.uint8)
MTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd"


def _surface(seed: int = 0) -> np.ndarray:
    """Gray-blue noise: never close to RED, so a red pixel can only be a defect pixel."""
    rng = np.random.default_rng(seed)
    gray = rng.integers(60, 160, (SIZE, SIZE), dtype=np.uint8)
    return np.stack([gray // 2, gray, gray], axis=2)


def _with_defects(mask: np.ndarray) -> np.ndarray:
    image = _surface()
    image[mask] = RED
    return image


def _disc(mask: np.ndarray, centre: tuple[int, int], radius: int) -> np.ndarray:
    out = mask.astype(np.uint8)
    cv2.circle(out, centre, radius, 1, -1)
    return out.astype(bool)


def _redness(image: np.ndarray) -> np.ndarray:
    """Per-pixel closeness to RED in [0, 1] (1 = exactly red)."""
    return 1.0 - np.abs(image.astype(np.float32) - RED).mean(axis=2) / 255.0


def _is_red(image: np.ndarray) -> np.ndarray:
    return _redness(image) > 0.85


# ---------------------------------------------------------------- cut


def test_cut_one_patch_per_separate_defect_with_context():
    mask = _disc(np.zeros((SIZE, SIZE), bool), (20, 20), 5)
    mask = _disc(mask, (70, 70), 8)
    patches = cut_regions(_with_defects(mask), mask, context=6)
    assert sorted(p.area for p in patches) == sorted([int(mask[:45].sum()), int(mask[45:].sum())])
    for patch in patches:
        assert patch.image.shape[:2] == patch.mask.shape
        assert _is_red(patch.image)[patch.mask].all()
        assert not _is_red(patch.image)[~patch.mask].any()
        # context on every side: the defect does not touch the patch border
        assert not (patch.mask[0].any() or patch.mask[-1].any() or patch.mask[:, 0].any() or patch.mask[:, -1].any())


def test_cut_merges_close_fragments_and_drops_specks():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[40:43, 10:30] = True
    mask[40:43, 34:60] = True  # a broken crack: 4 px gap < 2 * context
    mask[85, 85] = True  # an anti-aliasing speck far away
    patches = cut_regions(_with_defects(mask), mask, context=4, min_area=4)
    assert len(patches) == 1
    assert patches[0].area == int(mask.sum()) - 1


def test_cut_keeps_a_mask_made_only_of_specks():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[10, 10] = mask[80, 80] = True
    patches = cut_regions(_with_defects(mask), mask, context=3, min_area=4)
    assert len(patches) == 1 and patches[0].area == 2


def test_cut_clips_context_at_the_image_border():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:5, :5] = True
    (patch,) = cut_regions(_with_defects(mask), mask, context=8)
    assert patch.mask.shape == (13, 13)
    assert patch.mask[:5, :5].all()


def test_cut_empty_mask_is_an_input_error():
    with pytest.raises(InputError, match="empty"):
        cut_regions(_surface(), np.zeros((SIZE, SIZE), bool))


# ---------------------------------------------------------------- augment


def _red_patch() -> RegionPatch:
    mask = np.zeros((30, 40), bool)
    mask[8:14, 5:35] = True  # an elongated defect: transposes and rotations show
    mask[14:24, 28:34] = True
    image = _surface()[:30, :40].copy()
    image[mask] = RED
    return RegionPatch(image, mask)


@pytest.mark.parametrize("seed", range(12))
def test_augment_keeps_mask_and_pixels_aligned(seed):
    patch = _red_patch()
    out = augment_region(patch, np.random.default_rng(seed))
    assert out.image.shape[:2] == out.mask.shape and out.image.dtype == np.uint8
    assert 0.5 * patch.area < out.area < 1.6 * patch.area
    red = _is_red(out.image)
    # Interpolation may soften a one-pixel rim; the bulk must stay exactly aligned.
    assert red[out.mask].mean() > 0.9
    assert red[~out.mask].mean() < 0.02
    assert _redness(out.image)[out.mask].mean() > 0.9


def test_augment_is_deterministic_and_varies_with_the_generator():
    patch = _red_patch()
    a = augment_region(patch, np.random.default_rng(1))
    b = augment_region(patch, np.random.default_rng(1))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    shapes = {augment_region(patch, np.random.default_rng(s)).mask.tobytes() for s in range(6)}
    assert len(shapes) > 1


# ---------------------------------------------------------------- place


def test_place_lands_on_the_foreground_and_changes_nothing_else():
    target = _surface(3)
    foreground = np.zeros((SIZE, SIZE), bool)
    foreground[20:80, 30:90] = True
    patch = _red_patch()
    for seed in range(8):
        composite, mask = place_region(patch, target, foreground, np.random.default_rng(seed))
        assert mask.shape == foreground.shape and mask.any()
        assert not (mask & ~foreground).any()
        assert mask.sum() >= 0.5 * patch.area
        np.testing.assert_array_equal(composite[~mask], target[~mask])
        assert (composite[mask] == RED).all()


def test_place_is_deterministic_per_generator():
    patch, target = _red_patch(), _surface(3)
    a = place_region(patch, target, None, np.random.default_rng(4))
    b = place_region(patch, target, None, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_place_downscales_a_patch_larger_than_the_target():
    mask = np.ones((150, 120), bool)
    image = np.broadcast_to(RED, (150, 120, 3)).copy()
    composite, placed = place_region(RegionPatch(image, mask), _surface(), None, np.random.default_rng(0))
    assert composite.shape == (SIZE, SIZE, 3)
    assert placed.sum() >= 0.5 * SIZE * SIZE * 120 / 150
    assert (composite[placed] == RED).all()


def test_place_gives_up_after_bounded_tries():
    patch = RegionPatch(np.broadcast_to(RED, (12, 12, 3)).copy(), np.ones((12, 12), bool))
    foreground = np.zeros((SIZE, SIZE), bool)
    foreground[:, 50] = True  # one column: at most 1/12 of the defect can land on it
    with pytest.raises(InputError, match="3 tries"):
        place_region(patch, _surface(), foreground, np.random.default_rng(0), max_tries=3)


@pytest.mark.parametrize(
    "foreground", [np.zeros((SIZE, SIZE), bool), np.ones((SIZE, SIZE + 2), bool)], ids=["empty", "wrong-shape"]
)
def test_place_bad_foreground_is_an_input_error(foreground):
    with pytest.raises(InputError):
        place_region(_red_patch(), _surface(), foreground, np.random.default_rng(0))


# ---------------------------------------------------------------- real data


@pytest.mark.mtd
def test_cut_and_place_real_mtd_defects():
    masks = sorted((MTD / "MT_Blowhole" / "Imgs").glob("*.png"))[:3] if MTD.exists() else []
    if not masks:
        pytest.skip(f"MTD data not found at {MTD}")
    target = np.full((256, 256, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    for mask_path in masks:
        image = cv2.imread(str(mask_path.with_suffix(".jpg")), cv2.IMREAD_COLOR)[..., ::-1]
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
        if not mask.any():
            continue
        for patch in cut_regions(image, mask):
            assert patch.area > 0
            composite, placed = place_region(augment_region(patch, rng), target, None, rng)
            np.testing.assert_array_equal(composite[~placed], target[~placed])

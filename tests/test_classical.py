"""The classical backend: recipes paint only inside the mask, visibly, deterministically."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.errors import InputError
from synthesis.backends.base import PaintRequest
from synthesis.backends.classical import (
    FEW_SHOT_BLENDS,
    RECIPES,
    ClassicalBackend,
    default_recipe_for,
    feathered_composite,
)
from synthesis.noise import fractal_noise

SIZE = 64
LINE_RECIPES = {"crack", "scratch"}


def _surface(seed: int = 0, gray: bool = True) -> np.ndarray:
    """A textured normal surface, mid-gray so darkening and brightening both show."""
    rng = np.random.default_rng(seed)
    base = fractal_noise((SIZE, SIZE), 4, rng) * 80 + 90
    if gray:
        return np.repeat(base.astype(np.uint8)[..., None], 3, axis=2)
    tint = np.array([1.0, 0.8, 0.6], dtype=np.float32)
    return (base[..., None] * tint).astype(np.uint8)


def _blob() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (30, 34), (14, 9), 25, 0, 360, 1, -1)
    return mask.astype(bool)


def _line() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.polylines(mask, [np.array([(6, 10), (30, 30), (58, 40)])], False, 1, 3)
    return mask.astype(bool)


def _mask_for(recipe: str) -> np.ndarray:
    return _line() if recipe in LINE_RECIPES else _blob()


def _paint(recipe: str, strengths, seed: int = 7, image=None, mask=None, per_strength: int = 1):
    image = _surface() if image is None else image
    mask = _mask_for(recipe) if mask is None else mask
    backend = ClassicalBackend(recipes={"defect": recipe}, candidates_per_strength=per_strength)
    request = PaintRequest(image=image, mask=mask, anomaly_type="defect", prompt="", seed=seed)
    return image, mask, backend.paint([request], strengths)[0]


def _inside_change(candidate, image, mask) -> float:
    return float(np.abs(candidate.image.astype(np.float32) - image).mean(axis=2)[mask].mean())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_keeps_outside_and_changes_inside(recipe):
    image, mask, candidates = _paint(recipe, [0.4, 0.5, 0.6])
    assert [c.strength for c in candidates] == [0.4, 0.5, 0.6]
    assert [c.index for c in candidates] == [0, 1, 2]
    for candidate in candidates:
        assert candidate.image.dtype == np.uint8 and candidate.image.shape == image.shape
        np.testing.assert_array_equal(candidate.image[~mask], image[~mask])
        np.testing.assert_array_equal(candidate.mask, mask)
    assert _inside_change(candidates[1], image, mask) > 5.0


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_effect_grows_with_strength(recipe):
    # Candidate 0 of each call draws from the same generator, so only the strength differs.
    image, mask, (weak,) = _paint(recipe, [0.2])
    _, _, (strong,) = _paint(recipe, [0.9])
    assert _inside_change(strong, image, mask) > 1.3 * _inside_change(weak, image, mask)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_is_deterministic_per_seed(recipe):
    _, _, first = _paint(recipe, [0.5], seed=3, per_strength=2)
    _, _, again = _paint(recipe, [0.5], seed=3, per_strength=2)
    _, _, other = _paint(recipe, [0.5], seed=4, per_strength=2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(first[0].image, other[0].image)
    assert not np.array_equal(first[0].image, first[1].image)  # candidates differ within a request


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gray_surface_stays_gray(recipe):
    _, _, candidates = _paint(recipe, [0.8])
    painted = candidates[0].image
    np.testing.assert_array_equal(painted[..., 0], painted[..., 1])
    np.testing.assert_array_equal(painted[..., 0], painted[..., 2])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_mask_touching_the_border(recipe):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:10, :12] = True
    image, _, candidates = _paint(recipe, [0.6], mask=mask, image=_surface(gray=False))
    np.testing.assert_array_equal(candidates[0].image[~mask], image[~mask])
    assert _inside_change(candidates[0], image, mask) > 2.0


def test_chip_is_a_dark_void_at_its_deepest():
    image, mask, candidates = _paint("chip", [0.6])
    deep = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3) >= 5
    assert candidates[0].image[deep].mean() < 0.6 * image[deep].mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fray_roughens_the_texture_inside(seed):
    image, mask, candidates = _paint("fray", [0.6], seed=seed)
    rough = lambda im: np.abs(cv2.Laplacian(im[..., 0].astype(np.float32), cv2.CV_32F))[mask].mean()  # noqa: E731
    assert rough(candidates[0].image) > 2.0 * rough(image)


def test_candidates_per_strength_multiplies_candidates():
    _, _, candidates = _paint("texture", [0.4, 0.6], per_strength=3)
    assert [c.strength for c in candidates] == [0.4] * 3 + [0.6] * 3
    assert [c.index for c in candidates] == list(range(6))


def test_feathered_composite_fades_in_from_the_border():
    image = np.full((SIZE, SIZE, 3), 100, np.uint8)
    painted = np.full_like(image, 200)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:48, 16:48] = True
    out = feathered_composite(image, painted, mask)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert 100 < out[16, 32, 0] < out[20, 32, 0] <= out[32, 32, 0] == 200


@pytest.mark.parametrize(
    ("anomaly_type", "recipe"),
    [
        ("crack", "crack"),
        ("break", "chip"),
        ("MT_Break", "chip"),
        ("fray", "fray"),
        ("scratch", "scratch"),
        ("thin_line", "scratch"),
        ("blowhole", "hole"),
        ("pit", "hole"),
        ("spot", "dark_spot"),
        ("dot", "dark_spot"),
        ("bright_spot", "bright_spot"),
        ("uneven", "shift"),
        ("Stain", "shift"),
        ("color", "shift"),
        ("contamination", "shift"),
        ("smear", "smear"),
        ("something_else", "mix"),
    ],
)
def test_default_recipe_for_keywords(anomaly_type, recipe):
    assert default_recipe_for(anomaly_type) == recipe
    assert recipe in RECIPES


def test_configured_recipe_overrides_the_keyword():
    backend = ClassicalBackend(recipes={"crack": "smear"})
    assert backend.recipe_for("crack") == "smear"
    assert backend.recipe_for("blowhole") == "hole"


def test_unknown_recipe_is_an_input_error_listing_known_names():
    with pytest.raises(InputError, match="known") as info:
        ClassicalBackend(recipes={"crack": "lightning"})
    assert "lightning" in str(info.value) and "texture" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"mask": np.zeros((SIZE, SIZE), bool)},
        {"mask": np.ones((SIZE, SIZE + 1), bool)},
        {"image": np.zeros((SIZE, SIZE), np.uint8)},
        {"reference": np.zeros((SIZE, SIZE + 1, 3), np.uint8)},
    ],
)
def test_bad_requests_are_input_errors(bad):
    fields = dict(image=_surface(), mask=_blob(), anomaly_type="crack", prompt="", seed=0) | bad
    with pytest.raises(InputError):
        ClassicalBackend().paint([PaintRequest(**fields)], [0.5])


@pytest.mark.parametrize("strengths", [[], [1.5], [-0.1]])
def test_bad_strengths_are_input_errors(strengths):
    request = PaintRequest(image=_surface(), mask=_blob(), anomaly_type="crack", prompt="", seed=0)
    with pytest.raises(InputError):
        ClassicalBackend().paint([request], strengths)


# ---------------------------------------------------------------- few-shot


def _few_shot_request(mask: np.ndarray) -> PaintRequest:
    image = _surface(1, gray=False)
    rng = np.random.default_rng(2)
    reference = image.copy()
    defect = image[mask].astype(np.int16) - 70 + rng.integers(-20, 20, (int(mask.sum()), 3))
    reference[mask] = np.clip(defect, 0, 255).astype(np.uint8)
    return PaintRequest(image=image, mask=mask, anomaly_type="blowhole", prompt="", seed=5, reference=reference)


@pytest.mark.parametrize("where", ["middle", "border"])
def test_few_shot_blends_keep_outside_and_carry_the_defect(where):
    mask = _blob()
    if where == "border":
        mask = np.zeros((SIZE, SIZE), bool)
        mask[SIZE - 9 :, :14] = True
    request = _few_shot_request(mask)
    candidates = ClassicalBackend(candidates_per_strength=2).paint([request], [0.4, 0.6])[0]
    assert len(candidates) == 2 * len(FEW_SHOT_BLENDS)
    assert [c.index for c in candidates] == list(range(len(candidates)))
    source_gap = np.abs(request.image.astype(np.float32) - request.reference)[mask].mean()
    for candidate in candidates:
        np.testing.assert_array_equal(candidate.image[~mask], request.image[~mask])
        np.testing.assert_array_equal(candidate.mask, mask)
        gap = np.abs(candidate.image.astype(np.float32) - request.reference)[mask].mean()
        assert gap < 0.8 * source_gap  # the real defect is there...
    # ...but harmonised: no candidate is the plain paste (it would always win SSIM selection).
    assert all(not np.array_equal(c.image, request.reference) for c in candidates)


def test_few_shot_strength_harmonises_more():
    request = _few_shot_request(_blob())
    weak, strong = (ClassicalBackend().paint([request], [s])[0] for s in (0.2, 0.9))
    for a, b in zip(weak, strong):
        gap = lambda c: np.abs(c.image.astype(np.float32) - request.reference)[request.mask].mean()  # noqa: E731
        assert gap(b) > gap(a)


def test_a_type_no_keyword_knows_gets_a_varied_mix():
    """Different seeds paint an unknown type with different recipes (not one procedural look)."""
    image, mask = _surface(), _blob()
    darker = []
    for seed in range(12):
        _, _, (candidate,) = _paint("mix", [0.6], seed=seed, image=image, mask=mask)
        darker.append(float(candidate.image[mask].mean()) < float(image[mask].mean()))
    assert any(darker) and not all(darker)


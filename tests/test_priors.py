"""Mask priors: sizes, geometry, placement on the foreground, determinism, bad names."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.errors import InputError
from synthesis.priors import (
    SHAPES,
    SIZE_CLASSES,
    PriorLibrary,
    PriorSpec,
    class_area,
    default_priors_for,
    draw_shape,
    parse_priors,
)

HW = (128, 128)
SHAPE_SIZES = [(shape, size) for shape, kind in SHAPES.items() for size in kind.sizes]
ROUND_SHAPES = ["rectangle", "line", "ellipse", "circle", "hollow_ellipse"]  # symmetric about their centre


def _disk_foreground(radius: float, hw: tuple[int, int] = HW) -> np.ndarray:
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return (yy - hw[0] / 2) ** 2 + (xx - hw[1] / 2) ** 2 <= radius**2


@pytest.mark.parametrize("shape,size", SHAPE_SIZES)
def test_unclipped_area_falls_in_its_size_class(shape: str, size: str) -> None:
    lo, hi = SIZE_CLASSES[size]
    pixels = HW[0] * HW[1]
    for seed in range(15):
        rng = np.random.default_rng(seed)
        area = class_area(size, HW, rng)
        mask = draw_shape(shape, HW, (64.0, 64.0), area, rng)
        assert mask.dtype == bool and mask.shape == HW
        assert abs(int(mask.sum()) - area) <= 1, (seed, mask.sum(), area)
        assert lo * pixels - 1 <= mask.sum() <= hi * pixels + 1


@pytest.mark.parametrize("shape", ROUND_SHAPES)
def test_rotated_shape_stays_centred_on_its_own_centre(shape: str) -> None:
    # off the image centre: rotating about the image centre (the reference's bug) would move it
    center = (40.3, 83.7)
    for seed in range(10):
        mask = draw_shape(shape, HW, center, 300.0, np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        assert abs(ys.mean() - center[0]) < 1.0, (seed, ys.mean())
        assert abs(xs.mean() - center[1]) < 1.0, (seed, xs.mean())


def test_rotation_varies_with_seed() -> None:
    def orientation(seed: int) -> float:
        ys, xs = np.nonzero(draw_shape("line", HW, (64.0, 64.0), 200.0, np.random.default_rng(seed)))
        cov = np.cov(np.stack([xs, ys]))
        return float(np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])))

    angles = [orientation(seed) for seed in range(8)]
    assert max(angles) - min(angles) > 45


def test_shape_near_the_border_is_cut_by_the_image() -> None:
    mask = draw_shape("circle", HW, (0.0, 0.0), 400.0, np.random.default_rng(0))
    assert 50 < mask.sum() < 200  # about a quarter of the disk is inside


@pytest.mark.parametrize("size", SHAPES["hollow_ellipse"].sizes)
def test_hollow_ellipse_has_a_hole(size: str) -> None:
    for seed in range(10):
        rng = np.random.default_rng(seed)
        mask = draw_shape("hollow_ellipse", HW, (64.0, 64.0), class_area(size, HW, rng), rng)
        hole = ndimage.binary_fill_holes(mask) & ~mask
        assert hole.sum() >= 3, (size, seed)


@pytest.mark.parametrize("shape", [*SHAPES, "foreground"])
def test_sampled_mask_lies_inside_the_foreground(shape: str) -> None:
    foreground = _disk_foreground(40)
    for seed in range(5):
        mask = PriorLibrary().sample([PriorSpec(shape)], foreground, np.random.default_rng(seed))
        assert mask.any()
        assert not (mask & ~foreground).any()


def test_sample_keeps_at_least_half_of_the_shape() -> None:
    # a band of foreground: shapes hanging over its edges must still keep half their area
    foreground = np.zeros(HW, dtype=bool)
    foreground[48:80] = True
    lo, hi = SIZE_CLASSES["small"]
    for seed in range(10):
        mask = PriorLibrary().sample([PriorSpec("ellipse", "small")], foreground, np.random.default_rng(seed))
        assert 0.5 * lo * foreground.size <= mask.sum() <= hi * foreground.size


def test_foreground_prior_is_the_foreground() -> None:
    foreground = _disk_foreground(30)
    as_uint8 = foreground.astype(np.uint8) * 255  # masks often arrive as 0/255 images
    mask = PriorLibrary().sample([PriorSpec.parse("foreground")], as_uint8, np.random.default_rng(0))
    np.testing.assert_array_equal(mask, foreground)


def test_same_seed_same_mask_different_seed_different_mask() -> None:
    specs = parse_priors(["ellipse", "brush:tiny", "perlin", "polygon:small"])
    foreground = _disk_foreground(50)
    masks = [PriorLibrary().sample(specs, foreground, np.random.default_rng(seed)) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])


def test_too_small_foreground_fails_after_bounded_tries() -> None:
    foreground = np.zeros(HW, dtype=bool)
    foreground[60:62, 60:62] = True  # 4 px: no large shape can keep half its area here
    with pytest.raises(InputError, match=r"rectangle:large.*5 tries.*too small"):
        PriorLibrary().sample(
            [PriorSpec("rectangle", "large")], foreground, np.random.default_rng(0), max_tries=5
        )


def test_empty_or_malformed_foreground_is_rejected() -> None:
    with pytest.raises(InputError, match="empty"):
        PriorLibrary().sample([PriorSpec("circle")], np.zeros(HW, dtype=bool), np.random.default_rng(0))
    with pytest.raises(InputError, match="2-D"):
        PriorLibrary().sample([PriorSpec("circle")], np.ones((8, 8, 3), dtype=bool), np.random.default_rng(0))


def test_parse_accepts_shape_with_or_without_size() -> None:
    assert PriorSpec.parse("ellipse") == PriorSpec("ellipse", None)
    assert PriorSpec.parse(" Brush:Tiny ") == PriorSpec("brush", "tiny")
    assert str(PriorSpec.parse("rectangle:small")) == "rectangle:small"
    assert PriorSpec.parse("line").sizes() == SHAPES["line"].sizes
    assert PriorSpec.parse("polygon:small@edge") == PriorSpec("polygon", "small", at_edge=True)
    assert str(PriorSpec.parse("Perlin@Edge")) == "perlin@edge"


@pytest.mark.parametrize(
    "text,problem",
    [
        ("star", "unknown mask prior 'star'"),
        ("line:large", "'line' has no size class 'large'"),
        ("ellipse:huge", "no size class 'huge'"),
        ("foreground:small", "takes no size class"),
        ("circle:", "empty size class"),
        ("circle:small@centre", "unknown placement '@centre'"),
        ("foreground@edge", "takes no size class or placement"),
    ],
)
def test_bad_prior_names_raise_input_error(text: str, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        PriorSpec.parse(text)


def test_parse_priors_names_the_bad_entry() -> None:
    with pytest.raises(InputError, match="'blob'"):
        parse_priors(["ellipse", "blob"])
    with pytest.raises(InputError, match="non-empty list"):
        parse_priors([])
    with pytest.raises(InputError, match="unknown mask prior"):
        draw_shape("blob", HW, (64.0, 64.0), 100.0, np.random.default_rng(0))


@pytest.mark.parametrize(
    "anomaly_type,expected",
    [
        ("MT_Crack", {"line", "brush"}),
        ("scratch", {"line", "brush"}),
        ("MT_Blowhole", {"circle", "ellipse"}),
        ("MT_Uneven", {"rectangle", "perlin"}),
        ("MT_Break", {"polygon", "perlin"}),
        ("MT_Fray", {"perlin", "polygon"}),
        ("stain", {"perlin", "ellipse"}),
    ],
)
def test_default_priors_follow_the_type_name(anomaly_type: str, expected: set[str]) -> None:
    specs = parse_priors(default_priors_for(anomaly_type))
    assert {spec.shape for spec in specs} == expected


def test_edge_priors_sit_on_the_foreground_border() -> None:
    """An '@edge' shape is cut by the border of the foreground (a disk here); a free one mostly is not."""
    fg = _disk_foreground(110, (256, 256))
    outside_ring = ndimage.binary_dilation(fg, iterations=2) & ~fg

    def touches(spec: str, seed: int) -> bool:
        mask = PriorLibrary().sample(parse_priors([spec]), fg, np.random.default_rng(seed))
        assert (mask & ~fg).sum() == 0
        return bool((ndimage.binary_dilation(mask, iterations=2) & outside_ring).any())

    assert all(touches("polygon:small@edge", seed) for seed in range(20))
    assert sum(touches("polygon:small", seed) for seed in range(20)) < 10


def test_default_priors_for_an_unknown_type_are_a_broad_valid_mix() -> None:
    specs = parse_priors(default_priors_for("weird_defect"))
    assert len({spec.shape for spec in specs}) >= 5


# --- fallbacks: a prior that does not fit never stops a render ----------------------------------


def test_fallback_draws_like_sample_while_the_first_choice_fits():
    from synthesis.priors import PriorLibrary

    specs = parse_priors(["circle:small", "rectangle:medium"])
    fg = np.ones((64, 64), bool)
    for seed in range(5):
        plain = PriorLibrary().sample(specs, fg, np.random.default_rng(seed))
        draw = PriorLibrary().sample_with_fallback(specs, fg, np.random.default_rng(seed))
        assert draw.fallback is None and np.array_equal(draw.mask, plain)


def test_fallback_order_tries_the_types_other_priors_no_larger_then_smaller_sizes():
    from synthesis.priors import fallback_order

    specs = parse_priors(["circle:large", "rectangle:medium", "line", "rectangle:large"])
    assert fallback_order(specs, "circle", "large") == [
        ("rectangle", "medium"), ("line", "tiny"), ("line", "small"), ("rectangle", "large"),
        ("circle", "medium"), ("circle", "small"), ("circle", "tiny"),
    ]


def test_a_large_prior_on_a_thin_foreground_falls_back_to_a_smaller_one():
    from synthesis.priors import PlacementError, PriorLibrary

    fg = np.zeros((128, 128), bool)
    fg[60:68, :] = True  # an 8 px strip: no large circle keeps half of itself on it
    specs = parse_priors(["circle:large", "circle:tiny"])
    rng = np.random.default_rng(0)
    with pytest.raises(PlacementError, match="circle:large"):
        PriorLibrary().place("circle", "large", fg, rng)
    fallbacks = set()
    for seed in range(20):
        draw = PriorLibrary().sample_with_fallback(specs, fg, np.random.default_rng(seed))
        assert draw.mask.any() and not (draw.mask & ~fg).any()
        fallbacks.add(draw.fallback)
    assert fallbacks == {None, "circle:large -> circle:tiny"}  # tiny ones fit; large ones fell back


def test_nothing_fits_the_foreground_then_the_whole_image_is_used():
    from synthesis.priors import PriorLibrary

    fg = np.zeros((128, 128), bool)
    fg[::16, ::16] = True  # isolated pixels: not even a tiny shape keeps 4 px on it
    draw = PriorLibrary().sample_with_fallback(parse_priors(["ellipse:medium"]), fg, np.random.default_rng(1))
    assert draw.fallback == "ellipse:medium -> whole image"
    assert draw.mask.sum() > 0.01 * draw.mask.size

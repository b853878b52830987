from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from core.errors import InputError
from synthesis.config import ForegroundConfig
from synthesis.foreground import SegmentationForeground, classical_foreground, make_foreground

SIZE = 96


def _disc(radius: int = 25, center=(50, 45)) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(mask, center, radius, 1, -1)
    return mask.astype(bool)


def _paint(mask: np.ndarray, fg, bg) -> np.ndarray:
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = bg
    image[mask] = fg
    return image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("fg,bg", [((220, 200, 190), (30, 30, 30)), ((20, 25, 30), (230, 230, 220))])
def test_disc_on_plain_background_is_the_foreground(fg, bg):
    disc = _disc()
    mask = classical_foreground(_paint(disc, fg, bg))
    assert mask.dtype == bool and mask.shape == disc.shape
    assert _iou(mask, disc) > 0.95


def test_coloured_object_of_equal_brightness_found_by_saturation():
    disc = _disc(20, (48, 48))
    image = _paint(disc, (200, 100, 84), (128, 128, 128))
    assert _iou(classical_foreground(image), disc) > 0.9


def test_hole_inside_object_counts_as_object():
    ring = _disc(30, (48, 48)) & ~_disc(8, (48, 48))
    mask = classical_foreground(_paint(ring, (220, 220, 220), (20, 20, 20)))
    assert mask[48, 48]
    assert not mask[2, 2]


@pytest.mark.parametrize("blur", [0, 9])
def test_texture_is_foreground_everywhere(blur):
    rng = np.random.default_rng(0)
    gray = (rng.random((SIZE, SIZE)) * 255).astype(np.uint8)
    if blur:
        gray = cv2.GaussianBlur(gray, (blur, blur), 3)
    assert classical_foreground(np.repeat(gray[:, :, None], 3, axis=2)).all()


def test_uniform_image_is_foreground_everywhere():
    assert classical_foreground(np.full((40, 40, 3), 90, np.uint8)).all()


def test_object_under_min_fraction_gives_whole_image():
    tiny = _paint(_disc(5), (220, 200, 190), (30, 30, 30))
    assert classical_foreground(tiny, min_fraction=0.05).all()
    assert classical_foreground(tiny, min_fraction=0.001).mean() < 0.05


def test_bad_image_is_input_error():
    with pytest.raises(InputError):
        classical_foreground(np.zeros((10, 10), np.uint8))


class _BrightnessSegmenter(torch.nn.Module):
    """Class 1 where the (ImageNet-normalised) image is bright: a segmenter whose answer we know."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, pixel_values):
        bright = pixel_values.mean(dim=1, keepdim=True)
        return SimpleNamespace(logits=torch.cat([-bright, bright], dim=1) * self.scale)


def test_segmentation_foreground_is_the_not_background_class():
    disc = _disc()
    seg = SegmentationForeground(_BrightnessSegmenter())
    assert _iou(seg(_paint(disc, (230, 230, 230), (10, 10, 10))), disc) > 0.95
    # nearly all background -> under min_fraction -> whole image
    assert seg(_paint(_disc(3), (230, 230, 230), (10, 10, 10))).all()


def _tiny_segformer_dir(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(
        num_channels=3, num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8],
        patch_sizes=[7], strides=[4], num_attention_heads=[1], mlp_ratios=[2],
        decoder_hidden_size=8, num_labels=2,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")
    return tmp_path / "seg"


def test_make_foreground_loads_a_saved_segmentation_model(tmp_path):
    fn = make_foreground(ForegroundConfig(model=str(_tiny_segformer_dir(tmp_path)), min_fraction=0.0))
    assert isinstance(fn, SegmentationForeground)
    mask = fn(_paint(_disc(), (220, 200, 190), (30, 30, 30)))
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool


def test_make_foreground_defaults_to_classical():
    disc = _disc()
    fn = make_foreground(ForegroundConfig())
    assert _iou(fn(_paint(disc, (220, 200, 190), (30, 30, 30))), disc) > 0.95


def test_missing_segmentation_model_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no_such_model"):
        make_foreground(ForegroundConfig(model=str(tmp_path / "no_such_model")))


def circuit_board(size: int = 256, seed: int = 0) -> np.ndarray:
    """A high-contrast binary image: thin black traces with a bend and square pads on white."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 245, np.uint8)
    scale = size / 256
    for _ in range(14):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        width = max(1, round(rng.integers(2, 5) * scale))
        cv2.line(image, (x0, y0), (x1, y0), (20, 20, 20), width)
        cv2.line(image, (x1, y0), (x1, y1), (20, 20, 20), width)
    for _ in range(20):
        x, y = (int(v) for v in rng.integers(8, size - 8, 2))
        r = max(1, round(rng.integers(4, 9) * scale))
        cv2.rectangle(image, (x - r, y - r), (x + r, y + r), (20, 20, 20), -1)
    return image


@pytest.mark.parametrize("seed", range(4))
def test_thin_scattered_lines_are_no_object_the_whole_image_is(seed):
    image = circuit_board(seed=seed)
    assert 0.15 < (image[..., 0] < 128).mean() < 0.25  # it has a clean Otsu split: the lines and pads
    assert classical_foreground(image).all()


@pytest.mark.parametrize("shape", ["needle", "screw", "legs"])
def test_thin_or_irregular_compact_objects_stay_objects(shape):
    size = 256
    mask = np.zeros((size, size), np.uint8)
    if shape == "needle":  # thin (nothing survives the erosion) but not scattered
        cv2.line(mask, (30, 40), (220, 200), 1, 15)
    elif shape == "screw":
        cv2.fillPoly(mask, [cv2.boxPoints(((128, 128), (180, 28), 35)).astype(np.int32)], 1)
        cv2.circle(mask, (60, 80), 22, 1, -1)
    else:  # a transistor: body and three legs
        cv2.rectangle(mask, (70, 50), (186, 140), 1, -1)
        for x in (90, 128, 166):
            cv2.rectangle(mask, (x - 5, 140), (x + 5, 230), 1, -1)
    image = np.full((size, size, 3), 60, np.uint8)
    image[mask.astype(bool)] = 200
    found = classical_foreground(image)
    assert not found.all() and _iou(found, mask.astype(bool)) > 0.6

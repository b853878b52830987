import cv2
import numpy as np
import pytest

from core.errors import InputError
from core.images import (
    decode_png,
    encode_png,
    image_size,
    read_image,
    read_mask,
    read_sample,
    write_png,
)
from core.manifest import Sample
from tests.helpers import data


def test_read_image_returns_rgb_in_file_order(tmp_path):
    arr = data.image_array(3)
    path = data.write_image(tmp_path / "a.png", arr)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, arr)  # RGB, not OpenCV's BGR


@pytest.mark.parametrize(
    "make",
    [data.grayscale_image, data.rgba_image, data.uint16_image, data.palette_image,
     lambda p: data.uint16_image(p, channels=1)],
    ids=["grey", "rgba", "uint16", "palette", "uint16-grey"],
)
def test_unusual_formats_are_converted_not_rejected(tmp_path, make):
    out = read_image(make(tmp_path / "x.png"))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    reference = data.image_array(1)
    if make is data.grayscale_image:
        np.testing.assert_array_equal(out, np.repeat(reference[..., 1:2], 3, axis=2))
    elif make in (data.rgba_image, data.uint16_image):
        np.testing.assert_array_equal(out, reference)  # alpha dropped; 16-bit scaled exactly


def test_read_image_resizes_to_square(tmp_path):
    path = data.write_image(tmp_path / "a.png", data.image_array(1, size=40, height=24))
    assert read_image(path, size=16).shape == (16, 16, 3)
    assert read_image(path, size=64).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "make",
    [data.corrupt_file, lambda p: data.truncated_png(p, data.image_array(0)), lambda p: p],
    ids=["corrupt", "truncated", "missing"],
)
def test_unreadable_image_names_the_file(tmp_path, make):
    path = make(tmp_path / "broken.png")
    with pytest.raises(InputError, match="broken.png"):
        read_image(path)


def test_empty_file_is_an_input_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="empty.jpg"):
        read_image(tmp_path / "empty.jpg")


def test_read_mask_thresholds_and_tolerates_mtd_like_noise(tmp_path):
    noisy = data.noisy_binary_mask()
    write_png(tmp_path / "m.png", noisy)
    mask = read_mask(tmp_path / "m.png", (32, 32))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, noisy > 127)
    assert mask.sum() == 8 * 8 + 8  # the square plus the 140-valued edge row


def test_zero_one_mask_counts_as_binary(tmp_path):
    write_png(tmp_path / "m.png", data.defect_mask(value=1))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", (32, 32)), data.defect_mask() > 0)


@pytest.mark.parametrize("value", [1, 3, 100, 127, 128, 255])
def test_two_valued_mask_marks_every_nonzero_pixel(tmp_path, value):
    """0/k masks of any k (class ids 0/3 in a folder dataset, 0/100) must not read as empty."""
    write_png(tmp_path / "m.png", data.defect_mask(value=value))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", (32, 32)), data.defect_mask() > 0)


def test_sixteen_bit_zero_one_mask_is_not_rounded_away(tmp_path):
    path = tmp_path / "m16.png"
    assert cv2.imwrite(str(path), data.defect_mask().astype(np.uint16) // 255)  # 0/1 in 16 bits
    np.testing.assert_array_equal(read_mask(path, (32, 32)), data.defect_mask() > 0)


def test_non_binary_mask_is_rejected(tmp_path):
    path = data.non_binary_mask(tmp_path / "heat.png")
    with pytest.raises(InputError, match=r"heat\.png.*not binary"):
        read_mask(path, (32, 32))


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    path = data.wrong_size_mask(tmp_path / "m.png")
    with pytest.raises(InputError, match=r"m\.png.*40x36.*32x32"):
        read_mask(path, (32, 32))


def test_mask_value_selects_one_class_id(tmp_path):
    ids = np.zeros((32, 32), np.uint8)
    ids[:8] = 3
    ids[8:16] = 5
    write_png(tmp_path / "ids.png", ids)
    mask = read_mask(tmp_path / "ids.png", (32, 32), mask_value=5)
    assert mask.sum() == 8 * 32 and mask[8:16].all()


def test_mask_resize_is_nearest_and_stays_binary(tmp_path):
    write_png(tmp_path / "m.png", data.defect_mask(size=64))
    mask = read_mask(tmp_path / "m.png", (64, 64), size=16)
    assert mask.shape == (16, 16) and mask.dtype == bool
    assert mask.sum() == 4 * 4  # 16x16 square at 64 px → 4x4 at 16 px


def test_read_sample_pairs_image_and_mask(tmp_path):
    image = data.write_image(tmp_path / "i.png", data.image_array(2))
    write_png(tmp_path / "i_mask.png", data.defect_mask())
    sample = Sample(str(image), "crack", 1, "c", "test", mask_path=str(tmp_path / "i_mask.png"))
    img, mask = read_sample(sample, size=16)
    assert img.shape == (16, 16, 3) and mask.shape == (16, 16) and mask.sum() == 16
    normal = Sample(str(image), "normal", 0, "c", "test")
    assert not read_sample(normal)[1].any()


def test_image_size_reads_header(tmp_path):
    path = data.write_image(tmp_path / "a.jpg", data.image_array(0, size=40, height=24))
    assert image_size(path) == (24, 40)
    with pytest.raises(InputError, match="bad.png"):
        image_size(data.corrupt_file(tmp_path / "bad.png"))


def test_png_roundtrip_and_determinism():
    rgb = data.image_array(5)
    assert encode_png(rgb) == encode_png(rgb.copy())
    np.testing.assert_array_equal(decode_png(encode_png(rgb)), rgb)
    mask = data.defect_mask() > 0
    np.testing.assert_array_equal(decode_png(encode_png(mask)), mask.astype(np.uint8) * 255)
    with pytest.raises(InputError):
        decode_png(b"nope")


def test_write_png_is_atomic_and_leaves_no_temp(tmp_path):
    write_png(tmp_path / "sub" / "a.png", data.image_array(0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]

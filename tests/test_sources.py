import json
from pathlib import Path

import pytest

from core.errors import InputError
from pipelines.sources import READERS, detect_layout, read_source
from tests.helpers import data


def _names(samples):
    return [Path(s.path).name for s in samples]


def test_mvtec_layout_types_labels_and_masks(tmp_path):
    folder = data.make_mvtec(tmp_path, "widget", data.DummySpec(types=("hole", "crack")))
    source = read_source(tmp_path)
    assert (source.layout, source.category) == ("mvtec", "widget")
    assert source.anomaly_types == ["crack", "hole"]  # sorted, not creation order
    assert [s.split for s in source.samples["normal"]] == ["train"] * 3 + ["test"] * 2
    assert {s.label for s in source.samples["crack"]} == {1}
    assert {s.label for s in source.samples["hole"]} == {2}
    first = source.samples["hole"][0]
    assert first.mask_path == str(folder / "ground_truth" / "hole" / "000_mask.png")
    assert first.mask_value is None and first.category == "widget"
    assert all(s.mask_path is None for s in source.samples["normal"])


def test_mvtec_root_may_be_the_category_folder(tmp_path):
    folder = data.make_mvtec(tmp_path, "widget")
    source = read_source(folder)
    assert source.category == "widget" and len(source.all_samples) == 3 + 2 + 2 * 2


def test_mvtec_with_several_categories_needs_a_choice(tmp_path):
    data.make_mvtec(tmp_path, "a")
    data.make_mvtec(tmp_path, "b")
    with pytest.raises(InputError, match="several categories"):
        read_source(tmp_path)
    assert read_source(tmp_path, category="b").category == "b"
    with pytest.raises(InputError, match="'c' not found"):
        read_source(tmp_path, category="c")


def test_mvtec_missing_mask_names_the_image(tmp_path):
    folder = data.make_mvtec(tmp_path, "widget")
    (folder / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(InputError, match=r"crack/001\.png.*no mask"):
        read_source(tmp_path)


def test_mvtec_fs_jsonl_uses_declared_class_ids(tmp_path):
    data.make_mvtec_fs(tmp_path, "widget", data.DummySpec(types=("crack", "hole")))
    source = read_source(tmp_path)
    assert (source.layout, source.category) == ("mvtec_fs", "widget")
    # the helper gives hole id 1, crack id 2: ids, not names, set the order
    assert source.anomaly_types == ["hole", "crack"]
    crack = source.samples["crack"]
    assert {s.label for s in crack} == {2} and {s.mask_value for s in crack} == {2}
    assert [s.split for s in crack] == ["train", "train", "test", "test"]
    assert Path(crack[0].mask_path).is_file()
    assert [s.split for s in source.samples["normal"]] == ["train"] * 3 + ["test"] * 2


def test_mvtec_fs_lenient_keys_and_combined_dropped(tmp_path):
    data.write_image(tmp_path / "n.png", data.image_array(0))
    data.write_image(tmp_path / "d.png", data.image_array(1))
    data.write_image(tmp_path / "d.mask.png", data.defect_mask())
    lines = [
        {"image_path": "n.png", "anomaly": 0},
        {"image_path": "d.png", "mask_path": "d.mask.png", "anomaly_type": "dent", "anomaly": 1},
        {"image_path": "d.png", "mask_path": "d.mask.png", "label_name": "combined", "label": 9},
    ]
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "test_thing.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    source = read_source(tmp_path)
    assert source.anomaly_types == ["dent"]
    assert len(source.samples["normal"]) == 1 and source.samples["dent"][0].mask_value is None


def test_mvtec_fs_bad_line_names_file_and_line(tmp_path):
    data.make_mvtec_fs(tmp_path, "widget")
    path = tmp_path / "samples" / "test_widget.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(InputError, match=r"test_widget\.jsonl: line \d+ is not valid JSON"):
        read_source(tmp_path)


def test_mtd_layout(tmp_path):
    spec = data.DummySpec(types=("uneven", "blowhole"), n_test_good=3, n_per_type=3)
    data.make_mtd(tmp_path, spec)
    source = read_source(tmp_path)
    assert (source.layout, source.category) == ("mtd", "magnetic_tile")
    assert source.anomaly_types == ["blowhole", "uneven"]
    # sorted file names: index order is reversed by the helper
    assert _names(source.samples["normal"]) == ["exp1_num_1.jpg", "exp1_num_2.jpg", "exp1_num_3.jpg"]
    blowhole = source.samples["blowhole"][0]
    assert blowhole.label == 1 and blowhole.mask_path.endswith("MT_Blowhole/Imgs/exp1_num_1.png")
    assert all(s.mask_path is None for s in source.samples["normal"])
    assert {s.split for s in source.all_samples} == {"test"}


@pytest.mark.parametrize("normal_in", ["good", ""])
def test_plain_folder_layout(tmp_path, normal_in):
    root = data.make_folder(tmp_path / "parts", normal_in=normal_in)
    source = read_source(root)
    assert (source.layout, source.category) == ("folder", "parts")
    assert source.anomaly_types == ["crack", "hole"]
    assert len(source.samples["normal"]) == 2 and len(source.samples["hole"]) == 2
    assert source.samples["hole"][1].mask_path == str(root / "hole" / "masks" / "001.png")


def test_plain_folder_defect_without_mask(tmp_path):
    root = data.make_folder(tmp_path)
    data.write_image(root / "crack" / "extra.png", data.image_array(9))
    with pytest.raises(InputError, match=r"extra\.png.*no mask"):
        read_source(root)


@pytest.mark.parametrize(
    "make, layout",
    [
        (lambda p: data.make_mvtec(p, "w"), "mvtec"),
        (lambda p: data.make_mvtec(p, "w").parent, "mvtec"),
        (data.make_mvtec_fs, "mvtec_fs"),
        (data.make_mtd, "mtd"),
        (data.make_folder, "folder"),
    ],
)
def test_detect_layout(tmp_path, make, layout):
    root = make(tmp_path)
    assert detect_layout(root) == layout
    assert layout in READERS


def test_explicit_layout_overrides_detection(tmp_path):
    data.make_mtd(tmp_path)
    # read as a plain folder, MT_* folders hold no images at their top level
    with pytest.raises(InputError, match="no images"):
        read_source(tmp_path, layout="folder")


def test_unknown_layout_and_empty_or_missing_folder(tmp_path):
    with pytest.raises(InputError, match="unknown dataset layout 'voc'"):
        read_source(tmp_path, layout="voc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no images found"):
        read_source(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        read_source(tmp_path / "missing")

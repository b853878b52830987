import os
from pathlib import Path

import pytest

from core.errors import InputError
from core.manifest import Manifest
from pipelines.prepare import prepare_manifest
from tests.helpers import data


def _rel(samples, root):
    return [str(Path(s.path).relative_to(root)) for s in samples]


def test_mvtec_shots_from_train_good_and_test_minus_shots(tmp_path):
    folder = data.make_mvtec(tmp_path, "widget", data.DummySpec(n_per_type=3))
    m = prepare_manifest(tmp_path, k_normal=2, k_anomaly=1)
    assert m.category == "widget" and m.anomaly_types == ["crack", "hole"]
    assert m.class_names == ["normal", "crack", "hole"]
    assert _rel(m.normal_shots, folder) == ["train/good/000.png", "train/good/001.png"]
    assert _rel(m.anomaly_shots, folder) == ["test/crack/000.png", "test/hole/000.png"]
    assert [s.label for s in m.anomaly_shots] == [1, 2]
    assert {s.split for s in m.normal_shots + m.anomaly_shots} == {"train"}
    assert _rel(m.test, folder) == [
        "test/good/000.png", "test/good/001.png",
        "test/crack/001.png", "test/crack/002.png",
        "test/hole/001.png", "test/hole/002.png",
    ]  # train/good/002 is neither a shot nor test
    assert [s.label for s in m.test] == [0, 0, 1, 1, 2, 2]
    assert m.source["layout"] == "mvtec" and m.source["k_anomaly"] == 1


def test_zero_shot_puts_every_anomaly_in_test(tmp_path):
    data.make_mvtec(tmp_path, "widget")
    m = prepare_manifest(tmp_path, k_normal=1, k_anomaly=0)
    assert len(m.normal_shots) == 1 and m.anomaly_shots == []
    assert len(m.test) == 2 + 2 * 2


def test_empty_mask_skipped_as_shot_and_excluded_from_test(tmp_path):
    spec = data.DummySpec(n_per_type=3, empty_masks={"crack": [0]})
    folder = data.make_mvtec(tmp_path, "widget", spec)
    m = prepare_manifest(tmp_path, k_normal=2, k_anomaly=1)
    assert _rel(m.anomaly_shots, folder)[0] == "test/crack/001.png"
    assert [p for p in _rel(m.test, folder) if "crack" in p] == ["test/crack/002.png"]
    assert m.source["excluded_empty_masks"] == [str(folder / "test" / "crack" / "000.png")]


def test_mtd_sorted_order_and_empty_first_mask(tmp_path):
    # index 2 has the smallest file name (exp1_num_1) and an empty mask
    spec = data.DummySpec(types=("blowhole", "uneven"), n_test_good=4, n_per_type=3,
                          empty_masks={"uneven": [2]})
    data.make_mtd(tmp_path, spec)
    m = prepare_manifest(tmp_path, k_normal=2, k_anomaly=1)
    assert m.category == "magnetic_tile" and m.anomaly_types == ["blowhole", "uneven"]
    assert [Path(s.path).name for s in m.normal_shots] == ["exp1_num_1.jpg", "exp1_num_2.jpg"]
    assert [Path(s.path).name for s in m.anomaly_shots] == ["exp1_num_1.jpg", "exp1_num_2.jpg"]
    assert [Path(s.path).parent.parent.name for s in m.anomaly_shots] == ["MT_Blowhole", "MT_Uneven"]
    assert len(m.test) == (4 - 2) + (3 - 1) + (3 - 1 - 1)
    assert [Path(p).name for p in m.source["excluded_empty_masks"]] == ["exp1_num_1.jpg"]


def test_mvtec_fs_shots_from_train_file_test_from_test_file(tmp_path):
    data.make_mvtec_fs(tmp_path, "widget")
    m = prepare_manifest(tmp_path, k_normal=2, k_anomaly=1)
    assert m.anomaly_types == ["hole", "crack"]  # declared by class id
    assert [Path(s.path).parts[-3:] for s in m.anomaly_shots] == [
        ("train", "hole", "000.png"), ("train", "crack", "000.png")]
    assert all("/test/" in s.path for s in m.test) and len(m.test) == 2 + 2 * 2
    assert {(s.anomaly_type, s.label, s.mask_value) for s in m.test if not s.is_normal} == {
        ("hole", 1, 1), ("crack", 2, 2)}


def test_declared_types_reorder_and_subset(tmp_path):
    data.make_mvtec(tmp_path, "widget", data.DummySpec(types=("crack", "hole", "stain")))
    m = prepare_manifest(tmp_path, anomaly_types=["stain", "crack"], k_anomaly=1)
    assert m.anomaly_types == ["stain", "crack"]
    assert [(s.anomaly_type, s.label) for s in m.anomaly_shots] == [("stain", 1), ("crack", 2)]
    assert "hole" not in {s.anomaly_type for s in m.test}
    assert m.source["dropped_types"] == ["hole"]


def test_unknown_declared_type(tmp_path):
    data.make_mvtec(tmp_path, "widget")
    with pytest.raises(InputError, match=r"\['scratch'\] are not in the data"):
        prepare_manifest(tmp_path, anomaly_types=["crack", "scratch"])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"k_normal": 4}, r"4 shots asked for type 'normal', but it has only 3"),
        ({"k_anomaly": 3}, r"3 shots asked for type 'crack', but it has only 2 images with a non-empty"),
        ({"k_normal": 0}, r"k_normal must be an integer >= 1"),
        ({"k_anomaly": -1}, r"k_anomaly must be an integer >= 0"),
    ],
)
def test_k_out_of_range(tmp_path, kwargs, pattern):
    data.make_mvtec(tmp_path, "widget")
    with pytest.raises(InputError, match=pattern):
        prepare_manifest(tmp_path, **kwargs)


def test_k_counts_only_non_empty_masks(tmp_path):
    data.make_mvtec(tmp_path, "widget", data.DummySpec(empty_masks={"hole": [1]}))
    with pytest.raises(InputError, match=r"type 'hole', but it has only 1 "):
        prepare_manifest(tmp_path, k_anomaly=2)


def test_validation_reads_test_images(tmp_path):
    folder = data.make_mvtec(tmp_path, "widget")
    data.corrupt_file(folder / "test" / "good" / "001.png")
    assert len(prepare_manifest(tmp_path, validate=False).test) == 6  # cheap mode trusts normals
    with pytest.raises(InputError, match=r"good/001\.png: cannot decode"):
        prepare_manifest(tmp_path, validate=True)


@pytest.mark.parametrize("validate", [True, False])
def test_bad_masks_fail_in_both_modes(tmp_path, validate):
    folder = data.make_mvtec(tmp_path, "widget")
    data.wrong_size_mask(folder / "ground_truth" / "hole" / "001_mask.png")
    with pytest.raises(InputError, match=r"001_mask\.png: mask size 40x36"):
        prepare_manifest(tmp_path, validate=validate)
    data.empty_mask(folder / "ground_truth" / "hole" / "001_mask.png")
    data.non_binary_mask(folder / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(InputError, match=r"crack/000_mask\.png: mask is not binary"):
        prepare_manifest(tmp_path, k_anomaly=1, validate=validate)


def test_corrupt_shot_is_rejected(tmp_path):
    folder = data.make_mvtec(tmp_path, "widget")
    data.corrupt_file(folder / "train" / "good" / "000.png")
    with pytest.raises(InputError, match=r"train/good/000\.png"):
        prepare_manifest(tmp_path)


def test_manifest_roundtrip(tmp_path):
    data.make_mvtec(tmp_path / "d", "widget")
    m = prepare_manifest(tmp_path / "d", k_anomaly=1)
    m.save(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json").to_dict() == m.to_dict()


# ---- the real Magnetic Tile Defect set (skipped when absent) ----------------------------------

MTD_ROOT = Path(os.environ.get("UNIADC_MTD", Path(__file__).parents[2] / "shared" / "data" / "mtd"))
MTD_EMPTY = {"exp4_num_45057", "exp4_num_352527", "exp3_num_45042", "exp4_num_124690"}


@pytest.mark.mtd
@pytest.mark.skipif(not MTD_ROOT.is_dir(), reason=f"MTD not found at {MTD_ROOT}")
def test_real_mtd_protocol():
    m = prepare_manifest(MTD_ROOT, k_normal=2, k_anomaly=1, validate=False)
    assert m.category == "magnetic_tile"
    assert m.anomaly_types == ["blowhole", "break", "crack", "fray", "uneven"]
    free = sorted(p.name for p in (MTD_ROOT / "MT_Free" / "Imgs").glob("*.jpg"))
    assert [Path(s.path).name for s in m.normal_shots] == free[:2]
    assert [s.label for s in m.anomaly_shots] == [1, 2, 3, 4, 5]
    assert {Path(p).stem for p in m.source["excluded_empty_masks"]} == MTD_EMPTY
    test_stems = {s.stem for s in m.test}
    assert not MTD_EMPTY & test_stems
    assert len(m.test) == 952 + 115 + 85 + 57 + 32 + 103 - 2 - 5 - 4


def test_prepare_reads_class_id_masks_and_lists_every_excluded_image(tmp_path):
    """A folder dataset whose masks store a class id (0/3) keeps its images; an image whose mask
    really is empty is named in the command's output, not only in the manifest."""
    from click.testing import CliRunner

    from core.images import write_png
    from pipelines.cli import cli

    root = data.make_folder(tmp_path / "ds", data.DummySpec(empty_masks={"crack": [1]}))
    for mask in (root / "hole" / "masks").glob("*.png"):
        write_png(mask, data.defect_mask() // 255 * 3)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  root: {root}\n  layout: folder\n  k_normal: 1\n")
    result = CliRunner().invoke(cli, ["prepare", "--params", str(params), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    m = Manifest.load(tmp_path / "out" / "manifest.json")
    assert sorted(_rel([s for s in m.test if s.anomaly_type == "hole"], root)) == ["hole/000.png", "hole/001.png"]
    assert f"excluded (empty mask): {root / 'crack' / '001.png'}" in result.output
    assert "excluded 1 anomalous images" in result.output

from pathlib import Path

import numpy as np

import pytest

from core.errors import InputError
from pipelines.demo_data import DEFECTS, MARKER_NAME, generate_demo_dataset
from core.images import read_sample
from pipelines.prepare import prepare_manifest
from pipelines.sources import read_source

SMALL = dict(size=64, n_train=2, n_test_good=2, n_per_type=2)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(generate_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = _files(generate_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = _files(generate_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert len(a) == 2 + 2 + 4 * 2 * 2 + 1  # images + masks + the marker of its own files


def test_counts_do_not_shift_other_images(tmp_path):
    small = _files(generate_demo_dataset(tmp_path / "a", **SMALL))
    more = _files(generate_demo_dataset(tmp_path / "b", **{**SMALL, "n_per_type": 3}))
    assert all(more[name] == content for name, content in small.items() if name != MARKER_NAME)


def test_reads_as_mvtec_with_visible_defects(tmp_path):
    folder = generate_demo_dataset(tmp_path, **SMALL)
    source = read_source(tmp_path)
    assert (source.layout, source.category) == ("mvtec", folder.name)
    assert source.anomaly_types == sorted(DEFECTS)
    for anomaly_type in source.anomaly_types:
        for sample in source.samples[anomaly_type]:
            image, mask = read_sample(sample)
            assert image.shape == (64, 64, 3) and 0 < mask.sum() < 0.2 * mask.size
            # the defect changes the pixels under its mask: they stand out from the rest
            inside, outside = image[mask].mean(axis=0), image[~mask].mean(axis=0)
            assert np.abs(inside - outside).max() > 15, anomaly_type
    manifest = prepare_manifest(tmp_path, k_normal=2, k_anomaly=1)
    assert len(manifest.anomaly_shots) == 4 and len(manifest.test) == 2 + 4


def test_rerun_replaces_the_folder_cleanly(tmp_path):
    generate_demo_dataset(tmp_path, seed=0, **{**SMALL, "n_per_type": 3})
    folder = generate_demo_dataset(tmp_path, seed=1, **SMALL)
    assert not (folder / "test" / "crack" / "002.png").exists()  # no leftovers from the first run
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folders left


@pytest.mark.parametrize("user_file", ["notes.txt", "test/crack/my_photo.png", "train/good/000.png"],
                         ids=["new-file", "new-image", "edited-own-file"])
def test_rerun_refuses_a_folder_holding_the_users_files(tmp_path, user_file):
    folder = generate_demo_dataset(tmp_path, seed=0, **SMALL)
    (folder / user_file).write_bytes(b"the user's")
    before = _files(tmp_path)
    with pytest.raises(InputError, match=rf"holds files `uniadc demo-data` did not write \(first: {user_file}\)"):
        generate_demo_dataset(tmp_path, seed=1, **SMALL)
    assert _files(tmp_path) == before and (folder / user_file).read_bytes() == b"the user's"


def test_files_beside_the_category_folder_are_kept(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    generate_demo_dataset(tmp_path, seed=0, **SMALL)
    generate_demo_dataset(tmp_path, seed=1, **SMALL)
    assert (tmp_path / "README.md").read_text() == "mine"


def test_two_categories_with_different_surfaces_read_as_one_mvtec_root(tmp_path):
    from pipelines.demo_data import DEMO_CATEGORIES, generate_demo_categories
    from pipelines.sources import list_categories

    folders = generate_demo_categories(tmp_path, seed=0, **SMALL)
    assert [f.name for f in folders] == list(DEMO_CATEGORIES) == ["demo_surface", "demo_fabric"]
    assert list_categories(tmp_path) == sorted(DEMO_CATEGORIES)
    # the first category's files are exactly those of the single-category generator
    alone = generate_demo_dataset(tmp_path / "alone", seed=0, **SMALL)
    assert _files(folders[0]) == _files(alone)
    means = []
    for folder in folders:
        source = read_source(tmp_path, category=folder.name)
        assert source.anomaly_types == sorted(DEFECTS)
        for anomaly_type in source.anomaly_types:
            for sample in source.samples[anomaly_type]:
                image, mask = read_sample(sample)
                assert np.abs(image[mask].mean(axis=0) - image[~mask].mean(axis=0)).max() > 15, anomaly_type
        means.append(read_sample(source.samples["normal"][0])[0].reshape(-1, 3).mean(axis=0))
    assert np.abs(means[0] - means[1]).max() > 20  # visibly different surfaces (grey metal, blue fabric)
    with pytest.raises(InputError, match="unknown demo category 'carpet'"):
        generate_demo_dataset(tmp_path, category="carpet", **SMALL)

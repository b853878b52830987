"""Training data: frozen-dataset checks, type maps, holdout split, batch mixing, augmentation.

Also holds the tiny on-disk fixtures (a frozen dataset, a manifest with real images) that the
train / evaluate / predict tests share: an easy problem where "spot" is a bright disc and
"scratch" a dark line on a noisy grey surface.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
import torch

from discriminator.config import TrainConfig
from discriminator.data import (
    ANOMALY_POOL,
    NORMAL_POOL,
    SYNTHETIC_POOL,
    LabelledImage,
    MixedBatchSampler,
    ShotPool,
    SyntheticPool,
    augment,
    batch_composition,
    build_training_data,
    load_synthetic_rows,
    photometric,
    recipe_rows,
    split_holdout,
    step_rng,
)
from core.errors import InputError
from core.images import encode_png, write_png
from core.manifest import Manifest, Sample

CATEGORY = "tile"
TYPES = ["scratch", "spot"]
SIZE = 64


# --------------------------------------------------------------------------- shared fixtures


def normal_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    grey = 120 + rng.normal(0, 6, (size, size)).clip(-20, 20)
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def paint(image: np.ndarray, anomaly_type: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A spot (bright disc) or a scratch (dark line); returns the painted image and its mask."""
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    if anomaly_type == "spot":
        centre = tuple(int(v) for v in rng.integers(12, size - 12, 2))
        cv2.circle(mask, centre, int(rng.integers(4, 8)), 1, -1)
        value = 235
    else:
        p0, p1 = (tuple(int(v) for v in rng.integers(6, size - 6, 2)) for _ in range(2))
        cv2.line(mask, p0, (p0[0] + 30, p1[1]) if p0 == p1 else p1, 1, 3)
        value = 20
    painted = image.copy()
    painted[mask > 0] = value
    return painted, mask.astype(bool)


def write_frozen_dataset(root: Path, rows: int = 24, class_names=TYPES, category: str = CATEGORY,
                         seed: int = 0, modes: list[str] | None = None) -> Path:
    """The frozen dataset's on-disk form (schema of DESIGN.md), written without the synthesis code;
    with `modes` (one per row) it has the `mode` column, else it is a dataset written before it."""
    rng = np.random.default_rng(seed)
    columns = {k: [] for k in ("image", "mask", "label", "category", "source_id", "prompt", "strength",
                               "backend", "seed", "score", "task_id")}
    for i in range(rows):
        label = i % len(class_names)
        image, mask = paint(normal_image(rng), TYPES[label % len(TYPES)], rng)
        columns["image"].append({"bytes": encode_png(image), "path": None})
        columns["mask"].append({"bytes": encode_png(mask), "path": None})
        columns["label"].append(label)
        columns["category"].append(category)
        columns["source_id"].append(f"normal_{i % 2}")
        columns["prompt"].append(class_names[label])
        columns["strength"].append(0.5)
        columns["backend"].append("classical")
        columns["seed"].append(i)
        columns["score"].append(1.0)
        columns["task_id"].append(f"{class_names[label]}-{i:04d}")
    features = datasets.Features({
        "image": datasets.Image(), "mask": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names)),
        "category": datasets.Value("string"), "source_id": datasets.Value("string"),
        "prompt": datasets.Value("string"), "strength": datasets.Value("float32"),
        "backend": datasets.Value("string"), "seed": datasets.Value("int64"),
        "score": datasets.Value("float32"), "task_id": datasets.Value("string"),
    })
    if modes is not None:
        columns["mode"] = list(modes)
        features["mode"] = datasets.Value("string")
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(root / "data/train-00000-of-00001.parquet")
    return root


def write_manifest(root: Path, normal_shots: int = 2, anomaly_shots: int = 0, test_per_type: int = 4,
                   seed: int = 1) -> Path:
    """Real images on disk (PNG) and their manifest: shots plus a test set of every class."""
    rng = np.random.default_rng(seed)
    images = root / "images"

    def sample(name: str, anomaly_type: str, split: str) -> Sample:
        image = normal_image(rng)
        mask_path = None
        if anomaly_type != "normal":
            image, mask = paint(image, anomaly_type, rng)
            mask_path = str(images / f"{name}_mask.png")
            write_png(mask_path, mask)
        write_png(images / f"{name}.png", image)
        label = 0 if anomaly_type == "normal" else TYPES.index(anomaly_type) + 1
        return Sample(str(images / f"{name}.png"), anomaly_type, label, CATEGORY, split, mask_path)

    manifest = Manifest(
        category=CATEGORY,
        anomaly_types=list(TYPES),
        normal_shots=[sample(f"shot_normal_{i}", "normal", "train") for i in range(normal_shots)],
        anomaly_shots=[sample(f"shot_{t}_{i}", t, "train") for t in TYPES for i in range(anomaly_shots)],
        test=[sample(f"test_{t}_{i}", t, "test") for t in ["normal", *TYPES] for i in range(test_per_type)],
    )
    path = root / "manifest.json"
    manifest.save(path)
    return path


@pytest.fixture()
def frozen(tmp_path) -> tuple[Path, Manifest]:
    return write_frozen_dataset(tmp_path / "synthetic"), Manifest.load(write_manifest(tmp_path / "prepared",
                                                                                      anomaly_shots=1))


# --------------------------------------------------------------------------- the frozen dataset


def test_rows_become_type_maps_with_normal_zero(frozen):
    dataset_dir, manifest = frozen
    rows = load_synthetic_rows(dataset_dir, manifest)
    assert len(rows) == 24 and rows.class_names == TYPES
    pool = SyntheticPool(rows, [0, 1], 32)  # also resized: nearest keeps the ids exact
    for i, item in enumerate(pool):
        assert item.image.shape == (32, 32, 3) and item.type_map.shape == (32, 32)
        assert set(np.unique(item.type_map)) == {0, rows.labels[i] + 1}


def test_recipe_rows_are_those_no_real_shot_was_cut_for(tmp_path, frozen):
    _, manifest = frozen
    modes = ["zero_shot", "few_shot", "few_shot", "zero_shot"] * 6
    rows = load_synthetic_rows(write_frozen_dataset(tmp_path / "modes", modes=modes), manifest)
    assert rows.modes == modes
    pool = SyntheticPool(rows, [0, 1, 2, 3, 4, 7, 9], 32)
    assert recipe_rows(pool).indices == [0, 3, 4, 7] and recipe_rows(pool).size == 32
    # a dataset written before the column cannot tell: every row counts
    legacy = load_synthetic_rows(write_frozen_dataset(tmp_path / "legacy"), manifest)
    assert legacy.modes is None
    assert recipe_rows(SyntheticPool(legacy, [0, 1, 2], 32)).indices == [0, 1, 2]
    bad = write_frozen_dataset(tmp_path / "bad", rows=4, modes=["zero_shot", "cut", "zero_shot", "few_shot"])
    with pytest.raises(InputError, match=r"bad: column `mode` holds \['cut'\]"):
        load_synthetic_rows(bad, manifest)


def test_anomaly_shots_carry_their_manifest_label(frozen):
    _, manifest = frozen
    pool = ShotPool(manifest.anomaly_shots, SIZE)
    for sample, item in zip(manifest.anomaly_shots, pool):
        assert set(np.unique(item.type_map)) == {0, sample.label}
    assert all(item.type_map.max() == 0 for item in ShotPool(manifest.normal_shots, SIZE))


def test_class_names_must_match_manifest(tmp_path, frozen):
    _, manifest = frozen
    other = write_frozen_dataset(tmp_path / "other", rows=4, class_names=["scratch", "dent"])
    with pytest.raises(InputError) as err:
        load_synthetic_rows(other, manifest)
    assert str(other) in str(err.value) and "dent" in str(err.value) and "spot" in str(err.value)


def test_category_must_match_manifest(tmp_path, frozen):
    _, manifest = frozen
    other = write_frozen_dataset(tmp_path / "other", rows=4, category="carpet")
    with pytest.raises(InputError, match="carpet"):
        load_synthetic_rows(other, manifest)


def test_empty_or_missing_dataset_is_input_error(tmp_path, frozen):
    _, manifest = frozen
    with pytest.raises(InputError, match="no rows"):
        load_synthetic_rows(write_frozen_dataset(tmp_path / "empty", rows=0), manifest)
    with pytest.raises(InputError, match="not found"):
        load_synthetic_rows(tmp_path / "nowhere", manifest)
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputError, match="no Parquet shards"):
        load_synthetic_rows(tmp_path / "bare", manifest)


# --------------------------------------------------------------------------- holdout and batches


def test_holdout_is_stable_disjoint_and_sized():
    ids = [f"task-{i}" for i in range(50)]
    train, holdout = split_holdout(ids, 0.2)
    assert len(holdout) == 10 and not set(train) & set(holdout) and len(train) + len(holdout) == 50
    # the same task ids are held out whatever the row order (shards may be merged differently)
    reordered = ids[::-1]
    _, holdout_reordered = split_holdout(reordered, 0.2)
    assert {ids[i] for i in holdout} == {reordered[i] for i in holdout_reordered}
    assert split_holdout(ids, 0.0)[1] == [] and len(split_holdout(ids[:3], 0.01)[1]) == 1


def test_batches_mix_pools_in_fixed_shares_and_are_reproducible():
    config = TrainConfig(batch_size=8)
    composition = batch_composition(8, config, n_normal=2, n_anomaly=3, n_synthetic=10)
    assert (composition.normal, composition.anomaly, composition.synthetic) == (2, 1, 5)
    sizes = {NORMAL_POOL: 2, ANOMALY_POOL: 3, SYNTHETIC_POOL: 10}
    sampler = MixedBatchSampler(composition, sizes, steps=4, seed=7)
    batches = list(sampler)
    assert batches == list(MixedBatchSampler(composition, sizes, steps=4, seed=7))
    assert batches != list(MixedBatchSampler(composition, sizes, steps=4, seed=8))
    for batch in batches:
        assert [k.pool for k in batch].count(NORMAL_POOL) == 2 and [k.pool for k in batch].count(ANOMALY_POOL) == 1
    # synthetic rows are walked epoch by epoch: the first 10 synthetic slots are every row once
    synthetic = [k.index for b in batches for k in b if k.pool == SYNTHETIC_POOL]
    assert sorted(synthetic[:10]) == list(range(10))


def test_zero_shot_gives_the_anomaly_share_to_synthetic_rows():
    composition = batch_composition(8, TrainConfig(), n_normal=2, n_anomaly=0, n_synthetic=10)
    assert (composition.normal, composition.anomaly, composition.synthetic) == (2, 0, 6)


def test_augment_moves_image_and_type_map_together():
    rng = np.random.default_rng(0)
    type_map = rng.integers(0, 3, (SIZE, SIZE))
    image = np.repeat((type_map * 100).astype(np.uint8)[..., None], 3, axis=2)  # pixel value encodes the type
    changed = 0
    for seed in range(8):
        out = augment(LabelledImage(image, type_map), step_rng(seed))
        np.testing.assert_array_equal(out.image[..., 0], (out.type_map * 100).astype(np.uint8))
        changed += not np.array_equal(out.type_map, type_map)
    assert changed >= 6


def test_photometric_changes_tone_monotonically_and_keeps_the_type_map():
    ramp = np.repeat(np.repeat(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], 4, axis=0), 3, axis=2)
    type_map = np.zeros(ramp.shape[:2], np.int64)
    type_map[0, 0] = 1
    outs = [photometric(LabelledImage(ramp, type_map), step_rng(seed)) for seed in range(6)]
    for out in outs:
        assert out.type_map is type_map
        assert np.all(np.diff(out.image[0, :, 0].astype(int)) >= 0)  # a tone curve never reorders intensities
    assert len({out.image.tobytes() for out in outs}) == 6


def test_training_data_yields_image_and_target_tensors(frozen):
    dataset_dir, manifest = frozen
    config = TrainConfig(batch_size=8, steps=2, holdout_fraction=0.25)
    data = build_training_data(dataset_dir, manifest, config, image_size=32, seed=0)
    assert len(data.holdout) == 6 and len(data.normal_shots) == 2
    images, targets = next(iter(data.loader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert targets.shape == (8, 32, 32) and targets.dtype == torch.long
    assert targets[:2].max() == 0 and targets[2:].max() > 0  # normals first, then anomalies
    assert int(targets.max()) <= len(TYPES)


def test_a_dataset_whose_rendering_did_not_finish_is_refused(tmp_path, frozen):
    dataset_dir, manifest = frozen
    partial = tmp_path / "partial"
    shutil.copytree(dataset_dir, partial)
    data = partial / "data"
    shard = data / "train-00000-of-00001.parquet"
    for i in (0, 2):  # shards 0 and 2 of 4 landed before the crash
        shutil.copy(shard, data / f"train-{i:05d}-of-00004.parquet")
    shard.unlink()
    with pytest.raises(InputError, match=r"partial: rendering did not finish: 2 of 4 shards missing "
                                         r"\(train-00001-of-00004.parquet, train-00003-of-00004.parquet\); rerun"):
        load_synthetic_rows(partial, manifest)
    shutil.copy(data / "train-00000-of-00004.parquet", data / "train-00000-of-00002.parquet")
    with pytest.raises(InputError, match=r"shards of different renders are mixed \(of 2, 4\)"):
        load_synthetic_rows(partial, manifest)

"""The frozen dataset: schema, atomic shards, validation, card, push (mocked Hub)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from core.errors import InputError
from core.shards import MODES
from synthesis.dataset import (
    CardInfo,
    DatasetRow,
    dataset_features,
    legacy_features,
    push_to_hub,
    remove_stale_temp_files,
    shard_path,
    validate_dataset,
    write_card,
    write_shard,
)

CLASSES = ["crack", "dent"]


def make_row(i: int, size: int = 16) -> DatasetRow:
    rng = np.random.default_rng(i)
    mask = np.zeros((size, size), dtype=bool)
    mask[2 : 2 + i % 5 + 2, 3:9] = True
    return DatasetRow(
        image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        mask=mask,
        label=i % len(CLASSES),
        category="tile",
        source_id=f"good/{i % 3:03d}.png",
        prompt=f"prompt {i}",
        strength=0.5,
        backend="fake",
        seed=10_000_000_000 + i,  # beyond int32
        score=0.25,
        task_id=f"t-{i:05d}",
        mode=MODES[i % 2],
    )


def write_dataset(out: Path, n_shards: int = 2, per_shard: int = 3) -> list[DatasetRow]:
    features = dataset_features(CLASSES)
    rows = [make_row(i) for i in range(n_shards * per_shard)]
    for s in range(n_shards):
        write_shard(rows[s * per_shard : (s + 1) * per_shard], shard_path(out, s, n_shards), features)
    return rows


def card_info(counts: dict[str, int]) -> CardInfo:
    return CardInfo(
        category="tile",
        class_names=CLASSES,
        backend="diffusion",
        global_seed=7,
        counts=counts,
        params={"images_per_type": 3, "strengths": [0.4, 0.6]},
        model_id="some/inpaint-model",
        model_revision="abc123",
    )


def test_features_drive_parquet_schema(tmp_path):
    features = dataset_features(CLASSES)
    assert features["label"].names == CLASSES
    path = shard_path(tmp_path, 0, 1)
    write_shard([make_row(0)], path, features)
    assert path.name == "train-00000-of-00001.parquet" and path.parent.name == "data"
    meta = json.loads(pq.read_schema(path).metadata[b"huggingface"])
    assert datasets.Features.from_dict(meta["info"]["features"]) == features
    with pytest.raises(ValueError):
        dataset_features([])


def test_load_dataset_returns_typed_features_and_exact_pixels(tmp_path):
    rows = write_dataset(tmp_path / "ds")
    write_card(tmp_path / "ds", card_info({"crack": 3, "dent": 3}))
    ds = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    assert list(ds) == ["train"]
    train = ds["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert isinstance(train.features["mask"], datasets.Image)
    assert train.features["label"] == datasets.ClassLabel(names=CLASSES)
    assert train.features["seed"].dtype == "int64" and train.features["strength"].dtype == "float32"
    assert train["task_id"] == [r.task_id for r in rows]
    first = train[1]
    np.testing.assert_array_equal(np.asarray(first["image"]), rows[1].image)
    assert first["mask"].mode == "L"
    np.testing.assert_array_equal(np.asarray(first["mask"]), rows[1].mask.astype(np.uint8) * 255)
    assert first["seed"] == rows[1].seed and first["label"] == rows[1].label


def test_crash_mid_write_leaves_no_shard_and_no_temp(tmp_path):
    path = shard_path(tmp_path, 0, 1)

    def crash(table, where):  # half a file on disk, then the process "dies"
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    with mock.patch("synthesis.dataset.pq.write_table", side_effect=crash), pytest.raises(OSError):
        write_shard([make_row(0)], path, dataset_features(CLASSES))
    assert list(path.parent.iterdir()) == []


def test_validate_counts_rows_per_type(tmp_path):
    write_dataset(tmp_path)
    summary = validate_dataset(tmp_path)
    assert (summary.num_rows, summary.num_shards) == (6, 2)
    assert summary.class_names == CLASSES
    assert summary.counts == {"crack": 3, "dent": 3}


def test_validate_rejects_missing_shard(tmp_path):
    write_dataset(tmp_path, n_shards=3)
    shard_path(tmp_path, 1, 3).unlink()
    with pytest.raises(InputError, match="1 of 3 shards missing.*train-00001-of-00003"):
        validate_dataset(tmp_path)


def test_validate_rejects_empty_dir_and_mixed_runs(tmp_path):
    with pytest.raises(InputError, match="no shards"):
        validate_dataset(tmp_path)
    write_dataset(tmp_path, n_shards=2)
    write_shard([make_row(9)], shard_path(tmp_path, 0, 5), dataset_features(CLASSES))
    with pytest.raises(InputError, match="mixed"):
        validate_dataset(tmp_path)


def test_validate_rejects_duplicate_task_ids(tmp_path):
    features = dataset_features(CLASSES)
    write_shard([make_row(0), make_row(1)], shard_path(tmp_path, 0, 2), features)
    write_shard([make_row(1)], shard_path(tmp_path, 1, 2), features)
    with pytest.raises(InputError, match="duplicate task id 't-00001'"):
        validate_dataset(tmp_path)


def test_validate_rejects_schema_mismatch(tmp_path):
    write_shard([make_row(0)], shard_path(tmp_path, 0, 2), dataset_features(CLASSES))
    write_shard([make_row(1)], shard_path(tmp_path, 1, 2), dataset_features([*CLASSES, "hole"]))
    with pytest.raises(InputError, match="train-00001-of-00002.parquet: schema differs"):
        validate_dataset(tmp_path)


def test_a_dataset_written_before_the_mode_column_still_validates(tmp_path):
    rows = write_dataset(tmp_path / "new")
    assert pq.read_table(shard_path(tmp_path / "new", 0, 2)).column("mode").to_pylist() == ["zero_shot", "few_shot",
                                                                                             "zero_shot"]
    assert validate_dataset(tmp_path / "new").num_rows == len(rows)
    old = legacy_features(dataset_features(CLASSES))
    assert "mode" not in old and set(dataset_features(CLASSES)) - set(old) == {"mode"}
    for s in range(2):  # the old schema: the same rows without the column
        table = pq.read_table(shard_path(tmp_path / "new", s, 2)).drop(["mode"])
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": old.to_dict()}})})
        shard_path(tmp_path / "old", s, 2).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, shard_path(tmp_path / "old", s, 2))
    assert validate_dataset(tmp_path / "old").num_rows == len(rows)
    # but never the two schemas mixed in one dataset
    shard_path(tmp_path / "old", 1, 2).write_bytes(shard_path(tmp_path / "new", 1, 2).read_bytes())
    with pytest.raises(InputError, match="train-00001-of-00002.parquet: schema differs"):
        validate_dataset(tmp_path / "old")


def test_stale_temp_files_are_invisible_and_removable(tmp_path):
    rows = write_dataset(tmp_path, n_shards=1)
    stale = tmp_path / "data" / ".train-00001-of-00002.parquet.x1y2.tmp"
    stale.write_bytes(b"half a parquet file")
    assert validate_dataset(tmp_path).num_rows == len(rows)
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists()


def test_card_front_matter_is_what_datasets_reads(tmp_path):
    write_card(tmp_path, card_info({"crack": 3, "dent": 1}))
    text = (tmp_path / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}
    ]
    label = next(f for f in meta["dataset_info"]["features"] if f["name"] == "label")
    assert label["dtype"]["class_label"]["names"] == {"0": "crack", "1": "dent"}
    # the YAML features round-trip through `datasets` to the declared ones
    info = datasets.DatasetInfo._from_yaml_dict(meta["dataset_info"])
    assert info.features == dataset_features(CLASSES)
    assert meta["license"] and "anomaly-detection" in meta["tags"]
    assert "`some/inpaint-model` (revision `abc123`)" in body
    assert "| crack | 3 |" in body and "| dent | 1 |" in body
    params_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(params_block) == {"images_per_type": 3, "strengths": [0.4, 0.6]}
    assert "global seed: 7" in body


def test_push_uploads_card_and_shards_only(tmp_path):
    write_dataset(tmp_path)
    write_card(tmp_path, card_info({"crack": 3, "dent": 3}))
    (tmp_path / "render_state.json").write_text("{}")
    (tmp_path / "data" / ".train-00000-of-00002.parquet.zz.tmp").write_bytes(b"x")
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.upload_folder.return_value = mock.Mock(commit_url="https://hub/commit/1")
        api.whoami.return_value = {"name": "me", "orgs": []}
        url = push_to_hub(tmp_path, "me/tile-anomalies", private=True, token="tok")
    assert url == "https://hub/commit/1"
    api_cls.assert_called_once_with(token="tok")
    api.create_repo.assert_called_once_with("me/tile-anomalies", repo_type="dataset", private=True, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tile-anomalies" and kwargs["repo_type"] == "dataset"
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    uploaded = list(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"]))
    assert uploaded == ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]


def test_push_refuses_unfinished_dataset(tmp_path):
    write_dataset(tmp_path)  # no card: finalize never ran
    with mock.patch("huggingface_hub.HfApi") as api_cls, pytest.raises(InputError, match="README.md missing"):
        push_to_hub(tmp_path, "me/x")
    api_cls.assert_not_called()

"""A self-contained frozen dataset: it carries the real shots it was made from (config `shots`) and
the source's test-set description, so a folder laid out as a Hub snapshot retrains with no manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from core.errors import InputError
from core.images import read_sample, resize_image, resize_mask
from core.manifest import Manifest
from discriminator.config import TrainConfig
from discriminator.data import build_training_data
from pipelines.hub import parse_hub_id, resolve_dataset
from synthesis.config import SynthesisConfig
from synthesis.dataset import CardInfo, write_card
from synthesis.shots import describe_test_set, write_shots
from tests.helpers.data import DummySpec, make_mvtec
from tests.test_data import CATEGORY, SIZE, TYPES, write_frozen_dataset, write_manifest


def front_matter(card: Path) -> dict:
    return yaml.safe_load(card.read_text().split("---")[1])


def test_synthesize_stores_the_real_shots_and_the_test_set_description(tmp_path):
    from pipelines.prepare import prepare_manifest
    from pipelines.synthesize import run_synthesize

    source = make_mvtec(tmp_path / "mvtec_root", "widget", DummySpec(size=48))
    manifest = prepare_manifest(tmp_path / "mvtec_root", layout="mvtec", category="widget", k_normal=2, k_anomaly=1)
    manifest.save(tmp_path / "manifest.json")
    out = tmp_path / "out"
    config = SynthesisConfig(images_per_type=2, shard_size=2, batch_size=2, strengths=[0.5])
    run_synthesize(tmp_path / "manifest.json", out, config, image_size=32, global_seed=0)

    cache = str(tmp_path / "cache")
    rows = datasets.load_dataset(str(out), cache_dir=cache)  # default config: the synthetic rows
    assert list(rows) == ["train"] and rows["train"].num_rows == 4
    shots = datasets.load_dataset(str(out), "shots", split="train", cache_dir=cache)
    assert shots.features["label"].names == ["normal", "crack", "hole"]
    expected = [*manifest.normal_shots, *manifest.anomaly_shots]
    assert shots["label"] == [s.label for s in expected] == [0, 0, 1, 2]
    assert shots["source_id"] == [Path(s.path).relative_to(tmp_path / "mvtec_root").as_posix() for s in expected]
    for row, sample in zip(shots, expected):  # full resolution, exact pixels, binary L masks
        image, mask = read_sample(sample)
        np.testing.assert_array_equal(np.asarray(row["image"]), image)
        assert row["mask"].mode == "L"
        np.testing.assert_array_equal(np.asarray(row["mask"]), mask.astype(np.uint8) * 255)
    assert (np.asarray(shots[3]["mask"]) > 0).any() and not (np.asarray(shots[0]["mask"]) > 0).any()

    test_set = front_matter(out / "README.md")["uniadc"]["test_set"]
    assert test_set["layout"] == "mvtec" and test_set["root_name"] == "mvtec_root"
    assert test_set["category"] == "widget" and (test_set["k_normal"], test_set["k_anomaly"]) == (2, 1)
    assert test_set["test_images"] == len(manifest.test) and "first k_normal" in test_set["shot_rule"]
    assert source.name == "widget"


# --------------------------------------------------------------------------- the reading side


def self_contained_dataset(root: Path, anomaly_shots: int = 1) -> tuple[Path, Path]:
    """A frozen dataset with shots and card (written by the synthesis code) and its manifest."""
    manifest_path = write_manifest(root / "prepared", anomaly_shots=anomaly_shots)
    manifest = Manifest.load(manifest_path)
    dataset = write_frozen_dataset(root / "synthetic", rows=16)
    shots = write_shots(dataset, manifest, lambda s: Path(s.path).name)
    write_card(dataset, CardInfo(CATEGORY, list(TYPES), "classical", 0, {t: 8 for t in TYPES},
                                 shots=shots.counts, test_set=describe_test_set(manifest)))
    return dataset, manifest_path


def as_hub_snapshot(dataset: Path, cache: Path, repo: str, commit: str = "a" * 40) -> Path:
    """Lay `dataset` out as huggingface_hub's cache does: blobs by hash, a snapshot of symlinks."""
    repo_dir = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(dataset)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(link.relative_to(repo_dir).parts) - 1)) / "blobs" / blob.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_stored_shots_give_the_same_training_pools_as_the_manifest(tmp_path):
    dataset, manifest_path = self_contained_dataset(tmp_path)
    config = TrainConfig(batch_size=8)
    from_manifest = build_training_data(dataset, Manifest.load(manifest_path), config, image_size=48, seed=0)
    alone = build_training_data(dataset, None, config, image_size=48, seed=0)
    assert (alone.category, alone.class_names) == (CATEGORY, TYPES)
    for name in ("normal", "anomaly"):
        a, b = from_manifest.dataset.pools[name], alone.dataset.pools[name]
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            np.testing.assert_array_equal(a[i].image, b[i].image)
            np.testing.assert_array_equal(a[i].type_map, b[i].type_map)
    assert alone.dataset.pools["anomaly"][0].type_map.max() == 1  # scratch: label 1 (normal is 0)
    # the stored shots are full resolution: resizing here equals resizing the source file
    first = Manifest.load(manifest_path).anomaly_shots[0]
    image, mask = read_sample(first)
    np.testing.assert_array_equal(alone.dataset.pools["anomaly"][0].image, resize_image(image, 48))
    np.testing.assert_array_equal(alone.dataset.pools["anomaly"][0].type_map > 0, resize_mask(mask, 48))


def test_dataset_without_shots_needs_the_manifest(tmp_path):
    dataset = write_frozen_dataset(tmp_path / "old")
    with pytest.raises(InputError, match="carries no real shots.*--manifest"):
        build_training_data(dataset, None, TrainConfig(), image_size=32, seed=0)


TINY_PARAMS = {
    "seed": 0,
    "image_size": SIZE,
    "train": {"steps": 2, "batch_size": 8, "width": 16, "device": "cpu", "detection_head": "mean_logit",
              "holdout_fraction": 0.25},
    "evaluate": {"image_top_k": 20},
}


def test_train_from_a_hub_id_resolves_a_snapshot_and_needs_no_manifest(tmp_path, monkeypatch):
    import huggingface_hub

    from pipelines.cli import cli

    dataset, _ = self_contained_dataset(tmp_path / "made_elsewhere")
    snapshot = as_hub_snapshot(dataset, tmp_path / "hf_cache", "user/repo")
    shutil.rmtree(tmp_path / "made_elsewhere")  # nothing of the first person's disk is left
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, ["train", "--params", str(params), "--dataset", "user/repo@rev",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert calls[0]["repo_id"] == "user/repo" and calls[0]["revision"] == "rev"
    assert calls[0]["repo_type"] == "dataset"
    config = json.loads((out / "config.json").read_text())
    assert config["category"] == CATEGORY and config["class_names"] == TYPES
    assert (out / "model.safetensors").is_file()


def test_hub_errors_and_missing_folders_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InputError, match=r"Hub dataset 'user/repo' at revision 'v1' could not be fetched "
                                         r"\(LocalEntryNotFoundError: Cannot find .*\); offline") as err:
        resolve_dataset("user/repo@v1")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="frozen dataset folder not found"):
        resolve_dataset(tmp_path / "nowhere")  # an absolute path is never taken for a Hub id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="frozen dataset folder not found"):
        resolve_dataset("data/synthetic")  # its first folder exists here: a local path, not a Hub id
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="must be a folder"):
        resolve_dataset(tmp_path / "file")
    assert parse_hub_id("user/repo@v1") == ("user/repo", "v1") and parse_hub_id("user/repo") == ("user/repo", None)
    assert parse_hub_id("./data/synthetic") is None and parse_hub_id("a/b/c") is None
    assert parse_hub_id("user/repo@") is None

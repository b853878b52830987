"""Atomic writes: whole file or none, and the mode the umask gives (shared datasets, checkpoints)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from core.atomic import atomic_path, write_text_atomic
from core.images import write_png
from core.manifest import write_text_atomic as manifest_write_text_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
    write_text_atomic(tmp_path / "a.json", "{}")
    write_png(tmp_path / "b.png", np.zeros((4, 4), dtype=bool))
    manifest_write_text_atomic(tmp_path / "c.json", "{}")
    assert [mode(tmp_path / n) for n in ("a.json", "b.png", "c.json")] == [0o644] * 3


def test_umask_is_honoured_not_hard_coded(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.json") == 0o640


def test_shard_and_checkpoint_writers_use_the_umask(tmp_path, umask_022):
    from discriminator.model import CONFIG_NAME, WEIGHTS_NAME, Discriminator, DiscriminatorConfig
    from synthesis.dataset import DatasetRow, dataset_features, write_shard

    row = DatasetRow(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool), 0, "c", "s", "p", 0.5, "b", 1, 0.1, "t", "zero_shot")
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    write_shard([row], shard, dataset_features(["crack"]))
    config = DiscriminatorConfig(category="c", class_names=["crack"], width=8,
                                 backbone={"name": "efficientnet_lite0", "pretrained": False})
    Discriminator(config).save_pretrained(tmp_path / "ckpt")
    assert [mode(p) for p in (shard, tmp_path / "ckpt" / WEIGHTS_NAME, tmp_path / "ckpt" / CONFIG_NAME)] == [0o644] * 3


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]

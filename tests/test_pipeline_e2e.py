"""`dvc repro` end to end on tiny settings: all five stages run, metrics are DVC metrics, and
a change to the train params reruns only train + evaluate (the frozen dataset is reused)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc")

TINY = {
    "image_size": 64,
    "demo": {"size": 64},
    "synthesis": {"images_per_type": 4, "shard_size": 4},
    "train": {"steps": 3, "batch_size": 2, "width": 16},
    "evaluate": {"overlays": 4, "image_top_k": 10},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(DVC is None, reason="dvc is not installed")
def test_dvc_repro_runs_every_stage_and_reruns_only_what_changed(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dvc("init", "--no-scm", "-q", cwd=tmp_path)

    out = dvc("repro", cwd=tmp_path)
    for stage in ("demo_data", "prepare", "synthesize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    for name in ("image_auroc", "pixel_auroc", "aupro", "type_accuracy", "pixel_miou"):
        assert 0.0 <= metrics[name] <= 1.0
    assert (tmp_path / "models/discriminator/model.safetensors").is_file()
    assert list((tmp_path / "data/synthetic/data").glob("train-*.parquet"))
    assert "image_auroc" in dvc("metrics", "show", cwd=tmp_path)

    assert "Running stage" not in dvc("repro", cwd=tmp_path)

    params["train"]["steps"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc("repro", cwd=tmp_path)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'synthesize'" not in out and "Running stage 'prepare'" not in out

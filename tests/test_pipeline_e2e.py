"""`dvc repro` end to end on tiny settings: every stage of both demo categories and the aggregate
run, metrics are DVC metrics, a change to the train params or to the discriminator's code reruns
only train + evaluate (the frozen datasets are reused), and adding a category runs only that
category's stages."""

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


CATEGORIES = ["demo_surface", "demo_fabric"]
CODE = ("core", "synthesis", "discriminator", "pipelines")  # the stages' code deps, copied beside dvc.yaml
PER_CATEGORY = ("prepare", "synthesize", "train", "evaluate")


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.mark.skipif(DVC is None, reason="dvc is not installed")
def test_dvc_repro_runs_every_category_then_aggregates_and_reruns_only_what_changed(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    for package in CODE:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    assert params["data"]["categories"] == CATEGORIES  # the default run exercises two categories
    dvc("init", "--no-scm", "-q", cwd=tmp_path)

    def repro(**data) -> set[str]:
        params["data"].update(data)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return ran(dvc("repro", cwd=tmp_path))

    # one category first, then the second is added: only its own stages (and the aggregate) run
    assert repro(categories=CATEGORIES[:1]) == {"demo_data", "aggregate"} | {f"{s}@demo_surface" for s in PER_CATEGORY}
    assert repro(categories=CATEGORIES) == {"aggregate"} | {f"{s}@demo_fabric" for s in PER_CATEGORY}
    for category in CATEGORIES:
        metrics = json.loads((tmp_path / f"reports/categories/{category}/metrics.json").read_text())
        for name in ("image_auroc", "pixel_auroc", "aupro", "type_accuracy", "pixel_miou"):
            assert 0.0 <= metrics[name] <= 1.0
        assert (tmp_path / f"models/{category}/model.safetensors").is_file()
        assert list((tmp_path / f"data/synthetic/{category}/data").glob("train-*.parquet"))
        # train ran without a manifest: the shots came from the dataset
        assert list((tmp_path / f"data/synthetic/{category}/shots").glob("train-*.parquet"))
    mean = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert mean["categories"] == 2
    per = [json.loads((tmp_path / f"reports/categories/{c}/metrics.json").read_text())["image_auroc"]
           for c in CATEGORIES]
    assert mean["image_auroc"] == pytest.approx(sum(per) / 2)
    table = (tmp_path / "reports/summary.md").read_text()
    assert all(f"| {c} |" in table for c in CATEGORIES) and "**mean** (2)" in table
    shown = dvc("metrics", "show", cwd=tmp_path)
    # one row per metrics file (each category, and the mean), one column per metric
    assert all(path in shown for path in ["reports/metrics.json"] + [f"reports/categories/{c}/metrics.json" for c in CATEGORIES])
    assert "demo_fabric.pixel_miou" not in shown and max(map(len, shown.splitlines())) < 800

    assert repro() == set()  # nothing changed, nothing runs

    # a change to the discriminator's code makes train and evaluate stale, not the datasets
    with open(tmp_path / "discriminator/model.py", "a") as module:
        module.write("\n# edited\n")
    stale = set(json.loads(dvc("status", "--json", cwd=tmp_path)))
    assert stale == {f"{s}@{c}" for s in ("train", "evaluate") for c in CATEGORIES}
    (tmp_path / "discriminator/model.py").write_text((REPO / "discriminator/model.py").read_text())

    params["train"]["steps"] = 4
    assert repro() == {"aggregate"} | {f"{s}@{c}" for s in ("train", "evaluate") for c in CATEGORIES}

"""dvc.yaml declares each plot once, with its axes, and `dvc plots show` renders exactly those:
no "threshold vs step" plot from a folder of curve files, no PNG twice, the training loss kept."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.images import write_png
from discriminator import metrics as M

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc")
CURVES = {"image_roc": ("fpr", "tpr"), "pixel_roc": ("fpr", "tpr"), "image_pr": ("recall", "precision"),
          "pixel_pr": ("recall", "precision")}
FIGURES = ["confusion_matrix.png", "overlays.png", "failures.png"]


def stage_plots() -> list[tuple[str, dict]]:
    """(path template, props) of every plot the stages declare."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    entries = []
    for stage in stages.values():
        for entry in stage.get("do", stage).get("plots", []):
            path, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            entries.append((path, props or {}))
    return entries


def test_every_data_plot_is_one_file_with_its_axes():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = [path for path, _ in stage_plots()]
    top = [next(iter(e)) if isinstance(e, dict) else e for e in dvc.get("plots", [])]
    assert len(declared + top) == len(set(declared + top)), "a plot declared twice is shown twice"
    for path, props in stage_plots():
        assert Path(path).suffix in (".json", ".png"), f"{path}: a folder plots every file with default axes"
        if path.endswith(".json"):
            assert props.get("x") and props.get("y"), f"{path}: without x/y DVC plots its last field vs step"
    names = {Path(path).name for path in declared}
    assert {f"{c}.json" for c in CURVES} | set(FIGURES) | {"train_log.json"} <= names


def write_fake_outputs(root: Path, categories: list[str]) -> None:
    """What train and evaluate write, through the project's own curve records; tiny stand-ins elsewhere."""
    rng = np.random.default_rng(0)
    truth = rng.random(40) > 0.5
    scores = rng.random(40) + 0.3 * truth
    for category in categories:
        reports, model = root / "reports/categories" / category, root / "models" / category
        for name in CURVES:
            curve = M.roc_curve_points if name.endswith("roc") else M.pr_curve_points
            (reports / "plots").mkdir(parents=True, exist_ok=True)
            (reports / "plots" / f"{name}.json").write_text(json.dumps(curve(truth, scores).to_records()))
        for figure in FIGURES:
            write_png(reports / figure, np.zeros((8, 8, 3), np.uint8))
        (reports / "metrics.json").write_text(json.dumps({"image_auroc": 0.9, "reference_protocol": {"aupro": 0.5}}))
        model.mkdir(parents=True)
        log = [{"step": step, "total": 1.0 / (step + 1), "lr": 1e-3} for step in range(4)]
        (model / "train_log.json").write_text(json.dumps({"steps": 4, "device": "cpu", "log": log}))


@pytest.mark.skipif(DVC is None, reason="dvc is not installed")
def test_dvc_plots_show_renders_exactly_the_declared_plots(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    categories = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["categories"]
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    write_fake_outputs(tmp_path, categories)
    shown = subprocess.run([DVC, "plots", "show", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    plots = json.loads(shown.stdout)["data"]

    expected = {f"reports/categories/{c}/plots/{name}.json" for c in categories for name in CURVES}
    expected |= {f"reports/categories/{c}/{figure}" for c in categories for figure in FIGURES}
    expected |= {f"models/{c}/train_log.json" for c in categories}
    assert set(plots) == expected
    for plot_id, renders in plots.items():
        assert len(renders) == 1, plot_id
        spec = json.dumps(renders[0].get("content", ""))
        if plot_id.endswith(".json"):
            x, y = CURVES.get(Path(plot_id).stem, ("step", "total"))
            assert f'"field": "{x}"' in spec and f'"field": "{y}"' in spec, plot_id
            assert '"field": "threshold"' not in spec, plot_id

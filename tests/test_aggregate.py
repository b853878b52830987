"""Many categories: `uniadc categories` lists what a layout holds; `uniadc aggregate` turns one
report per category into per-category and mean DVC metrics and a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.errors import InputError
from pipelines.aggregate import run_aggregate
from pipelines.cli import cli
from pipelines.sources import list_categories
from tests.helpers.data import make_folder, make_mtd, make_mvtec, make_mvtec_fs


def write_report(reports: Path, category: str, **metrics) -> None:
    path = reports / category / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"device": "cpu", "test_images": 10, "reference_protocol": {"note": "x", "image_auroc": 0.5}}
    path.write_text(json.dumps({**base, **metrics}))


def test_aggregate_writes_per_category_and_mean_numbers_and_a_table(tmp_path):
    reports = tmp_path / "categories"
    write_report(reports, "bottle", image_auroc=0.9, pixel_auroc=0.8, aupro=0.7, type_accuracy=0.6, pixel_miou=0.3)
    write_report(reports, "cable", image_auroc=0.7, pixel_auroc=0.6, aupro=None, type_accuracy=0.4, pixel_miou=0.1)
    write_report(reports, "left_out", image_auroc=0.0)
    result = run_aggregate(reports, ["bottle", "cable"], tmp_path)

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == result["mean"] and set(result["categories"]) == {"bottle", "cable"}
    assert written["image_auroc"] == pytest.approx(0.8)
    assert written["aupro"] == pytest.approx(0.7)  # undefined (null) for cable: mean over the others
    assert written["categories"] == 2
    assert result["categories"]["cable"]["test_images"] == 10
    # the mean only, under a category's own keys: `dvc metrics show` keeps one column per metric
    assert "bottle" not in written and "test_images" not in written

    def numbers_only(node):  # DVC metrics: numbers only, nested
        return all(numbers_only(v) if isinstance(v, dict) else isinstance(v, (int, float)) for v in node.values())

    assert numbers_only(written)
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert "| category | I-AUROC | P-AUROC | PRO | Acc | bAcc | mIoU |" in table
    assert "| bottle | 90.0 | 80.0 | 70.0 | 60.0 | n/a | 30.0 |" in table
    assert "| cable | 70.0 | 60.0 | n/a | 40.0 | n/a | 10.0 |" in table
    assert "| **mean** (2) | **80.0** | **70.0** | **70.0** | **50.0** | **n/a** | **20.0** |" in table

    with pytest.raises(InputError, match="no metrics for category 'carpet'"):
        run_aggregate(reports, ["bottle", "carpet"], tmp_path)


def test_aggregate_command_reads_the_categories_from_params(tmp_path):
    reports = tmp_path / "reports" / "categories"
    for name, value in (("a", 0.6), ("b", 1.0), ("c", 0.0)):
        write_report(reports, name, image_auroc=value)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  categories: [a, b]\n")
    result = CliRunner().invoke(cli, ["aggregate", "--params", str(params), "--reports", str(reports),
                                      "--out", str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    assert "2 categories; mean I-AUROC 80.0" in result.output
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["categories"] == 2


def test_list_categories_of_every_layout(tmp_path):
    make_mvtec(tmp_path / "mvtec", "widget")
    make_mvtec(tmp_path / "mvtec", "bottle")
    assert list_categories(tmp_path / "mvtec") == ["bottle", "widget"]
    assert list_categories(tmp_path / "mvtec" / "widget") == ["widget"]  # a category folder itself
    make_mvtec_fs(tmp_path / "fs", "screw")
    make_mvtec_fs(tmp_path / "fs", "cable")
    assert list_categories(tmp_path / "fs", "mvtec_fs") == ["cable", "screw"]
    assert list_categories(make_mtd(tmp_path / "mtd")) == ["magnetic_tile"]
    assert list_categories(make_folder(tmp_path / "parts")) == ["parts"]
    with pytest.raises(InputError, match="dataset folder not found"):
        list_categories(tmp_path / "nowhere")
    result = CliRunner().invoke(cli, ["categories", "--set", f"data.root={tmp_path / 'mvtec'}"])
    assert result.exit_code == 0 and result.output.strip() == "[bottle, widget]"

"""The MTD benchmark's seed handling: one work folder and one override per seed, and the spread table."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mtd.py"
_spec = importlib.util.spec_from_file_location("bench_mtd", _PATH)
bench_mtd = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_mtd", bench_mtd)  # dataclasses look their module up while it loads
_spec.loader.exec_module(bench_mtd)


def _result(acc: float, bacc: float) -> dict:
    metrics = {"image_auroc": 0.8, "pixel_auroc": 0.7, "aupro": 0.6, "type_accuracy": acc,
               "pixel_miou": 0.2, "balanced_accuracy": bacc}
    return {"evaluations": {"dev": {"default": {"metrics": metrics}}}}


def test_each_seed_gets_its_own_folder_and_override():
    args = argparse.Namespace(work="w", set=["train.steps=10"], seeds=[0, 1])
    one = bench_mtd.seed_args(args, 1)
    assert one.work == str(Path("w") / "seed1")
    assert one.set == ["train.steps=10", "seed=1"]
    assert args.set == ["train.steps=10"]  # the caller's list is not changed
    single = bench_mtd.seed_args(argparse.Namespace(work="w", set=[], seeds=[3]), 3)
    assert single.work == "w" and single.set == ["seed=3"]
    assert bench_mtd.seed_args(args, None) is args


def test_seed_table_shows_mean_and_range_per_setting():
    by_seed = {0: {"zero-shot": _result(0.70, 0.30)}, 1: {"zero-shot": _result(0.74, 0.40)}}
    table = bench_mtd.seed_table(by_seed, "dev")
    row = table.splitlines()[-1]
    assert row.startswith("| zero-shot | 0, 1 | 35.0 (30.0–40.0) |")
    assert "72.0 (70.0–74.0)" in row  # Acc
    assert "80.0 (80.0–80.0)" in row  # I-AUROC, the same in both


@pytest.mark.parametrize("values,expected", [([1.0], (1.0, 1.0, 1.0)), ([1.0, 3.0, 2.0], (2.0, 1.0, 3.0))])
def test_spread(values, expected):
    assert bench_mtd.spread(values) == pytest.approx(expected)

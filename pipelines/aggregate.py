"""The `aggregate` stage: one evaluation per category → per-category and mean metrics, and a table.

Reads `<reports>/<category>/metrics.json` (written by `uniadc evaluate`) for every category and
writes under `out_dir`:
- `metrics.json` (DVC metrics, numbers only): the mean over categories of each headline metric,
  over the categories where it is defined, under the same keys as a category's own metrics.json.
  The per-category numbers are already DVC metrics in their own files; repeating them here made
  `dvc metrics show` one column per category and metric (hundreds of columns for MVTec AD);
- `summary.md`: a Markdown table like the paper's, one row per category and a mean row, in %.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.errors import InputError
from core.manifest import write_text_atomic

# (metrics.json key, column title) of the table, in the paper's order
COLUMNS = [
    ("image_auroc", "I-AUROC"),
    ("pixel_auroc", "P-AUROC"),
    ("aupro", "PRO"),
    ("type_accuracy", "Acc"),
    ("balanced_accuracy", "bAcc"),
    ("pixel_miou", "mIoU"),
]
MEAN_KEYS = [key for key, _ in COLUMNS] + ["image_f1_max", "pixel_f1_max"]


def _numbers(metrics: dict) -> dict[str, float]:
    """The top-level numbers of a metrics.json (strings, nulls and nested sections left out)."""
    return {
        k: v for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def read_category_metrics(reports_dir: str | Path, categories: list[str]) -> dict[str, dict[str, float]]:
    reports_dir = Path(reports_dir)
    if not categories:
        raise InputError("no categories to aggregate (params data.categories is empty)")
    out = {}
    for category in categories:
        path = reports_dir / category / "metrics.json"
        if not path.is_file():
            raise InputError(f"no metrics for category {category!r}; run `uniadc evaluate` for it first", path)
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg})", path) from None
        if not isinstance(metrics, dict):
            raise InputError("not a metrics object", path)
        out[category] = _numbers(metrics)
    return out


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the categories where it is defined (+ how many that were)."""
    mean: dict[str, float] = {}
    for key in MEAN_KEYS:
        values = [m[key] for m in per_category.values() if key in m]
        if values:
            mean[key] = sum(values) / len(values)
    mean["categories"] = len(per_category)
    return mean


def markdown_table(per_category: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    def cell(metrics: dict[str, float], key: str) -> str:
        return f"{100 * metrics[key]:.1f}" if key in metrics else "n/a"

    header = "| category | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for category, metrics in per_category.items():
        lines.append(f"| {category} | " + " | ".join(cell(metrics, k) for k, _ in COLUMNS) + " |")
    lines.append(f"| **mean** ({len(per_category)}) | " + " | ".join(f"**{cell(mean, k)}**" for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def run_aggregate(reports_dir: str | Path, categories: list[str], out_dir: str | Path) -> dict:
    """Write `metrics.json` (the mean) and `summary.md` under `out_dir`; returns both levels."""
    per_category = read_category_metrics(reports_dir, categories)
    mean = mean_metrics(per_category)
    result = {"mean": mean, "categories": per_category}
    out_dir = Path(out_dir)
    text = "\n".join([
        f"# Results over {len(per_category)} categories",
        "",
        "Image AUROC, pixel AUROC, AUPRO@0.3, image-type accuracy (C+1), balanced accuracy (mean "
        "recall over the C+1 classes) and pixel mIoU (C+1), in %, "
        "under each checkpoint's calibrated thresholds (`uniadc evaluate`); the mean is over categories.",
        "",
        markdown_table(per_category, mean),
        "",
    ])
    write_text_atomic(out_dir / "summary.md", text)
    write_text_atomic(out_dir / "metrics.json", json.dumps(mean, indent=1) + "\n")
    return result

"""The frozen dataset's second config, `shots`: the real images the synthetic rows were made from.

With them (normal shots; anomaly shots with their masks) the dataset alone — a folder or a Hub
repo — is enough to retrain the discriminator: nobody needs the first person's disk or manifest.
One Parquet file `shots/train-00000-of-00001.parquet` (the shots are few) with the `datasets`
features in the schema metadata, like the synthetic shards. Images are stored at full resolution
as decoded by `core.images` (RGB, PNG) and masks as binary L 0/255, so the training side resizes
them exactly as it resizes the manifest's files. `label` is the manifest's label: 0 normal, then
the anomaly types in label order.

The card also records how the source's test set is drawn (layout, root folder name, the shot
rule), so a colleague with the same source data can rebuild the same test set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_path
from core.images import encode_png, read_sample
from core.manifest import NORMAL, Manifest, Sample

SHOTS_CONFIG = "shots"
SHOTS_DIR = "shots"
SHOTS_FILE = f"{SHOTS_DIR}/train-00000-of-00001.parquet"
SHOT_RULE = (
    "normal shots: the first k_normal normal images (the training pool when the layout has one); "
    "anomaly shots: the first k_anomaly images of each type whose mask is not empty; both in sorted "
    "file-name order (MVTec-FS: the jsonl order). Test set: every other test-pool image, except "
    "anomalous images with an empty mask."
)


@dataclass
class ShotsSummary:
    counts: dict[str, int]  # shots per class, normal first


def shot_features(anomaly_types: Sequence[str]) -> datasets.Features:
    """The `shots` config's schema; `label` spans normal + the anomaly types (manifest labels)."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=[NORMAL, *anomaly_types]),
            "category": datasets.Value("string"),
            "source_id": datasets.Value("string"),
        }
    )


def shots_table(manifest: Manifest, source_id: Callable[[Sample], str]) -> pa.Table:
    samples = [*manifest.normal_shots, *manifest.anomaly_shots]
    columns: dict[str, list] = {"image": [], "mask": [], "label": [], "category": [], "source_id": []}
    for sample in samples:
        image, mask = read_sample(sample)  # full resolution; mask size-checked and binarised
        columns["image"].append({"bytes": encode_png(image), "path": None})
        columns["mask"].append({"bytes": encode_png(mask), "path": None})
        columns["label"].append(int(sample.label))
        columns["category"].append(manifest.category)
        columns["source_id"].append(source_id(sample))
    return pa.Table.from_pydict(columns, schema=shot_features(manifest.anomaly_types).arrow_schema)


def write_shots(out_dir: str | Path, manifest: Manifest, source_id: Callable[[Sample], str]) -> ShotsSummary:
    """Write the `shots` config atomically (a temp file renamed over the old one)."""
    table = shots_table(manifest, source_id)
    with atomic_path(Path(out_dir) / SHOTS_FILE) as tmp:
        pq.write_table(table, tmp)
    counts = Counter(s.anomaly_type for s in [*manifest.normal_shots, *manifest.anomaly_shots])
    return ShotsSummary({name: counts.get(name, 0) for name in manifest.class_names})


def describe_test_set(manifest: Manifest) -> dict:
    """How the source's test set is drawn: enough to rebuild it from the same source data."""
    source = manifest.source
    root = source.get("root")
    counts = Counter(s.anomaly_type for s in manifest.test)
    return {
        "category": manifest.category,
        "layout": source.get("layout"),
        "root_name": Path(root).name if root else None,
        "anomaly_types": list(manifest.anomaly_types),
        "k_normal": source.get("k_normal"),
        "k_anomaly": source.get("k_anomaly"),
        "shot_rule": SHOT_RULE,
        "test_images": len(manifest.test),
        "test_counts": {name: counts.get(name, 0) for name in manifest.class_names},
        "dropped_types": list(source.get("dropped_types", [])),
        "excluded_empty_masks": len(source.get("excluded_empty_masks", [])),
    }

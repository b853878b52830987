"""`prepare`: pick the shots and the test set from a dataset, following the evaluation protocol.

The protocol (shared/data/README.md), for every layout:
- normal shots: the first `k_normal` normal images in reader order (sorted file names; MVTec-FS:
  the jsonl order); from the training pool when the layout has one (MVTec ``train/good``,
  MVTec-FS ``train_*.jsonl``), else from the single pool;
- anomaly shots: the first `k_anomaly` images of each type, again from the training pool when
  the type has one, skipping images whose mask is empty;
- test: every test-pool image that is not a shot, except anomalous images with an empty mask.
Labels: normal 0, then the declared (or sorted) anomaly types 1..C.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from core.errors import InputError
from core.images import image_size, read_image, read_mask, read_sample
from core.manifest import NORMAL, Manifest, Sample
from pipelines.sources import SourceData, read_source


def choose_types(source: SourceData, anomaly_types: list[str] | None) -> list[str]:
    """The anomaly types in label order: `anomaly_types` when declared (a subset of the data's,
    in the declared order), else the reader's order."""
    if anomaly_types is None:
        return list(source.anomaly_types)
    declared = list(anomaly_types)
    unknown = [t for t in declared if t not in source.anomaly_types]
    if unknown:
        raise InputError(
            f"anomaly types {unknown} are not in the data; it has {source.anomaly_types}", source.root
        )
    if len(set(declared)) != len(declared):
        raise InputError(f"anomaly types {declared} list a type twice", source.root)
    return declared


def _relabel(samples: list[Sample], label: int) -> list[Sample]:
    return [dataclasses.replace(s, label=label) for s in samples]


def _pool(samples: list[Sample]) -> list[Sample]:
    """Shots come from the training pool when there is one, else from the single (test) pool."""
    train = [s for s in samples if s.split == "train"]
    return train or samples


class _DefectCheck:
    """Whether a sample's mask marks any defect; reads each file once.

    With `validate` the image is decoded too (catches corrupt files and size mismatches);
    otherwise only the image header is read to check the mask's size.
    """

    def __init__(self, validate: bool):
        self.validate = validate
        self._seen: dict[str, bool] = {}

    def __call__(self, sample: Sample) -> bool:
        if sample.path not in self._seen:
            self._seen[sample.path] = self._look(sample)
        return self._seen[sample.path]

    def _look(self, sample: Sample) -> bool:
        if self.validate:
            _, mask = read_sample(sample)
            return bool(mask.any())
        if sample.mask_path is None:
            return False
        return bool(read_mask(sample.mask_path, image_size(sample.path), sample.mask_value).any())


def _take_shots(
    pool: list[Sample], k: int, anomaly_type: str, has_defect: _DefectCheck, root: str
) -> list[Sample]:
    """The first `k` usable samples of `pool`: for anomalies, those with a non-empty mask."""
    if anomaly_type == NORMAL:
        usable = pool[:k]
        if has_defect.validate:
            for sample in usable:
                read_image(sample.path)
    else:
        usable = []
        for sample in pool:
            if len(usable) == k:
                break
            if has_defect(sample):
                usable.append(sample)
    if len(usable) < k:
        what = "normal images" if anomaly_type == NORMAL else "images with a non-empty mask"
        raise InputError(
            f"{k} shots asked for type {anomaly_type!r}, but it has only {len(usable)} {what}", root
        )
    return [dataclasses.replace(s, split="train") for s in usable]


def _check_k(name: str, k: int, minimum: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {k!r}")


def prepare_manifest(
    root: str | Path,
    layout: str = "auto",
    category: str | None = None,
    anomaly_types: list[str] | None = None,
    k_normal: int = 2,
    k_anomaly: int = 0,
    validate: bool = True,
) -> Manifest:
    """Read the dataset at `root` and select shots and test set per the protocol (module doc).

    Anomalous masks are always read (an empty one changes the split); `validate` also decodes every
    selected image and checks mask sizes, so bad files fail here rather than mid-training.
    Types left out of a declared `anomaly_types` are dropped from the manifest altogether.
    """
    _check_k("k_normal", k_normal, 1)
    _check_k("k_anomaly", k_anomaly, 0)
    source = read_source(root, layout, category)
    types = choose_types(source, anomaly_types)
    by_type = {t: _relabel(source.samples.get(t, []), label) for label, t in enumerate([NORMAL, *types])}
    has_defect = _DefectCheck(validate)

    normal_shots = _take_shots(_pool(by_type[NORMAL]), k_normal, NORMAL, has_defect, source.root)
    anomaly_shots = [
        shot
        for t in types
        for shot in _take_shots(_pool(by_type[t]), k_anomaly, t, has_defect, source.root)
    ]

    shot_paths = {s.path for s in normal_shots + anomaly_shots}
    test, empty = [], []
    for samples in by_type.values():
        for sample in samples:
            if sample.split != "test" or sample.path in shot_paths:
                continue
            if sample.is_normal:
                if validate:
                    read_image(sample.path)
                test.append(sample)
            elif has_defect(sample):
                test.append(sample)
            else:
                empty.append(sample.path)

    return Manifest(
        category=source.category,
        anomaly_types=types,
        normal_shots=normal_shots,
        anomaly_shots=anomaly_shots,
        test=test,
        source={
            "root": str(root),
            "layout": source.layout,
            "k_normal": k_normal,
            "k_anomaly": k_anomaly,
            "dropped_types": [t for t in source.anomaly_types if t not in types],
            "excluded_empty_masks": empty,
        },
    )

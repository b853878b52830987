"""The manifest: the typed list of shots and test images every later stage reads.

Written by `uniadc prepare`, read by `synthesize`, `train` and `evaluate`. JSON so a person can
read it and DVC can hash it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import write_text_atomic  # re-exported: the stages import it from here
from core.errors import InputError

NORMAL = "normal"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One image on disk, with its mask and type.

    `label` is 0 for normal and 1..C for the anomaly types in `Manifest.anomaly_types` order.
    `mask_value` is set for datasets whose masks store class ids (MVTec-FS): the defect is where
    the mask equals it. None means a binary mask thresholded at > 127.
    """

    path: str
    anomaly_type: str
    label: int
    category: str
    split: str  # "train" or "test"
    mask_path: str | None = None
    mask_value: int | None = None

    @property
    def is_normal(self) -> bool:
        return self.anomaly_type == NORMAL

    @property
    def stem(self) -> str:
        return Path(self.path).stem


@dataclass
class Manifest:
    category: str
    anomaly_types: list[str]
    normal_shots: list[Sample] = field(default_factory=list)
    anomaly_shots: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # where it came from: root, layout, k_normal, k_anomaly

    @property
    def class_names(self) -> list[str]:
        """The C+1 class names: normal first, then the anomaly types (label id = index)."""
        return [NORMAL, *self.anomaly_types]

    def label_of(self, anomaly_type: str) -> int:
        try:
            return self.class_names.index(anomaly_type)
        except ValueError:
            raise InputError(
                f"unknown anomaly type {anomaly_type!r}; this category has {self.anomaly_types}"
            ) from None

    def to_dict(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "category": self.category,
            "anomaly_types": list(self.anomaly_types),
            "source": self.source,
            "normal_shots": [dataclasses.asdict(s) for s in self.normal_shots],
            "anomaly_shots": [dataclasses.asdict(s) for s in self.anomaly_shots],
            "test": [dataclasses.asdict(s) for s in self.test],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        return cls(
            category=data["category"],
            anomaly_types=list(data["anomaly_types"]),
            source=dict(data.get("source", {})),
            normal_shots=[Sample(**s) for s in data["normal_shots"]],
            anomaly_shots=[Sample(**s) for s in data["anomaly_shots"]],
            test=[Sample(**s) for s in data["test"]],
        )

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise InputError("manifest not found; run `uniadc prepare` first", path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"not a valid manifest ({exc})", path) from None



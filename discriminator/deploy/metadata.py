"""What an exported model carries besides its graph, so inference needs nothing else: the class
names, the calibrated thresholds and the input size. Stored as ONNX metadata_props (one JSON
string) and as `metadata.json` inside an OpenVINO folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError
from discriminator.model import MODEL_TYPE

METADATA_KEY = "uniadc"  # the ONNX metadata_props key
METADATA_NAME = "metadata.json"  # inside an OpenVINO export folder
EXPORT_VERSION = 1


@dataclass
class DeployMetadata:
    category: str
    class_names: list[str]  # anomaly types in label-id order; normal excluded (type id 0)
    image_size: int
    pixel_threshold: float
    image_threshold: float
    image_top_k: int
    detection_head: str
    inputs: list[str]
    outputs: list[str]  # in `Prediction` field order
    model_type: str = MODEL_TYPE
    export_version: int = EXPORT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, path: str | Path) -> "DeployMetadata":
        try:
            data = json.loads(text)
            if data.get("model_type") != MODEL_TYPE:
                raise ValueError(f"model_type is {data.get('model_type')!r}")
            if data.get("export_version") != EXPORT_VERSION:
                raise ValueError(f"unsupported export_version {data.get('export_version')!r}")
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"not a uniadc export ({exc})", path) from exc

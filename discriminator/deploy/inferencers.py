"""One small interface over the three forms of a trained model: the PyTorch checkpoint folder, an
exported ONNX file (onnxruntime) and an exported OpenVINO folder or .xml. Each maps a batch of
images to a `Prediction`, so callers (`uniadc predict`, the benchmark) never branch on the form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.errors import InputError
from discriminator.deploy.export import INPUT_NAME, OPENVINO_XML, deploy_metadata
from discriminator.deploy.metadata import METADATA_KEY, METADATA_NAME, DeployMetadata
from discriminator.model import CONFIG_NAME
from discriminator.predict import PREDICTION_FIELDS, Prediction


class Inferencer(ABC):
    """images (B, 3, S, S) float in [0, 1], S = `image_size` -> `Prediction` (CPU tensors)."""

    metadata: DeployMetadata
    kind: str

    @property
    def class_names(self) -> list[str]:
        """C+1 names: normal first, then the anomaly types (type id = index)."""
        return ["normal", *self.metadata.class_names]

    @property
    def image_size(self) -> int:
        return self.metadata.image_size

    @abstractmethod
    def __call__(self, images: Tensor) -> Prediction: ...

    def _prediction(self, outputs: list[np.ndarray]) -> Prediction:
        return Prediction(*(torch.from_numpy(np.ascontiguousarray(o)) for o in outputs))


class TorchInferencer(Inferencer):
    """The checkpoint folder run in PyTorch (`Predictor`)."""

    kind = "torch"

    def __init__(self, model_dir: str | Path, device: str = "auto"):
        from discriminator.model import Discriminator
        from discriminator.predict import Predictor, resolve_device

        torch_device = resolve_device(device)
        self.predictor = Predictor(Discriminator.from_pretrained(model_dir, device=torch_device), device=torch_device)
        self.metadata = deploy_metadata(self.predictor)

    def __call__(self, images: Tensor) -> Prediction:
        return self.predictor(images)


class OnnxInferencer(Inferencer):
    """An exported .onnx file run by onnxruntime on the CPU."""

    kind = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise InputError(f"not a loadable ONNX model ({str(exc).splitlines()[0]})", path) from exc
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise InputError("ONNX model without uniadc metadata (not made by `uniadc export`)", path)
        self.metadata = DeployMetadata.from_json(text, path)
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.outputs != list(PREDICTION_FIELDS):
            raise InputError(f"ONNX outputs {self.outputs} differ from {list(PREDICTION_FIELDS)}", path)

    def __call__(self, images: Tensor) -> Prediction:
        array = images.detach().cpu().float().numpy()
        return self._prediction(self.session.run(self.outputs, {INPUT_NAME: array}))


class OpenVINOInferencer(Inferencer):
    """An exported OpenVINO folder (or its model.xml) run by OpenVINO on the CPU, in float32 unless
    `precision="bf16"` (opt-in: ~1.4x faster on CPUs with bf16 units, maps within ~0.02 of float32,
    so an image whose score is that close to the threshold may flip). With `streams` > 1 a batch is
    split over that many concurrent inference requests (OpenVINO's throughput mode, the threads
    shared among them): more images per second, each image no sooner."""

    kind = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32", streams: int = 1):
        import openvino as ov

        path = Path(path)
        xml = path / OPENVINO_XML if path.is_dir() else path
        sidecar = xml.parent / METADATA_NAME
        if not xml.is_file() or not sidecar.is_file():
            raise InputError(f"not a uniadc OpenVINO export ({xml.name} or {METADATA_NAME} missing)", path)
        self.metadata = DeployMetadata.from_json(sidecar.read_text(), sidecar)
        # f32: on CPUs with bf16 units OpenVINO would otherwise pick bf16 and drift from PyTorch
        if precision not in ("f32", "bf16"):
            raise InputError(f"OpenVINO precision must be f32 or bf16, got {precision!r}", path)
        if streams < 1:
            raise InputError(f"OpenVINO streams must be at least 1, got {streams}", path)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for any bad file
            raise InputError(f"not a loadable OpenVINO model ({str(exc).splitlines()[0]})", path) from exc
        self.requests = [self.compiled.create_infer_request() for _ in range(streams)]
        names = [o.get_any_name() for o in self.compiled.outputs]
        self.order = [names.index(name) for name in PREDICTION_FIELDS]

    def __call__(self, images: Tensor) -> Prediction:
        array = images.detach().cpu().float().numpy()
        chunks = np.array_split(array, max(1, min(len(self.requests), len(array))))
        requests = self.requests[: len(chunks)]
        for request, chunk in zip(requests, chunks):  # all running at once, then gathered in order
            request.start_async({INPUT_NAME: np.ascontiguousarray(chunk)})
        outputs = []
        for request in requests:
            request.wait()
            outputs.append([request.get_output_tensor(i).data.copy() for i in self.order])
        return self._prediction([np.concatenate(parts) for parts in zip(*outputs)])


def load_inferencer(path: str | Path, device: str = "auto", threads: int | None = None) -> Inferencer:
    """By what `path` is: a checkpoint folder (config.json), an .onnx file, an OpenVINO folder or .xml.

    `device` applies to PyTorch only; the exported forms run on the CPU.
    """
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return TorchInferencer(path, device)
    if path.is_file() and path.suffix == ".onnx":
        return OnnxInferencer(path, threads)
    if (path.is_dir() and (path / OPENVINO_XML).is_file()) or (path.is_file() and path.suffix == ".xml"):
        return OpenVINOInferencer(path, threads)
    if not path.exists():
        raise InputError("model not found", path)
    raise InputError("not a model: expected a checkpoint folder, an .onnx file or an OpenVINO folder/.xml", path)

"""`uniadc export`: a checkpoint's whole inference graph as one ONNX file or one OpenVINO folder.

What is exported is `discriminator.predict.InferenceGraph`, the very module `Predictor` runs:
backbone, fusion, type and detection heads, the normal-shot kNN memory (a constant of the graph),
and the post-processing to anomaly map, type map, image score, decision and image type under the
checkpoint's calibrated thresholds. Model changes therefore reach the export with no second copy.

ONNX goes through torch's default (dynamo) exporter, which needs `onnxscript`; the batch size is
dynamic, the image size is the checkpoint's. OpenVINO is converted from that ONNX graph and saved
in float32 (OpenVINO's default would halve the weights to fp16).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from core.errors import InputError
from discriminator.deploy.metadata import METADATA_KEY, METADATA_NAME, DeployMetadata
from discriminator.model import Discriminator
from discriminator.predict import PREDICTION_FIELDS, Predictor

FORMATS = ("onnx", "openvino")
OPSET = 18
INPUT_NAME = "images"
OPENVINO_XML = "model.xml"
OPENVINO_FILES = {OPENVINO_XML, "model.bin", METADATA_NAME}


def default_out(model_dir: Path, fmt: str) -> Path:
    """Beside the checkpoint, not inside it: the checkpoint folder stays exactly what training wrote."""
    return model_dir.with_name(model_dir.name + (".onnx" if fmt == "onnx" else "-openvino"))


def deploy_metadata(predictor: Predictor) -> DeployMetadata:
    config = predictor.model.config
    return DeployMetadata(
        category=config.category, class_names=list(config.class_names), image_size=int(config.image_size),
        pixel_threshold=predictor.pixel_threshold, image_threshold=predictor.image_threshold,
        image_top_k=predictor.top_k, detection_head=config.detection_head,
        inputs=[INPUT_NAME], outputs=list(PREDICTION_FIELDS),
    )


def export_onnx_file(predictor: Predictor, path: Path) -> None:
    """Write the graph with its metadata to `path` (a fresh file; the caller renames it into place)."""
    import onnx

    size = predictor.model.config.image_size
    example = torch.rand(2, 3, size, size)  # batch 2: keeps the batch dimension symbolic
    batch = torch.export.Dim("batch", min=1, max=1024)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like: noise for this graph
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                predictor.graph, (example,), str(path), input_names=[INPUT_NAME],
                output_names=list(PREDICTION_FIELDS), dynamic_shapes={"images": {0: batch}}, opset_version=OPSET,
                dynamo=True, external_data=False, optimize=True, verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, deploy_metadata(predictor).to_json()
    onnx.save(proto, str(path))


def _refuse_foreign(out: Path, fmt: str) -> None:
    """Never overwrite what the tool did not make: only an earlier export of ours may be replaced."""
    if not out.exists():
        return
    if fmt == "onnx":
        if out.is_dir() or not _is_our_onnx(out):
            raise InputError("exists and is not a uniadc ONNX export; refusing to overwrite it", out)
    elif not out.is_dir() or not set(p.name for p in out.iterdir()) <= OPENVINO_FILES:
        raise InputError("exists and is not a uniadc OpenVINO export folder; refusing to overwrite it", out)


def _is_our_onnx(path: Path) -> bool:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return any(p.key == METADATA_KEY for p in proto.metadata_props)
    except Exception:  # noqa: BLE001 - unreadable means not ours
        return False


def export_model(model_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Export the checkpoint in `model_dir`; returns the written file (onnx) or folder (openvino)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose from {list(FORMATS)}")
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else default_out(model_dir, fmt)
    _refuse_foreign(out, fmt)
    # 1. the checkpoint's own inference graph, on CPU, thresholds from its config
    predictor = Predictor(Discriminator.from_pretrained(model_dir, device="cpu"), device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        # 2. ONNX (the OpenVINO form is converted from it)
        onnx_path = work / "model.onnx"
        export_onnx_file(predictor, onnx_path)
        if fmt == "onnx":
            os.replace(onnx_path, out)
            return out
        # 3. OpenVINO IR (xml + bin) in float32, metadata beside it and in the IR's rt_info
        import openvino as ov

        folder = work / "openvino"
        folder.mkdir()
        metadata = deploy_metadata(predictor)
        ov_model = ov.convert_model(str(onnx_path))
        ov_model.set_rt_info(metadata.to_json(), ["framework", METADATA_KEY])
        ov.save_model(ov_model, str(folder / OPENVINO_XML), compress_to_fp16=False)
        (folder / METADATA_NAME).write_text(metadata.to_json() + "\n")
        if out.exists():
            shutil.rmtree(out)  # an earlier export of ours (checked above)
        os.replace(folder, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)

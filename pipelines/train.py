"""The `train` stage: frozen dataset (synthetic rows + the real shots it carries) → checkpoint.

Reads nothing of the synthesis code: the frozen dataset is the whole contract, so `uniadc train`
reruns alone on a dataset made elsewhere: a folder or a Hub id `owner/name@revision`. A manifest
is optional: given, its shots replace the dataset's (and the dataset is checked against it).
"""

from __future__ import annotations

from pathlib import Path

from discriminator.backbones import normalise_spec
from discriminator.config import uses_evidence_branch, uses_normal_embedding
from discriminator.data import build_training_data
from discriminator.model import Discriminator, DiscriminatorConfig
from discriminator.predict import resolve_device
from discriminator.train import TrainResult, train_discriminator
from pipelines.config import Params
from pipelines.hub import resolve_dataset
from core.manifest import Manifest


def model_config(params: Params, category: str, class_names: list[str], anomaly_shots: int) -> DiscriminatorConfig:
    """The discriminator's architecture from params.yaml and the data's category, types and number of
    real anomaly shots."""
    train = params.train
    backbone = normalise_spec(train.backbone)
    if train.backbone_layers is not None:
        backbone["layers"] = list(train.backbone_layers)
    return DiscriminatorConfig(
        category=category,
        class_names=list(class_names),
        backbone=backbone,
        memory_backbone=train.memory_backbone,  # DiscriminatorConfig normalises it
        width=train.width,
        memory_strides=list(train.memory_strides),
        memory_fraction=train.memory_fraction,
        self_similarity=train.self_similarity,
        exposure_match=train.exposure_match,
        normal_embedding=uses_normal_embedding(train.normal_embedding, anomaly_shots),
        evidence_branch=uses_evidence_branch(train.normal_embedding, anomaly_shots, train.detection_head),
        detection_head=train.detection_head,
        text_encoder=train.text_encoder,
        image_size=params.image_size,
        # decisions are calibrated for this k, so it travels with the checkpoint
        image_top_k=params.evaluate.image_top_k,
        pixel_types=params.evaluate.pixel_types,
        seed=params.seed,
    )


def run_train(params: Params, dataset: str | Path, manifest_path: str | Path | None, out_dir: str | Path,
              show_progress: bool = True) -> TrainResult:
    # 1. inputs: the device first (a CUDA device on a machine without one fails before anything is
    # loaded), the frozen dataset (a folder or a Hub snapshot) with its shots, or the manifest's
    resolve_device(params.train.device)
    manifest = Manifest.load(manifest_path) if manifest_path is not None else None
    data = build_training_data(resolve_dataset(dataset), manifest, params.train, params.image_size, params.seed)
    # 2. the model (frozen backbone + trainable head)
    model = Discriminator(model_config(params, data.category, data.class_names, data.anomaly_shots),
                          local_files_only=params.train.local_files_only)
    # 3. train, calibrate, save
    return train_discriminator(model, data, params.train, out_dir, show_progress=show_progress)

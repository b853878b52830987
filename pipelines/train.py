"""The `train` stage: frozen dataset + the manifest's real shots → checkpoint.

Reads nothing of the synthesis code: the frozen dataset is the whole contract, so `uniadc train`
reruns alone on a dataset made elsewhere (or pulled from the Hub).
"""

from __future__ import annotations

from pathlib import Path

from discriminator.backbones import normalise_spec
from discriminator.data import build_training_data
from discriminator.model import Discriminator, DiscriminatorConfig
from discriminator.train import TrainResult, train_discriminator
from pipelines.config import Params
from core.manifest import Manifest


def model_config(params: Params, manifest: Manifest) -> DiscriminatorConfig:
    """The discriminator's architecture from params.yaml and the manifest's class names."""
    train = params.train
    backbone = normalise_spec(train.backbone)
    if train.backbone_layers is not None:
        backbone["layers"] = list(train.backbone_layers)
    return DiscriminatorConfig(
        category=manifest.category,
        class_names=list(manifest.anomaly_types),
        backbone=backbone,
        width=train.width,
        detection_head=train.detection_head,
        text_encoder=train.text_encoder,
        image_size=params.image_size,
        # decisions are calibrated for this k, so it travels with the checkpoint
        image_top_k=params.evaluate.image_top_k,
        seed=params.seed,
    )


def run_train(params: Params, dataset_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
              show_progress: bool = True) -> TrainResult:
    # 1. inputs: the manifest (shots, class names) and the frozen dataset checked against it
    manifest = Manifest.load(manifest_path)
    data = build_training_data(dataset_dir, manifest, params.train, params.image_size, params.seed)
    # 2. the model (frozen backbone + trainable head)
    model = Discriminator(model_config(params, manifest), local_files_only=params.train.local_files_only)
    # 3. train, calibrate, save
    return train_discriminator(model, data, params.train, out_dir, show_progress=show_progress)

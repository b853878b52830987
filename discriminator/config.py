"""Typed settings of the discriminator half (the `train:` and `evaluate:` sections of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    backbone: str = "efficientnet_lite0"  # or a transformers vision model: local dir / Hub id
    backbone_layers: list[int] | None = None  # transformers: hidden-state indices; None = the model's default
    local_files_only: bool = True
    text_encoder: str | None = None  # CLIP text model (local dir / Hub id) for type embeddings; learned when None
    width: int = 128
    # memory: the mean class logit fused with a kNN distance to the normal shots (see discriminator.memory);
    # on MTD it beat mean_logit by ~16 points of pixel AUROC. mean_logit / conv stay selectable.
    detection_head: str = "knn"
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    # share of each batch drawn from each pool; normals and real anomaly shots are oversampled as in the paper
    real_normal_fraction: float = 0.25
    real_anomaly_fraction: float = 0.125
    holdout_fraction: float = 0.1  # synthetic rows kept out of training to calibrate the pixel threshold
    augment: bool = True  # flips, transpose, small shifts
    photometric_augment: bool = True  # global gamma / gain / offset: test exposures vary more than the shots'
    device: str = "auto"  # auto: cuda when present
    num_workers: int = 0


@dataclass
class EvaluateConfig:
    batch_size: int = 8
    image_top_k: int = 100  # image score = mean of the top-k pixel scores
    overlays: int = 16  # images in the overlay grid
    device: str = "auto"


@dataclass
class DiscriminatorParams:
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

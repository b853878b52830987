"""Typed settings of the discriminator half (the `train:` and `evaluate:` sections of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from discriminator.memory import MEMORY_FRACTION, MEMORY_STRIDES
from discriminator.model import IMAGE_EVIDENCE_WEIGHT, LEARNED_WEIGHT
from discriminator.predict import PIXEL_TYPES
from core.ranges import RULE_KEY, Rule, above, at_least, device_name, within


@dataclass
class TrainConfig:
    backbone: str = "efficientnet_lite0"  # or a transformers vision model: local dir / Hub id
    backbone_layers: list[int] | None = None  # transformers: hidden-state indices; None = the model's default
    # a second backbone for the normal-shot memory alone (same names as `backbone`); None: `backbone`
    memory_backbone: str | None = None
    local_files_only: bool = True
    text_encoder: str | None = None  # CLIP text model (local dir / Hub id) for type embeddings; learned when None
    # embedding width: 64 and 128 tie on the MTD development part (mean Acc / bAcc / mIoU of both
    # settings 51.0 / 42.8 / 20.8 vs 51.2 / 43.2 / 20.1); 64 trains 1.4x faster and quarters the
    # stride-4 fusion conv, the largest convolution of prediction
    width: int = field(default=64, metadata=at_least(1))
    # backbone strides the normal-shot memory and the type prototypes read (`discriminator.memory`)
    memory_strides: list[int] = field(default_factory=lambda: list(MEMORY_STRIDES), metadata=at_least(1))
    # memory entries per shot as a fraction of one view's cells: the kNN search's cost is linear in it
    memory_fraction: float = field(default=MEMORY_FRACTION, metadata=within(0, 4, open_lo=True))
    self_similarity: bool = True  # the memory also compares each cell with the rest of its own image
    # match every image to the normal shots' mean and contrast before the backbone (`discriminator.exposure`)
    exposure_match: bool = True
    # memory: the mean class logit fused with a kNN distance to the normal shots (see discriminator.memory);
    # on MTD it beat mean_logit by ~16 points of pixel AUROC. mean_logit / conv stay selectable.
    detection_head: str = "knn"
    steps: int = field(default=300, metadata=at_least(1))
    batch_size: int = field(default=8, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0))
    weight_decay: float = field(default=1e-4, metadata=at_least(0))
    poly_power: float = field(default=0.9, metadata=at_least(0))
    # share of each batch drawn from each pool; normals and real anomaly shots are oversampled as in the paper
    real_normal_fraction: float = field(default=0.25, metadata=within(0, 1))
    real_anomaly_fraction: float = field(default=0.125, metadata=within(0, 1))
    # synthetic rows kept out of training to calibrate the pixel threshold
    holdout_fraction: float = field(default=0.1, metadata=within(0, 1, open_hi=True))
    # type prototypes next to the learned type embeddings: defect-region features of the real anomaly
    # shots (few-shot), else of the synthetic training rows (zero-shot)
    prototypes: bool = True
    # few-shot: the memory also keeps the real anomaly shots' defect cells; a pixel nearer to them than
    # to normal scores higher in the pixel map (`discriminator.memory.DEFECT_WEIGHT`)
    defect_memory: bool = True
    # weight of the learned type evidence (soft maximum of the type logits, standardised on the normal
    # shots) added after training to the knn head's pixel map; 0 turns it off (`discriminator.model.LEARNED_WEIGHT`)
    learned_weight: float = field(default=LEARNED_WEIGHT, metadata=within(0, 10))
    # weight of what of that evidence exceeds its maximum on the normal shots, in the image score (needs
    # learned_weight > 0); 0: the image score reads the distance alone (`discriminator.model.IMAGE_EVIDENCE_WEIGHT`)
    image_evidence_weight: float = field(default=IMAGE_EVIDENCE_WEIGHT, metadata=within(0, 10))
    # weight of the learned evidence's own detection loss during training (`losses.EvidenceObjective`);
    # 0: the type logits learn only the types of anomalous pixels. Off by default: better pixel maps,
    # but it merged similar types (`discriminator.train.evidence_objective` says where)
    evidence_loss: float = field(default=0.0, metadata=at_least(0))
    # a learned normal embedding the type logits are measured against, and a C+1-way type loss on
    # every pixel (`losses.normal_class_cross_entropy`), so the learned evidence becomes the log-odds of
    # defect. auto: on the type logits without real anomaly shots; with them on a second branch that
    # only the learned evidence reads (`uses_normal_embedding`, `uses_evidence_branch` say why);
    # always: on the type logits; never: nowhere
    normal_embedding: str = field(default="auto", metadata={
        RULE_KEY: Rule("auto, always or never", lambda v: v in NORMAL_EMBEDDING)})
    augment: bool = True  # flips, transpose, small shifts
    photometric_augment: bool = True  # global gamma / gain / offset: test exposures vary more than the shots'
    device: str = field(default="auto", metadata=device_name())  # auto: cuda when present
    num_workers: int = field(default=0, metadata=at_least(0))


NORMAL_EMBEDDING = ("auto", "always", "never")


def uses_normal_embedding(setting: str, anomaly_shots: int) -> bool:
    """Whether to train with a normal embedding (`TrainConfig.normal_embedding`). `auto` turns it on
    only without real anomaly shots. MTD development part, seeds 0 and 1, mean: zero-shot it lifted
    every metric but image AUROC (the distance's); with one real shot per type it lifted pixel
    AUROC / PRO by 1.1 / 1.9 but cost 0.9 / 2.3 / 2.0 points of Acc / bAcc / mIoU, and the real
    shots are what a few-shot user gives the tool to classify with; with them `auto` trains the
    normal class in an evidence branch instead (`uses_evidence_branch`)."""
    return setting == "always" or (setting == "auto" and anomaly_shots == 0)


def uses_evidence_branch(setting: str, anomaly_shots: int, detection_head: str) -> bool:
    """Whether the `knn` head's learned evidence reads a branch of its own trained with the normal
    class (`discriminator.model.EvidenceBranch`): with `auto`, where the type logits go without it
    (real anomaly shots). That keeps the types of a model without the normal class and gives the
    maps and the image score the evidence of one with it. MTD few-shot development part, seeds 0
    and 1, mean, against no normal class: pixel AUROC +1.05, PRO +1.75, image AUROC +0.3, balanced
    accuracy +0.95, accuracy +0.1, mIoU -0.45; the normal class on the type logits (`always`)
    instead: mIoU -2.0, accuracy -0.45."""
    return setting == "auto" and anomaly_shots > 0 and detection_head == "knn"


@dataclass
class EvaluateConfig:
    batch_size: int = field(default=8, metadata=at_least(1))
    image_top_k: int = field(default=100, metadata=at_least(1))  # image score = mean of the top-k pixel scores
    # type map: every flagged pixel takes the image's type ("image", one defect type per image) or its own ("pixel")
    pixel_types: str = field(default="image", metadata={
        RULE_KEY: Rule("image or pixel", lambda v: v in PIXEL_TYPES)})
    overlays: int = field(default=16, metadata=at_least(0))  # images in the overlay grid
    # ablation: score with one part of the detection alone; null = all of it. knn: the distance to the
    # normal shots; self: to the image's own cells (self_similarity); learned: the knn head's learned
    # evidence or a knn_residual's residual
    detection_part: str | None = field(default=None, metadata={
        RULE_KEY: Rule("knn, self or learned", lambda v: v in ("knn", "self", "learned"))})
    device: str = field(default="auto", metadata=device_name())


@dataclass
class DiscriminatorParams:
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

"""Training losses of the discriminator (UniADC): focal + dice on detection, CE on anomaly types.

Detection is heavily imbalanced (anomalous pixels are a few percent), hence focal loss for
per-pixel calibration plus dice for region overlap. The type cross entropy only looks at
anomalous pixels (normal pixels have no type embedding to be pulled towards), unless the model
has a normal embedding (`normal_class_cross_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # cross-entropy target of normal pixels


@dataclass(frozen=True)
class LossWeights:
    focal: float = 1.0
    dice: float = 1.0
    ce: float = 0.5
    gamma: float = 2.0  # focal exponent


@dataclass
class LossParts:
    total: Tensor
    focal: Tensor
    dice: Tensor
    ce: Tensor
    # the learned evidence's detection loss (`EvidenceObjective`), 0 when off
    evidence: Tensor = field(default_factory=lambda: torch.zeros(()))
    # the evidence branch's C+1-way type loss (`discriminator.model.EvidenceBranch`), 0 without one
    branch_ce: Tensor = field(default_factory=lambda: torch.zeros(()))


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean binary focal loss: -(1 - p_t)^gamma * log(p_t), p_t the probability of the true label."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-ce)  # numerically stable p_t from the stable BCE
    return ((1.0 - p_t) ** gamma * ce).mean()


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2|P∩T| + s) / (|P| + |T| + s) over the whole batch (soft P = sigmoid(logits)).

    Pooled over the batch rather than per image so that images without anomaly do not each
    contribute a separate, unstable ratio.
    """
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (probs.sum() + target.sum() + smooth)


def type_cross_entropy(class_logits: Tensor, type_map: Tensor) -> Tensor:
    """Mean CE over anomalous pixels (type_map > 0, ids 1..C); exactly 0, still differentiable, if none."""
    anomalous = type_map > 0
    targets = torch.where(anomalous, type_map - 1, torch.full_like(type_map, IGNORE))
    total = F.cross_entropy(class_logits, targets, ignore_index=IGNORE, reduction="sum")
    return total / anomalous.sum().clamp_min(1)


def normal_class_cross_entropy(class_logits: Tensor, type_map: Tensor) -> Tensor:
    """C+1-way CE on every pixel, the normal class's logit fixed at 0 (type logits measured against a
    normal embedding, `DiscriminatorConfig.normal_embedding`): the mean over anomalous pixels plus the
    mean over normal ones, so each side weighs the same whatever share of the batch the defects cover.

    Why: with C-way CE on anomalous pixels only, the type logits never learn that a normal pixel is
    none of the types, and their soft maximum (the learned evidence) tells defect from normal only by
    accident. Pushing normal pixels away from every type instead (`EvidenceObjective`) pulls similar
    types together; a normal class of its own leaves room between them.
    """
    logits = torch.cat([torch.zeros_like(class_logits[:, :1]), class_logits], dim=1)
    per_pixel = F.cross_entropy(logits, type_map, reduction="none")
    anomalous = (type_map > 0).to(per_pixel.dtype)
    normal = 1.0 - anomalous
    return ((per_pixel * anomalous).sum() / anomalous.sum().clamp_min(1)
            + (per_pixel * normal).sum() / normal.sum().clamp_min(1))


def detection_terms(logits: Tensor, type_map: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """(focal, dice) of (B, 1, H, W) detection logits against the (B, H, W) type map's defect mask."""
    masks = (type_map > 0).unsqueeze(1).float()
    return focal_loss(logits, masks, gamma), dice_loss(logits, masks)


def discriminator_loss(output, type_map: Tensor, weights: LossWeights = LossWeights(),
                       normal_class: bool = False) -> LossParts:
    """Loss of a `DiscriminatorOutput` against a (B, H, W) long type map: 0 normal, 1..C anomaly types.

    The type map carries both targets: detection mask = type_map > 0, type id = type_map - 1. With
    `normal_class` the type loss is C+1-way on every pixel (`normal_class_cross_entropy`); an
    evidence branch's logits (`output.evidence_logits`) always learn that way, at the type loss's weight.
    Computed in fp32 whatever the autocast dtype of the logits.
    """
    class_logits, detection_logits = output.class_logits.float(), output.detection_logits.float()
    if type_map.ndim != 3 or detection_logits.shape != (type_map.shape[0], 1, *type_map.shape[1:]):
        raise ValueError(f"detection logits {tuple(detection_logits.shape)} vs type map {tuple(type_map.shape)}")
    if int(type_map.max()) > class_logits.shape[1] or int(type_map.min()) < 0:
        raise ValueError(f"type map ids must be in 0..{class_logits.shape[1]}")
    type_map = type_map.long()
    focal, dice = detection_terms(detection_logits, type_map, weights.gamma)
    ce = (normal_class_cross_entropy if normal_class else type_cross_entropy)(class_logits, type_map)
    total = weights.focal * focal + weights.dice * dice + weights.ce * ce
    parts = LossParts(total=total, focal=focal, dice=dice, ce=ce)
    if output.evidence_logits is not None:
        parts.branch_ce = normal_class_cross_entropy(output.evidence_logits.float(), type_map)
        parts.total = total + weights.ce * parts.branch_ce
    return parts


class EvidenceObjective(torch.nn.Module):
    """Teaches the learned evidence (a soft maximum of the type logits) to tell defect from normal.

    With the `knn` head the detection loss reaches no trained weight (the distance is frozen), so the
    type logits learn only which type an anomalous pixel is, never that a normal pixel is none: the
    evidence the pixel map adds separates normal from defect only by accident. This adds focal +
    dice on `scale · evidence + bias`, so the synthetic rows' normal surroundings and the (augmented)
    normal shots become negatives. The affine is a training device only, not saved: after training
    the evidence is standardised on the normal shots. Its scalars get their own learning rate
    (`SCALAR_LR`): at the network's lr AdamW moves a scalar by about lr per step.
    """

    SCALAR_LR = 0.05

    def __init__(self, weight: float, weights: LossWeights = LossWeights()):
        super().__init__()
        self.weight, self.weights = float(weight), weights
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, evidence: Tensor, type_map: Tensor) -> Tensor:
        """weight · (focal + dice) of (B, 1, H, W) evidence against the type map's defect mask."""
        focal, dice = detection_terms(self.scale * evidence.float() + self.bias, type_map, self.weights.gamma)
        return self.weight * (focal + dice)

"""The UniADC discriminator: one network that both detects and classifies anomalies per pixel.

Frozen backbone levels -> per-level necks (1x1 conv) -> top-down fusion (upsample coarser, add
finer, 3x3 conv) -> a per-pixel embedding at the finest used level. Class logits are cosine
similarities between L2-normalised pixel and type embeddings over a learned temperature. In the
paper there is no "normal" embedding: a pixel is normal when it resembles no anomaly type, so the
`mean_logit` detection logit is the mean of the class logits (the implicit-normal design); the
`memory` and `knn` heads add a kNN distance to the real normal shots' features
(`discriminator.memory`). With `normal_embedding` each type logit is measured against a learned
normal embedding instead, and training teaches normal pixels to be none of the types. With
`evidence_branch` a second fusion of its own does that for the `knn` head's learned evidence alone
(`EvidenceBranch`), and the type logits keep the paper's design.

A checkpoint is a directory with `config.json` (everything needed to rebuild, including the
backbone architecture) and `model.safetensors` holding ALL weights, the frozen backbone
included. That makes it self-contained (no wheel, Hub or text encoder needed to load it, and a
tiny random-weight test model round-trips exactly) at the cost of size (~14 MB for
EfficientNet-Lite0; a ViT-B backbone adds ~350 MB). Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from discriminator.backbones import EFFICIENTNET, Backbone, backbone_identity, build_backbone, normalise_spec
from discriminator.exposure import match_exposure, reference_statistics
from discriminator.embeddings import DEFAULT_TEMPLATES, LearnedTypeEmbeddings, TextTypeEmbeddings, TypeEmbeddings
from discriminator.memory import (LEGACY_MEMORY_STRIDES, MEMORY_FRACTION, MEMORY_STRIDES, NormalMemory, flipped_views,
                                  memory_views, memory_levels, patch_features, standardise)
from discriminator.predict import PIXEL_TYPES
from core.atomic import atomic_path
from core.errors import InputError
from core.manifest import write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIGEST_KEY = "weights_sha256"  # in config.json: ties its thresholds to these exact weights
MODEL_TYPE = "uniadc-discriminator"
FORMAT_VERSION = 1
# Weight of the learned evidence in the `knn` head's pixel map, both terms in standard deviations of
# the normal shots'. MTD development part, the shipped checkpoints of seeds 0 and 1 re-scored (one-off
# script), pixel AUROC / PRO: zero-shot 79.2 / 72.1 without; weight 0.1: 79.5 / 72.5 and 79.2 / 72.5;
# 0.25: 79.6 / 73.0 and 79.1 / 72.9; 0.5: 79.5 / 73.3 and 78.5 / 73.4; 1: 78.6 / 72.9 and 77.1 / 73.3;
# few-shot (seed 0) 78.0 / 75.6 without, 78.1 / 75.9, 78.0 / 76.1, 77.7 / 76.1, 76.8 / 75.3. PRO
# rises from 0.1 to 0.5 at both seeds; above 0.25 pixel AUROC falls. That was the evidence of type
# logits without a normal class; since the seventh and tenth rounds it is the log-odds of defect
# against normal (zero-shot: the normal embedding; few-shot: the evidence branch), a better detector.
# Re-chosen on the current code (twelfth round, the seed 0 / 1 checkpoints' evidence statistics and
# calibration rebuilt, both settings; I / P-AUROC / PRO / Acc / bAcc / mIoU, two-seed mean): zero-shot
# 0.25: 81.85 / 79.55 / 74.8 / 72.75 / 41.05 / 24.45, 0.375: 81.85 / 79.4 / 75.45 / 73.0 / 41.6 / 24.4,
# 0.5: 81.85 / 79.1 / 75.8 / 73.0 / 41.8 / 24.1; few-shot 0.25: 81.95 / 79.95 / 78.35 / 76.95 / 54.65 /
# 30.8, 0.375: 81.95 / 80.45 / 79.1 / 76.95 / 54.65 / 30.4, 0.5: 81.95 / 80.7 / 79.7 / 76.95 / 54.6 /
# 30.0. Above 0.375 zero-shot pixel AUROC and both settings' mIoU (large defects covered less) fall
# more. `train.learned_weight`'s default.
LEARNED_WEIGHT = 0.375
# Weight of the learned evidence in the `knn` head's image map, counted only above its maximum over the
# normal shots and their flips (`Discriminator.build_learned_evidence` says why). MTD development part,
# zero-shot checkpoints of seeds 0 and 1 re-scored (one-off script) at the distance's image threshold,
# image AUROC / normal images kept: 80.3 / 91.1 % without; 0.25: 80.8 / 90.8 and 80.9 / 91.1; 0.5:
# 81.3 / 89.9 and 81.4 / 90.2; 1: 81.9 / 88.6 and 82.0 / 88.0; 2: 81.9 / 81.6 and 82.4 / 82.6. Trained
# end to end at 1, two-seed mean: image AUROC 80.3 -> 81.85, balanced accuracy 39.9 -> 41.05, accuracy
# 72.75 either way; few-shot (no normal class, weaker evidence) 80.2 -> 80.4, decisions unchanged.
# `train.image_evidence_weight`'s default.
IMAGE_EVIDENCE_WEIGHT = 1.0


@dataclass
class DiscriminatorConfig:
    """Everything needed to rebuild a discriminator; saved as the checkpoint's config.json."""

    category: str
    class_names: list[str]  # anomaly types in label-id order; normal excluded
    backbone: dict = field(default_factory=lambda: {"name": EFFICIENTNET})
    # a second frozen backbone that only the normal-shot memory reads (`Discriminator.memory_features`);
    # None: the memory reads `backbone` as everything else does
    memory_backbone: dict | None = None
    levels: list[int] | None = None  # indices into the backbone's levels; None = all
    width: int = 128
    detection_head: str = "mean_logit"
    text_encoder: str | None = None  # local dir / Hub id of a CLIP-like text model; None = learned types
    text_templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    text_dim: int | None = None  # set on build: a checkpoint rebuilds the text projection from it, no encoder needed
    image_size: int = 256
    pixel_threshold: float = 0.5  # on sigmoid(detection logit); calibrated by training
    image_threshold: float = 0.5  # on the image score (mean of the top-k pixel probabilities); calibrated
    image_top_k: int = 100
    pixel_types: str = "image"  # type map: the image's type on every flagged pixel, or "pixel": each its own
    temperature: float = 0.07  # initial; learned
    min_temperature: float = 0.01  # caps logits at +-100 so the scale cannot run away
    seed: int = 0  # initialisation of the trainable parts
    memory_shape: list[int] | None = None  # (shots, entries) of the memory head's bank; set by build_memory
    # backbone strides read by the memory and the type prototypes (`discriminator.memory.memory_levels`)
    memory_strides: list[int] = field(default_factory=lambda: list(MEMORY_STRIDES))
    # entries kept per shot, as a fraction of one view's cells (k-centre coreset of the shot's views)
    memory_fraction: float = MEMORY_FRACTION
    # the memory also scores each cell against the rest of its own image (`discriminator.memory`);
    # off for checkpoints saved before it existed
    self_similarity: bool = False
    prototypes: bool = False  # defect-region features as type prototypes; set by build_prototypes
    # the prototypes and pixels are compared after subtracting the normal shots' mean feature; set
    # by build_prototypes when given normal images (off for checkpoints saved before it existed)
    prototype_center: bool = False
    # every image is matched to the normal shots' mean and contrast before the backbone
    # (`discriminator.exposure.match_exposure`); off for checkpoints saved before it existed
    exposure_match: bool = False
    # entries of the memory's bank of real defect cells (few-shot); set by build_defect_memory, 0 = none
    defect_memory_entries: int = 0
    # weight of that bank's term above its maximum on the normal shots' views in the image map; set by
    # build_defect_memory, 0 = none (checkpoints saved before it existed)
    defect_image_weight: float = 0.0
    # weight of the learned type evidence in the `knn` head's pixel map; set by build_learned_evidence, 0 = none
    learned_weight: float = 0.0
    # weight of the learned evidence above the normal shots' maximum in the `knn` head's image map; set
    # by build_learned_evidence, 0 = none (the image score reads the distance alone)
    image_evidence_weight: float = 0.0
    # a learned normal embedding: each type logit is measured against it (`Discriminator.embed_and_type`)
    # and training's type loss becomes C+1-way on every pixel (`losses.normal_class_cross_entropy`)
    normal_embedding: bool = False
    # a second fusion whose type logits are measured against a normal embedding (`EvidenceBranch`); the
    # `knn` head's learned evidence reads it instead of the type logits (few-shot, where those have no
    # normal class); off for checkpoints saved before it existed
    evidence_branch: bool = False
    # the evidence branch adds type prototypes of its own, from the synthetic rows a recipe made, in
    # place of the real shots' (`Discriminator.build_prototypes`); off for checkpoints saved before
    branch_prototypes: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, path: str | Path | None = None) -> None:
        names = self.class_names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise InputError(f"class_names must be a non-empty list of names, got {names!r}", path)
        if len(set(names)) != len(names):
            raise InputError(f"class_names has duplicates: {names}", path)
        if self.detection_head not in DETECTION_HEADS:
            raise InputError(
                f"unknown detection_head {self.detection_head!r}; choose from {sorted(DETECTION_HEADS)}", path
            )
        for name in ("width", "image_size", "image_top_k"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}", path)
        if not 0 < self.min_temperature <= self.temperature:
            raise InputError(
                f"need 0 < min_temperature <= temperature, got {self.min_temperature}, {self.temperature}", path
            )
        strides = self.memory_strides
        if not isinstance(strides, list) or not strides or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in strides):
            raise InputError(f"memory_strides must be a non-empty list of positive integers, got {strides!r}", path)
        if self.pixel_types not in PIXEL_TYPES:
            raise InputError(f"pixel_types must be one of {list(PIXEL_TYPES)}, got {self.pixel_types!r}", path)
        if self.branch_prototypes and not (self.evidence_branch and self.prototypes):
            raise InputError("branch_prototypes needs evidence_branch and prototypes", path)
        if self.evidence_branch and self.detection_head != "knn":
            raise InputError(f"evidence_branch needs the knn detection head (the only one that reads the "
                             f"learned evidence), got {self.detection_head!r}", path)
        if self.memory_backbone is not None and not issubclass(DETECTION_HEADS[self.detection_head], NormalMemoryHead):
            raise InputError(f"memory_backbone needs a detection head with a normal-shot memory, got "
                             f"{self.detection_head!r}", path)
        for name in ("learned_weight", "image_evidence_weight", "defect_image_weight"):
            if not 0.0 <= float(getattr(self, name)) <= 10.0:
                raise InputError(f"{name} must be in [0, 10], got {getattr(self, name)}", path)
        if not 0.0 < float(self.memory_fraction) <= 4.0:
            raise InputError(f"memory_fraction must be in (0, 4] (4 = four views' worth of cells per shot), "
                             f"got {self.memory_fraction}", path)
        for name in ("pixel_threshold", "image_threshold"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}", path)
        self.backbone = normalise_spec(self.backbone)
        if self.memory_backbone is not None:
            self.memory_backbone = normalise_spec(self.memory_backbone)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path | None = None) -> "DiscriminatorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if isinstance(data, dict) and "memory_strides" not in data:  # saved before the strides were recorded
            data = {**data, "memory_strides": list(LEGACY_MEMORY_STRIDES)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown discriminator config keys {unknown}", path)
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"bad discriminator config ({exc})", path) from exc
        except InputError as exc:
            raise InputError(exc.problem, path) from exc


@dataclass
class DiscriminatorOutput:
    class_logits: Tensor  # (B, C, H, W): per-pixel logits over the anomaly types
    detection_logits: Tensor  # (B, 1, H, W): per-pixel anomaly logit
    # (B, 1, H, W): the logit map image scores read, when the head keeps one apart (the `knn` head with
    # self-similarity: the distance to the shots alone); None: image scores read detection_logits
    image_logits: Tensor | None = None
    # (B, C, H, W): the evidence branch's type logits against normal, while training (its loss); else None
    evidence_logits: Tensor | None = None


def conv_norm_act(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: training batches of synthetic images are small
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(math.gcd(32, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class TopDownFusion(nn.Module):
    """FPN-style: project every level to `width`, then merge from coarsest to finest."""

    def __init__(self, channels: list[int], width: int):
        super().__init__()
        self.necks = nn.ModuleList(conv_norm_act(c, width, 1) for c in channels)
        self.fuse = nn.ModuleList(conv_norm_act(width, width, 3) for _ in channels[:-1])

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.necks[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            finer = self.necks[i](features[i])
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse[i](x + finer)
        return x


def type_similarity(pixels: Tensor, types: Tensor, normal: Tensor | None = None) -> Tensor:
    """(B, C, h, w) cosine of each L2-normalised pixel embedding (B, D, h, w) to each type embedding
    (C, D), minus its cosine to the `normal` embedding (D,) when given: a value > 0 then means "more
    this type than normal"."""
    similarity = torch.einsum("bdhw,cd->bchw", pixels, F.normalize(types, dim=-1))
    if normal is not None:
        similarity = similarity - torch.einsum("bdhw,d->bhw", pixels, F.normalize(normal, dim=-1)).unsqueeze(1)
    return similarity


def bounded_temperature(log_temperature: Tensor, floor: float) -> Tensor:
    """A learnable cosine temperature (kept as its log) that never falls below `floor`: one rule for
    the type logits and the evidence branch's."""
    return log_temperature.exp().clamp_min(floor)


class EvidenceBranch(nn.Module):
    """Type logits measured against a normal embedding, from a fusion of their own, trained with the
    C+1-way loss (`losses.normal_class_cross_entropy`): what the `knn` head's learned evidence reads
    when the discriminator's own type logits have no normal class (`DiscriminatorConfig.evidence_branch`).

    Why apart: with real anomaly shots a normal class on the type logits themselves lifted pixel
    AUROC and PRO but cost type accuracy, balanced accuracy and mIoU (`discriminator.config.
    uses_normal_embedding`): the C+1-way loss shapes the shared fusion for telling defect from normal,
    the C-way one for telling the types apart. Here each loss trains its own fusion on the same
    frozen backbone levels and batches, so the types are those of a model without the normal class
    and the evidence that of a model with it. Its type embeddings are always learned ones."""

    def __init__(self, channels: list[int], width: int, num_types: int, temperature: float, min_temperature: float):
        super().__init__()
        self.fusion = TopDownFusion(channels, width)
        self.embed = nn.Conv2d(width, width, 1)
        self.type_embeddings = LearnedTypeEmbeddings(num_types, width)
        self.normal_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.min_temperature = min_temperature

    @property
    def temperature(self) -> Tensor:
        return bounded_temperature(self.log_temperature, self.min_temperature)

    def forward(self, levels: list[Tensor]) -> Tensor:
        """The backbone levels the discriminator fuses -> (B, C, h, w) type logits against normal."""
        pixels = F.normalize(self.embed(self.fusion([x.to(self.embed.weight.dtype) for x in levels])), dim=1)
        return type_similarity(pixels, self.type_embeddings(), self.normal_embedding) / self.temperature


class MeanLogitHead(nn.Module):
    """Anomaly logit = mean of the class logits: anomalous where the pixel looks like the types."""

    def __init__(self, config: "DiscriminatorConfig", backbone: Backbone):
        super().__init__()

    def forward(self, pixel_embeddings: Tensor, class_logits: Tensor, features: list[Tensor]) -> Tensor:
        return class_logits.mean(dim=1, keepdim=True)


class ConvHead(nn.Module):
    """A learned 1x1 conv on the (unnormalised) pixel embedding, independent of the type logits."""

    def __init__(self, config: "DiscriminatorConfig", backbone: Backbone):
        super().__init__()
        self.conv = nn.Conv2d(config.width, 1, 1)

    def forward(self, pixel_embeddings: Tensor, class_logits: Tensor, features: list[Tensor]) -> Tensor:
        return self.conv(pixel_embeddings)


class NormalMemoryHead(nn.Module):
    """Base of the heads that remember the normal shots: the memory and its distance map.

    The memory (`discriminator.memory`) knows what normal looked like; it is empty until
    `Discriminator.build_memory` fills it from the normal shots, and is used leave-one-out during
    training and calibration.
    """

    def __init__(self, config: "DiscriminatorConfig", backbone: Backbone):
        super().__init__()
        levels = memory_levels(backbone.strides, config.memory_strides)
        dim = sum(backbone.channels[i] for i in levels)
        shots, entries = config.memory_shape or (0, 0)
        self.memory = NormalMemory(shots, entries, dim, levels, bool(config.self_similarity),
                                   int(config.defect_memory_entries), float(config.defect_image_weight))

    def distance(self, features: list[Tensor], like: Tensor) -> Tensor:
        """(B, 1 or 2, h, w) standardised kNN distance at the resolution and dtype of `like`: the
        pixel map, then the image map if the memory keeps one apart (`NormalMemory.forward`)."""
        if self.memory.shots == 0:
            raise RuntimeError("the memory head has no memory: call Discriminator.build_memory first")
        distance = F.interpolate(self.memory(features), size=like.shape[-2:], mode="bilinear", align_corners=False)
        return distance.to(like.dtype)


class MemoryFusionHead(NormalMemoryHead):
    """The mean class logit fused with the normal shots' kNN distance by a learned 1x1 conv.

    The paper's discriminator knows what defects look like, the memory what normal looked like.
    The fusion starts as their plain sum (weights 1, 1) and is trained on the synthetic data.
    """

    def __init__(self, config: "DiscriminatorConfig", backbone: Backbone):
        super().__init__(config, backbone)
        self.fuse = nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            self.fuse.weight.fill_(1.0)
            self.fuse.bias.zero_()

    def forward(self, pixel_embeddings: Tensor, class_logits: Tensor, features: list[Tensor]) -> Tensor:
        learned = class_logits.mean(dim=1, keepdim=True)
        return self.fuse(torch.cat([learned, self.distance(features, learned)[:, :1]], dim=1))


class MemoryDetectionHead(NormalMemoryHead):
    """Detection from the kNN distance, with a scale and bias to calibrate it (Platt-fitted on
    held-out data and frozen by training, `discriminator.train.fit_memory_detection`), plus, in the
    pixel map, a small weight of learned evidence once training has set it
    (`Discriminator.build_learned_evidence`): how strongly a pixel resembles any anomaly type.

    On MTD the learned map carries less from synthetic to real defects than the distance to real
    normal patches does, and fusing the two by a trained 1x1 conv lowered detection (image AUROC 76
    for the distance alone vs 73 fused, half of the test set): trained on synthetic defects, the
    fusion trusts the learned map as much as it deserved there. Added with a small fixed weight to
    the pixel map alone, the same evidence lifts PRO by about a point and moves pixel AUROC by a few
    tenths (see LEARNED_WEIGHT); the image map adds only what of it exceeds its maximum on the
    normal shots (see IMAGE_EVIDENCE_WEIGHT). The paper's per-pixel type logits still decide the
    type. Unless `train.evidence_loss` asks training to teach that evidence to tell defect from
    normal (`losses.EvidenceObjective`), or a normal embedding gives normal a class of its own, the
    type logits only ever see anomalous pixels.
    """

    PARTS = ("knn", "learned")  # `parts` (not saved) lets an ablation score with one alone

    def __init__(self, config: "DiscriminatorConfig", backbone: Backbone):
        super().__init__(config, backbone)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.learned_weight = float(config.learned_weight)
        self.image_evidence_weight = float(config.image_evidence_weight)
        if self.learned_weight:  # [mean, std] of the evidence on the normal shots; set by set_learned_stats
            self.register_buffer("learned_stats", torch.tensor([0.0, 1.0]))
        if self.image_evidence_weight:  # its maximum there, standardised; set by set_learned_stats
            self.register_buffer("evidence_ceiling", torch.tensor(0.0))
        self.parts = self.PARTS

    @property
    def has_learned(self) -> bool:
        """Whether a learned part exists to score with (`parts`)."""
        return bool(self.learned_weight)

    def set_learned_stats(self, stats: Tensor, weight: float, ceiling: Tensor, image_weight: float) -> None:
        """Turn the learned evidence on: its [mean, std] on the normal shots and its weight in the
        pixel map, and its weight above `ceiling` (its standardised maximum on the shots) in the
        image map (none at `image_weight` 0). Registers the buffers (saved in the checkpoint),
        replacing earlier ones, as `fill_defects` does."""
        self.register_buffer("learned_stats", stats.clone())
        self.learned_weight = float(weight)
        self.image_evidence_weight = float(image_weight)
        if self.image_evidence_weight:
            self.register_buffer("evidence_ceiling", ceiling.detach().clone().reshape(()))

    @contextmanager
    def distance_only(self) -> Iterator[None]:
        """Score with the distance alone for a while: thresholds are calibrated on it, as held-out
        synthetic rows are what the learned evidence knows best (`discriminator.train.calibrate`)."""
        saved, self.parts = self.parts, ("knn",)
        try:
            yield
        finally:
            self.parts = saved

    def evidence(self, class_logits: Tensor) -> Tensor:
        """(B, 1, h, w) learned evidence standardised on the normal shots: ~0 where they are."""
        mean, std = self.learned_stats
        return (learned_evidence(class_logits) - mean) / std

    def forward(self, pixel_embeddings: Tensor, class_logits: Tensor, features: list[Tensor]) -> Tensor:
        parts = self.parts if self.learned_weight else ("knn",)
        if parts == ("learned",):
            return self.scale * self.evidence(class_logits) + self.bias
        distance = self.distance(features, class_logits)
        if "learned" in parts:  # the pixel map, and the image map (the last channel) above the shots' maximum
            evidence = self.evidence(class_logits)
            pixel = distance[:, :1] + self.learned_weight * evidence
            image = distance[:, -1:]
            if self.image_evidence_weight:
                image = image + self.image_evidence_weight * (evidence - self.evidence_ceiling).clamp_min(0.0)
            distance = torch.cat([pixel, image], dim=1)
        return self.scale * distance + self.bias


def learned_evidence(class_logits: Tensor) -> Tensor:
    """(B, C, h, w) type logits -> (B, 1, h, w): how strongly each pixel resembles any anomaly type
    (a soft maximum over the types)."""
    return class_logits.float().logsumexp(dim=1, keepdim=True)


class KnnResidualHead(MemoryDetectionHead):
    """The `knn` head's calibrated distance plus a learned residual that sees the pixel embedding
    and that distance: the synthetic defects can only add to what the normal shots say.

    The residual's last layer starts at zero, so before training the head is exactly the `knn` head
    (whose Platt fit is done on that state and then frozen); training moves only the residual and
    the rest of the discriminator. `parts` (not saved) lets an evaluation score with one part
    alone, for the ablation of `benchmarks/bench_mtd.py`.
    """

    def __init__(self, config: "DiscriminatorConfig", backbone: Backbone):
        super().__init__(config, backbone)
        self.residual = nn.Sequential(
            nn.Conv2d(config.width + 1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 1, 1)
        )
        with torch.no_grad():
            self.residual[-1].weight.zero_()
            self.residual[-1].bias.zero_()

    @property
    def has_learned(self) -> bool:
        return True

    def forward(self, pixel_embeddings: Tensor, class_logits: Tensor, features: list[Tensor]) -> Tensor:
        knn = self.scale * self.distance(features, pixel_embeddings) + self.bias
        learned = self.residual(torch.cat([pixel_embeddings, knn[:, :1]], dim=1))
        if self.parts == ("knn",):
            return knn
        if self.parts == ("learned",):
            return learned
        return knn + learned


DETECTION_HEADS: dict[str, Callable[["DiscriminatorConfig", Backbone], nn.Module]] = {
    "mean_logit": MeanLogitHead,
    "conv": ConvHead,
    "memory": MemoryFusionHead,
    "knn": MemoryDetectionHead,
    "knn_residual": KnnResidualHead,
}


def defect_prototypes(examples: Iterable[tuple[Tensor, Tensor]], num_types: int) -> tuple[Tensor, Tensor] | None:
    """Per type, the mean feature over its examples' defect regions: each example is a (D, h, w)
    feature map and its (H, W) type map (0 normal, 1..C); a cell counts by its defect share, each
    example once per type it shows. -> (C, D) prototypes and (C,) which types had an example; None
    when no example shows a defect."""
    sums, counts = None, torch.zeros(num_types)
    for feats, type_map in examples:
        sums = torch.zeros(num_types, feats.shape[0]) if sums is None else sums
        for t in type_map.unique().tolist():
            if t <= 0:
                continue
            area = F.adaptive_avg_pool2d((type_map == t).float()[None, None], feats.shape[-2:])[0, 0]
            weights = area / area.sum().clamp_min(1e-6)  # cells weighted by their defect share
            sums[t - 1] += (feats * weights).sum(dim=(1, 2))
            counts[t - 1] += 1
    if sums is None or not counts.any():
        return None
    return sums / counts.clamp_min(1)[:, None], counts > 0


class Discriminator(nn.Module):
    def __init__(
        self,
        config: DiscriminatorConfig,
        backbone: Backbone | None = None,
        type_embeddings: TypeEmbeddings | None = None,
        local_files_only: bool = True,
        memory_backbone: Backbone | None = None,
    ):
        super().__init__()
        config = dataclasses.replace(config)  # never mutate the caller's copy
        num_types = len(config.class_names)
        with torch.random.fork_rng(devices=[]):  # building a backbone must not move the global RNG
            self.backbone = backbone if backbone is not None else build_backbone(config.backbone, local_files_only)
            self.memory_backbone = None
            if config.memory_backbone is not None:
                self.memory_backbone = memory_backbone if memory_backbone is not None else build_backbone(
                    config.memory_backbone, local_files_only)
        config.backbone = self.backbone.spec()
        if self.memory_backbone is not None:
            config.memory_backbone = self.memory_backbone.spec()
        num_levels = len(self.backbone.channels)
        self.levels = sorted(config.levels) if config.levels else list(range(num_levels))
        if len(set(self.levels)) != len(self.levels) or not all(0 <= i < num_levels for i in self.levels):
            raise InputError(f"levels {config.levels} must be distinct indices in 0..{num_levels - 1}")
        config.levels = self.levels
        # the trainable parts start from config.seed alone, whatever happened to the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if type_embeddings is None:
                type_embeddings = self._build_type_embeddings(config, local_files_only)
            self.fusion = TopDownFusion([self.backbone.channels[i] for i in self.levels], config.width)
            self.embed = nn.Conv2d(config.width, config.width, 1)
            self.detection_head = DETECTION_HEADS[config.detection_head](config, self.memory_backbone or self.backbone)
            if config.normal_embedding:
                self.normal_embedding = nn.Parameter(torch.randn(config.width) * config.width**-0.5)
            self.evidence_branch = EvidenceBranch(
                [self.backbone.channels[i] for i in self.levels], config.width, num_types, config.temperature,
                config.min_temperature) if config.evidence_branch else None
        if (type_embeddings.num_types, type_embeddings.dim) != (num_types, config.width):
            raise InputError(
                f"type embeddings are {type_embeddings.num_types}x{type_embeddings.dim}, "
                f"need {num_types} types x width {config.width}"
            )
        self.type_embeddings = type_embeddings
        # text_dim, not text_encoder, tells a checkpoint which embedding module to rebuild
        config.text_dim = type_embeddings.text_dim if isinstance(type_embeddings, TextTypeEmbeddings) else None
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)))
        self.config = config
        if config.exposure_match:  # [mean, std] of the normal shots; set by set_exposure_reference
            self.register_buffer("exposure_reference", torch.tensor([0.5, 0.2]))
        # frozen mid-level features, as the memory's: general texture, not what synthetic data taught
        self.prototype_levels = memory_levels(self.backbone.strides, config.memory_strides)
        if config.prototypes:
            dim = sum(self.backbone.channels[i] for i in self.prototype_levels)
            self.register_buffer("type_prototypes", torch.zeros(num_types, dim))
            self.register_buffer("prototype_valid", torch.zeros(num_types, dtype=torch.bool))
            if config.prototype_center:
                self.register_buffer("normal_center", torch.zeros(dim))
            if config.branch_prototypes:
                self.register_buffer("branch_prototypes", torch.zeros(num_types, dim))
                self.register_buffer("branch_prototype_valid", torch.zeros(num_types, dtype=torch.bool))

    @staticmethod
    def _build_type_embeddings(config: DiscriminatorConfig, local_files_only: bool) -> TypeEmbeddings:
        if config.text_encoder is None:
            return LearnedTypeEmbeddings(len(config.class_names), config.width)
        return TextTypeEmbeddings.from_text_encoder(
            config.text_encoder,
            config.class_names,
            config.width,
            category=config.category,
            templates=config.text_templates,
            local_files_only=local_files_only,
        )

    @property
    def temperature(self) -> Tensor:
        return bounded_temperature(self.log_temperature, self.config.min_temperature)

    def forward(self, images: Tensor) -> DiscriminatorOutput:
        """images (B, 3, H, W) in [0, 1] -> logits at the input resolution."""
        features, fused, class_logits = self.embed_and_type(images)
        evidence = self.evidence_logits(features, class_logits)
        size = images.shape[-2:]
        detection = F.interpolate(self.detection_head(fused, evidence, self.memory_features(images, features)),
                                  size=size, mode="bilinear", align_corners=False)
        return DiscriminatorOutput(
            class_logits=F.interpolate(class_logits, size=size, mode="bilinear", align_corners=False),
            detection_logits=detection[:, :1],
            image_logits=detection[:, 1:] if detection.shape[1] > 1 else None,
            evidence_logits=F.interpolate(evidence, size=size, mode="bilinear", align_corners=False)
            if self.training and self.evidence_branch is not None else None,
        )

    def embed_and_type(self, images: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """(B, 3, H, W) images in [0, 1] -> the backbone levels, the fused embedding and the type
        logits at the embedding's resolution: what the detection head reads."""
        features = self.backbone_features(images)
        fused = self.fusion([features[i].to(self.embed.weight.dtype) for i in self.levels])
        pixels = F.normalize(self.embed(fused), dim=1)
        normal = self.normal_embedding if self.config.normal_embedding else None  # each type against normal
        class_logits = type_similarity(pixels, self.type_embeddings(), normal) / self.temperature
        if self.config.prototypes:
            class_logits = class_logits + self.prototype_logits(
                features, class_logits, self.temperature, self.type_prototypes, self.prototype_valid)
        return features, fused, class_logits

    def evidence_logits(self, features: list[Tensor], class_logits: Tensor) -> Tensor:
        """The type logits the detection head reads its learned evidence from: the evidence branch's
        (with type prototypes, as the type logits have them: its own when it has some, else theirs)
        when the model has one, else `class_logits` themselves."""
        branch = self.evidence_branch
        if branch is None:
            return class_logits
        logits = branch([features[i] for i in self.levels])
        if self.config.prototypes:  # branch_prototypes implies prototypes (`DiscriminatorConfig.validate`)
            own = self.config.branch_prototypes
            prototypes = self.branch_prototypes if own else self.type_prototypes
            valid = self.branch_prototype_valid if own else self.prototype_valid
            logits = logits + self.prototype_logits(features, logits, branch.temperature, prototypes, valid)
        return logits

    @torch.no_grad()
    def backbone_features(self, images: Tensor, backbone: Backbone | None = None) -> list[Tensor]:
        """The frozen backbone's levels of (B, 3, H, W) images in [0, 1], after exposure matching
        when the config asks for it: what the heads and the prototypes read, and the memory unless
        it has a backbone of its own (`backbone`, see `memory_features`)."""
        backbone = backbone if backbone is not None else self.backbone
        parameter = next(backbone.parameters())
        images = images.to(parameter.device)
        if self.config.exposure_match:
            images = match_exposure(images, self.exposure_reference)
        return backbone(images.to(parameter.dtype))

    def memory_features(self, images: Tensor, features: list[Tensor] | None = None) -> list[Tensor]:
        """The levels the normal-shot memory reads: the memory backbone's when the model has one
        (`DiscriminatorConfig.memory_backbone`), else the main backbone's (`features`, when already
        computed for these images)."""
        if self.memory_backbone is not None:
            return self.backbone_features(images, self.memory_backbone)
        return features if features is not None else self.backbone_features(images)

    @torch.no_grad()
    def set_exposure_reference(self, shots: list[Tensor]) -> None:
        """Store the normal shots' ((3, H, W) in [0, 1]) mean intensity and contrast, which every
        image is matched to (`exposure_match`); a no-op when the config has it off."""
        if self.config.exposure_match and shots:
            self.exposure_reference.copy_(reference_statistics(torch.stack(shots)).to(self.exposure_reference))

    @property
    def memory(self) -> NormalMemory | None:
        """The normal-shot memory of the detection head, if it has one."""
        return getattr(self.detection_head, "memory", None)

    @torch.no_grad()
    def build_memory(self, shots: list[Tensor]) -> None:
        """Fill the memory from the normal shots ((3, H, W) tensors in [0, 1]), their flips and exposures;
        the checkpoint's config records its shape so `from_pretrained` can rebuild it. A no-op
        for heads without memory."""
        memory = self.memory
        if memory is None:
            return
        if not shots:
            raise InputError(f"detection_head {self.config.detection_head!r} needs at least one normal shot")
        per_shot = [patch_features(self.memory_features(memory_views(shot)), memory.levels) for shot in shots]
        memory.fill(per_shot, self.config.memory_fraction)
        self.config.memory_shape = list(memory.bank.shape[:2])

    @torch.no_grad()
    def build_defect_memory(self, shots: list[tuple[Tensor, Tensor]], normals: list[Tensor]) -> None:
        """Give the memory a bank of the real anomaly shots' defect cells ((3, H, W) image in [0, 1],
        (H, W) type map 0 / 1..C), from each shot and its flips: in the pixel map a pixel nearer to a
        real defect than to normal scores higher, and in the image map what of that exceeds its
        maximum over the normal shots' (`normals`, those of `build_memory`) flipped views
        (`NormalMemory.forward`). A no-op for heads without memory or without shots."""
        memory = self.memory
        if memory is None or not shots:
            return
        features = [patch_features(self.memory_features(flipped_views(image)), memory.levels) for image, _ in shots]
        masks = [flipped_views(type_map > 0) for _, type_map in shots]
        memory.fill_defects(features, masks, self.config.memory_fraction)
        memory.set_defect_ceiling([patch_features(self.memory_features(flipped_views(image)), memory.levels)
                                   for image in normals])
        self.config.defect_memory_entries = memory.defect_entries
        self.config.defect_image_weight = memory.defect_image_weight

    @torch.no_grad()
    def build_learned_evidence(self, shots: list[Tensor], weight: float, image_weight: float = 0.0) -> None:
        """Add `weight` times the learned type evidence (`learned_evidence`, standardised on the
        normal shots' (3, H, W) images and their flips) to the `knn` head's pixel map, and
        `image_weight` times what of it exceeds its maximum over those views to the image map;
        called after training, so that training never sees it. A no-op for other heads, without
        shots or at weight 0.

        Why only above that maximum in the image map: the shots were trained on as normal, so their
        evidence runs lower than a new normal image's, and the image threshold's floor is their
        scores (`discriminator.train.calibrate`). Added whole, the evidence lifted image AUROC but
        the floor then flagged more normal images (MTD development part, zero-shot, weight 0.25:
        accuracy 72.75 -> 71.4). Above the maximum, the shots' views score exactly as before."""
        head = self.detection_head
        if type(head) is not MemoryDetectionHead or not shots or weight <= 0:
            return
        was_training = self.training
        self.eval()
        views = torch.cat([flipped_views(shot) for shot in shots]).to(self.log_temperature.device)
        evidence = torch.cat([self.raw_evidence(views[i:i + 8]) for i in range(0, len(views), 8)])
        self.train(was_training)
        stats = standardise(evidence).to(views.device)
        head.set_learned_stats(stats, weight, (evidence.max() - stats[0]) / stats[1], image_weight)
        self.config.learned_weight = float(weight)
        self.config.image_evidence_weight = head.image_evidence_weight

    def raw_evidence(self, images: Tensor) -> Tensor:
        """(B, 1, h, w) learned evidence of (B, 3, H, W) images in [0, 1], before the head standardises
        it: `learned_evidence` of the logits it reads (`evidence_logits`)."""
        features, _, class_logits = self.embed_and_type(images)
        return learned_evidence(self.evidence_logits(features, class_logits))

    def prototype_logits(self, features: list[Tensor], like: Tensor, temperature: Tensor, prototypes: Tensor,
                         valid: Tensor) -> Tensor:
        """(B, C, h, w) cosine of each pixel's frozen feature to each type's prototype (`prototypes`,
        (C, D); `valid`, (C,): which types have one), over the `temperature` of the learned type logits
        it is added to, at the size of `like`. A type without a prototype gets the mean similarity of
        those with one: no pull either way. With `prototype_center` both are taken relative to the
        normal shots' mean feature first."""
        pixels = patch_features(features, self.prototype_levels)
        if self.config.prototype_center:
            pixels = pixels - self.normal_center.view(1, -1, 1, 1).to(pixels.dtype)
            prototypes = prototypes - self.normal_center
        pixels = F.normalize(pixels, dim=1)
        sims = torch.einsum("bdhw,cd->bchw", pixels, F.normalize(prototypes, dim=-1))
        valid = valid.view(1, -1, 1, 1).to(sims.dtype)
        mean = (sims * valid).sum(dim=1, keepdim=True) / valid.sum().clamp_min(1.0)
        sims = sims * valid + mean * (1.0 - valid)
        sims = F.interpolate(sims, size=like.shape[-2:], mode="bilinear", align_corners=False)
        return (sims / temperature).to(like.dtype)

    @torch.no_grad()
    def build_prototypes(self, shots: Iterable[tuple[Tensor, Tensor]], normals: list[Tensor] | None = None,
                         for_branch: bool = False) -> None:
        """Each type's prototype = the mean frozen feature over its examples' defect regions
        ((3, H, W) image in [0, 1], (H, W) type map 0 / 1..C): the real anomaly shots (one real
        example then counts for classification directly, next to the type embeddings learned
        from synthetic defects) or, zero-shot, the synthetic training rows. Registers the buffers
        (saved in the checkpoint) when the config had none; a no-op without shots.

        With `normals` ((3, H, W) normal images) the mean of their features becomes the centre
        both sides are compared from (`prototype_logits`). Why: a defect region's mean feature is
        mostly the product's own texture, which every type shares, so raw cosines of all types
        are high and alike; from the normal centre each prototype is the direction in which its
        type departs from normal (the centring of nearest-prototype few-shot classifiers).

        `for_branch`: the evidence branch's own prototypes (`evidence_logits`), once the type
        logits' are built; training gives it the synthetic rows a recipe made. Why: a real shot's
        prototype is one defect, and the rows cut from it repeat it, so as image-level evidence the
        real shots' prototypes carry almost nothing, while varied recipe-made defects carry what
        zero-shot's image score gains from them. MTD few-shot development part, the branch
        checkpoints of seeds 0 and 1 rebuilt (mean): image AUROC +0.95, pixel AUROC +0.7, PRO
        +0.6, balanced accuracy +1.7, accuracy -0.45, mIoU -0.05; with every synthetic row
        (pasted ones too) +0.55 / +0.1 / +0.3 / -0.3 / +0.85 / -0.05."""
        if for_branch and (self.evidence_branch is None or not self.config.prototypes):
            raise ValueError("branch prototypes need an evidence branch and the type logits' prototypes")

        def features_of(image: Tensor) -> Tensor:
            return patch_features(self.backbone_features(image[None]), self.prototype_levels)[0].cpu()

        found = defect_prototypes(((features_of(image), type_map) for image, type_map in shots),
                                  len(self.config.class_names))
        if found is None:
            return
        prototypes, valid = found
        names = ("branch_prototypes", "branch_prototype_valid") if for_branch else ("type_prototypes", "prototype_valid")
        flag = "branch_prototypes" if for_branch else "prototypes"
        device = self.log_temperature.device
        if not getattr(self.config, flag):
            self.register_buffer(names[0], prototypes.to(device))
            self.register_buffer(names[1], valid.to(device))
            setattr(self.config, flag, True)
        else:
            getattr(self, names[0]).copy_(prototypes)
            getattr(self, names[1]).copy_(valid)
        if normals and not for_branch:
            center = torch.stack([features_of(image).mean(dim=(1, 2)) for image in normals]).mean(dim=0)
            if not self.config.prototype_center:
                self.register_buffer("normal_center", center.to(device))
                self.config.prototype_center = True
            else:
                self.normal_center.copy_(center)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- checkpoint -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model.safetensors then config.json (last, so its presence marks a complete save)."""
        directory = Path(directory)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})
            digest = weights_digest(Path(tmp))
        payload = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, DIGEST_KEY: digest,
                   **self.config.to_dict()}
        write_text_atomic(directory / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        expected_category: str | None = None,
        expected_backbone: dict | str | None = None,
    ) -> "Discriminator":
        directory = Path(directory)
        config = read_config(directory)
        if expected_category is not None and config.category != expected_category:
            raise InputError(
                f"checkpoint is for category {config.category!r}, expected {expected_category!r}", directory
            )
        if expected_backbone is not None and backbone_identity(expected_backbone) != backbone_identity(config.backbone):
            raise InputError(
                f"checkpoint backbone is {backbone_identity(config.backbone)!r}, "
                f"expected {backbone_identity(expected_backbone)!r}",
                directory,
            )
        with torch.random.fork_rng(devices=[]):  # placeholder weights, overwritten below
            backbone = build_backbone(config.backbone, load_weights=False)
            memory_backbone = (build_backbone(config.memory_backbone, load_weights=False)
                               if config.memory_backbone is not None else None)
            embeddings = None
            if config.text_dim:
                embeddings = TextTypeEmbeddings(torch.zeros(len(config.class_names), config.text_dim), config.width)
        model = cls(config, backbone=backbone, type_embeddings=embeddings, memory_backbone=memory_backbone)
        try:
            load_model(model, directory / WEIGHTS_NAME, strict=True)
        except Exception as exc:  # noqa: BLE001 - any failure here means the file does not fit the config
            raise InputError(f"{WEIGHTS_NAME} does not match config.json ({exc})", directory) from exc
        return model.to(device).eval()


def read_config(directory: Path) -> DiscriminatorConfig:
    """config.json of a checkpoint dir, validated; InputError naming the directory otherwise."""
    if not directory.is_dir():
        raise InputError("checkpoint directory not found", directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise InputError(f"not a discriminator checkpoint: {name} missing", directory)
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable {CONFIG_NAME} ({exc})", directory) from exc
    if not isinstance(data, dict) or data.pop("model_type", None) != MODEL_TYPE:
        raise InputError(f"{CONFIG_NAME} is not a {MODEL_TYPE} config", directory)
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise InputError(f"unsupported checkpoint format_version {version!r} (expected {FORMAT_VERSION})", directory)
    check_weights_digest(directory, data.pop(DIGEST_KEY, None))
    return DiscriminatorConfig.from_dict(data, path=directory)


def weights_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_weights_digest(directory: Path, recorded: str | None) -> None:
    """The weights must be the file this config.json was saved with: a config.json copied from
    another checkpoint of the same architecture would load without a word and score with the
    other model's calibrated thresholds. Checkpoints saved before the digest existed (no key)
    load unchecked."""
    if recorded is None:
        return
    found = weights_digest(directory / WEIGHTS_NAME)
    if found != recorded:
        raise InputError(
            f"{WEIGHTS_NAME} is not the file this {CONFIG_NAME} was saved with (sha256 {found[:12]}…, "
            f"{CONFIG_NAME} records {str(recorded)[:12]}…); keep each checkpoint's two files together",
            directory,
        )

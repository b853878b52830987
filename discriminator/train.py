"""Training the discriminator: a fixed number of steps, then threshold calibration on held-out data.

`train_discriminator` reads top to bottom as numbered steps. The checkpoint is the model after the
last step (no checkpoint is picked on any test data), and its thresholds are calibrated on synthetic
rows held out from training plus the real normal shots, so evaluation never tunes anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from discriminator import losses
from discriminator.config import TrainConfig
from discriminator.data import (ANOMALY_POOL, SYNTHETIC_POOL, ImagePool, TrainingData, iter_pool_tensors, pool_tensors,
                                recipe_rows, to_tensors)
from discriminator.metrics import best_f1
from discriminator.memory import FLIPS
from discriminator.model import MemoryDetectionHead, learned_evidence
from discriminator.predict import Predictor, autocast, resolve_device
from core.manifest import write_text_atomic

TRAIN_LOG = "train_log.json"


@dataclass
class Calibration:
    """Thresholds chosen on held-out data (see `calibrate`)."""

    pixel_threshold: float
    image_threshold: float
    pixel_f1: float | None  # None: nothing held out, the config's defaults were kept
    image_balanced_accuracy: float | None
    holdout_images: int
    normal_images: int
    # the kNN head's Platt-fitted logit = scale · distance + bias (see `fit_memory_detection`); None otherwise
    detection_scale: float | None = None
    detection_bias: float | None = None
    # the highest image score of a normal shot's flipped view (leave-one-out): the image threshold's floor
    normal_view_max_score: float | None = None


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    device: str
    calibration: Calibration


def poly_schedule(optimizer: torch.optim.Optimizer, steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr · (1 - step/steps)^power: the decay used by the paper's reference training."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(1.0 - step / steps, 0.0) ** power)


def loss_parts(loss: losses.LossParts) -> dict[str, float]:
    """The loss parts as floats, for the progress bar and the log."""
    return {f.name: float(getattr(loss, f.name).detach()) for f in dataclasses.fields(loss)}


def _with_margin(cut: float, scores: np.ndarray) -> float:
    """Decisions are `score > threshold`: move the cut (the lowest kept positive score) midway to
    the next lower score, a margin on both sides instead of sitting on a calibration sample. Kept
    below the cut in the scores' own dtype too: float32 maps are compared in float32, where the
    float64 midpoint of two neighbouring values can round back onto the cut."""
    below = scores[scores < cut]
    threshold = (cut + below.max()) / 2 if below.size else cut
    dtype = scores.dtype.type if np.issubdtype(scores.dtype, np.floating) else np.float64
    if dtype(threshold) >= dtype(cut):
        threshold = np.nextafter(dtype(cut), dtype(-np.inf))
    return float(threshold)


def separating_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) of the F1-max cut, with a margin."""
    point = best_f1(labels, scores)
    return _with_margin(point.threshold, scores), point.f1


def matched_rate_threshold(reference: np.ndarray, cut: float, scores: np.ndarray) -> float:
    """The threshold on `scores` that flags the same fraction of them as `cut` flags of `reference`
    (both the same normal pixels, scored by two maps): it carries a cut chosen on one map over to
    another whose normal pixels spread differently."""
    rate = float(np.mean(reference > cut))
    if rate <= 0.0:
        return max(cut, float(scores.max()))
    # the k-th highest score is the lowest flagged one; the cut goes just below it
    k = max(1, int(round(rate * scores.size)))
    return _with_margin(float(np.partition(scores, scores.size - k)[scores.size - k]), scores)


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy) of the cut maximising TPR - FPR (Youden's J), with a margin.

    Unlike F1 it ignores the class ratio, which at calibration (many held-out anomalies, a couple
    of normal shots) is the reverse of a real test set's.
    """
    labels = np.asarray(labels, bool)
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    cuts = np.unique(positives)  # only a positive's score can be an optimal cut
    tpr = 1.0 - np.searchsorted(positives, cuts, side="left") / positives.size
    fpr = 1.0 - np.searchsorted(negatives, cuts, side="left") / negatives.size if negatives.size else 0.0 * cuts
    best = int(np.argmax(tpr - fpr))
    return _with_margin(float(cuts[best]), scores), float((1.0 + tpr[best] - fpr[best]) / 2)


def floored_threshold(threshold: float, normal_scores: np.ndarray) -> float:
    """`threshold` raised, if needed, so that none of `normal_scores` is flagged (`score > threshold`)."""
    return max(threshold, float(normal_scores.max())) if normal_scores.size else threshold


def pool_batches(pool: ImagePool, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(images (B, 3, H, W) in [0, 1], defect masks (B, H, W) bool) of a pool in order, no augmentation."""
    for start in range(0, len(pool), batch_size):
        pairs = [to_tensors(pool[i]) for i in range(start, min(start + batch_size, len(pool)))]
        yield torch.stack([image for image, _ in pairs]), torch.stack([target for _, target in pairs]).numpy() > 0


def score_pool(predictor: Predictor, pool: ImagePool, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anomaly maps (N, H, W), defect masks (N, H, W), image scores (N,)) of a pool, no augmentation."""
    maps, masks, scores = [], [], []
    for images, batch_masks in pool_batches(pool, batch_size):
        prediction = predictor(images)
        maps.append(prediction.anomaly_maps.numpy())
        scores.append(prediction.scores.numpy())
        masks.append(batch_masks)
    if not maps:
        return np.zeros((0, 1, 1), np.float32), np.zeros((0, 1, 1), bool), np.zeros(0, np.float32)
    return np.concatenate(maps), np.concatenate(masks), np.concatenate(scores)


def pool_logits(model: torch.nn.Module, pool: ImagePool, device: torch.device,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw detection logits (N, H, W), defect masks (N, H, W)) of a non-empty pool, no augmentation."""
    logits, masks = [], []
    for images, batch_masks in pool_batches(pool, batch_size):
        with torch.inference_mode(), autocast(device):
            output = model(images.to(device))
        logits.append(output.detection_logits.float()[:, 0].cpu().numpy())
        masks.append(batch_masks)
    return np.concatenate(logits), np.concatenate(masks)


def fit_platt(scores: np.ndarray, labels: np.ndarray, ridge: float = 1e-4) -> tuple[float, float]:
    """(a, b) minimising the mean binary cross entropy of sigmoid(a·score + b) (Platt scaling); the
    small ridge on `a` keeps it finite when the classes happen to separate."""
    x = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
        loss = loss + ridge * params[0] ** 2
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    a, b = params.detach().tolist()
    return float(a), float(b)


def fit_memory_detection(model: torch.nn.Module, data: TrainingData, device: torch.device,
                         batch_size: int) -> tuple[float, float] | None:
    """Fit the `knn` head's scale and bias by Platt scaling on the held-out synthetic rows plus the
    normal shots (leave-one-out, unaugmented), then freeze them; (scale, bias), or None when the
    model has no such head or nothing anomalous is held out (they then train as before).

    Why not train them: they are the head's only parameters that the detection loss reaches, yet
    AdamW moves a scalar by about lr per step (< 0.3 over a run), while the training images'
    photometric augmentation makes normal pixels look far from the unaugmented memory. They stayed
    near (1, 0), so the logit was the raw standardised distance (median 15 on held-out defects, 26
    on the demo test set's) and sigmoid saturated to exactly 1.0 in float32: tied maps and image
    scores, a pixel threshold of 0.99999.
    """
    head = getattr(model, "detection_head", None)
    if not isinstance(head, MemoryDetectionHead) or len(data.holdout) == 0:
        return None
    with torch.no_grad():
        head.scale.fill_(1.0)
        head.bias.zero_()
    was_training = model.training
    model.eval()
    pools = [pool_logits(model, pool, device, batch_size) for pool in (data.holdout, data.normal_shots) if len(pool)]
    model.train(was_training)
    distances = np.concatenate([logits.reshape(-1) for logits, _ in pools])
    labels = np.concatenate([masks.reshape(-1) for _, masks in pools])
    if not labels.any():
        return None
    scale, bias = fit_platt(distances, labels)
    with torch.no_grad():
        head.scale.fill_(scale)
        head.bias.fill_(bias)
    head.scale.requires_grad_(False)
    head.bias.requires_grad_(False)
    return scale, bias


def flipped_view_scores(predictor: Predictor, pool: ImagePool, batch_size: int) -> np.ndarray:
    """Image scores of the flipped views of every normal shot (the memory's other views;
    leave-one-out while training, so each is scored as a new normal image would be). The
    unflipped shots are scored by `score_pool` already."""
    scores = [predictor(images.flip(dims)).scores.numpy()
              for images, _ in pool_batches(pool, batch_size) for dims in FLIPS if dims]
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def calibrate(model: torch.nn.Module, data: TrainingData, device: torch.device, batch_size: int) -> Calibration:
    """Pixel threshold: F1-max over held-out synthetic pixels + normal-shot pixels (segmentation's
    usual criterion); image threshold: max balanced accuracy over their image scores, but never
    below the score of a flipped normal shot. Without held-out anomalies the config's values are kept.
    The pixel cut is chosen on the `knn` head's distance without its learned evidence
    (`distance_only`). Held-out synthetic rows are what the evidence knows best: a pixel cut
    F1-fitted to the map with it fell on the demo's fabric from 0.105 to 0.037 and real defects
    overgrew (mIoU 31 -> 24). The distance's cut is carried over to the map with the evidence at the
    same rate of flagged non-defect pixels (`matched_rate_threshold`): the evidence widens the
    normal pixels' spread, and the same cut then overgrew the demo's defects too. The image
    threshold is chosen on the image scores prediction reads, with the evidence; on the shots' views
    it adds nothing (`Discriminator.build_learned_evidence`), so the floor is the distance's.

    Why the floor: with two normal shots, balanced accuracy moves in steps of 1/2 on the normal
    side, so it readily gives up one shot to catch a few more synthetic defects, and real normal
    images, more varied than the shots, then score above the cut in large numbers (on the MTD
    development part 43 % of the normal images were flagged). No normal view the training has
    seen may be flagged: zero-shot / few-shot accuracy 51.8 / 50.1 -> 59.6 / 60.4, balanced
    accuracy 39.8 / 45.8 -> 39.5 / 46.5 (`benchmarks/bench_mtd.py`)."""
    predictor = Predictor(model, device=device)
    head = getattr(model, "detection_head", None)  # the plain knn head, when it has learned evidence
    evidence_head = head if type(head) is MemoryDetectionHead and head.has_learned else None
    with evidence_head.distance_only() if evidence_head else nullcontext():
        h_maps, h_masks, h_scores = score_pool(predictor, data.holdout, batch_size)
        n_maps, n_masks, n_scores = score_pool(predictor, data.normal_shots, batch_size)
    maps, masks = np.concatenate([h_maps.reshape(-1), n_maps.reshape(-1)]), np.concatenate(
        [h_masks.reshape(-1), n_masks.reshape(-1)])
    image_labels = np.r_[h_masks.reshape(len(h_masks), -1).any(axis=1), np.zeros(len(n_scores), bool)]
    calibration = Calibration(predictor.pixel_threshold, predictor.image_threshold, None, None,
                              len(h_scores), len(n_scores))
    if evidence_head:  # what prediction reads: the maps and image scores with the evidence
        (h_evidence_maps, _, h_scores), (n_evidence_maps, _, n_scores) = (
            score_pool(predictor, pool, batch_size) for pool in (data.holdout, data.normal_shots))
    if masks.any():
        calibration.pixel_threshold, calibration.pixel_f1 = separating_threshold(masks, maps)
        if evidence_head:
            with_evidence = np.concatenate([h_evidence_maps.reshape(-1), n_evidence_maps.reshape(-1)])
            calibration.pixel_threshold = matched_rate_threshold(
                maps[~masks], calibration.pixel_threshold, with_evidence[~masks])
    if image_labels.any():
        calibration.image_threshold, calibration.image_balanced_accuracy = balanced_threshold(
            image_labels, np.r_[h_scores, n_scores])
        views = np.r_[n_scores, flipped_view_scores(predictor, data.normal_shots, batch_size)]
        calibration.image_threshold = floored_threshold(calibration.image_threshold, views)
        calibration.normal_view_max_score = float(views.max()) if views.size else None
    return calibration


def evidence_objective(model: torch.nn.Module, config: TrainConfig) -> losses.EvidenceObjective | None:
    """The learned evidence's own detection loss (`losses.EvidenceObjective`) when its weight is above
    0 and the plain `knn` head will add that evidence to its pixel map; None otherwise.

    Off by default. Weight 1, MTD development part, two seeds: zero-shot PRO +1.6, balanced accuracy
    +2.3, mIoU +1.3; few-shot PRO +1.1 but balanced accuracy -5.3 and mIoU -2.9; the demo's surface
    lost its cracks to scratches (type accuracy 95.2 -> 81.0) while its maps improved. Pushing every
    normal pixel away from all type embeddings pulls similar types together."""
    head = getattr(model, "detection_head", None)
    if config.evidence_loss <= 0 or config.learned_weight <= 0 or type(head) is not MemoryDetectionHead:
        return None
    return losses.EvidenceObjective(config.evidence_loss)


def prototype_sources(data: TrainingData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, type map) pairs the type prototypes are built from, decoded as they are read: the
    real anomaly shots when there are any, else the synthetic training rows (never the held-out ones)."""
    return iter_pool_tensors(data.dataset.pools[ANOMALY_POOL if data.anomaly_shots else SYNTHETIC_POOL])


def train_discriminator(model: torch.nn.Module, data: TrainingData, config: TrainConfig,
                        out_dir: str | Path, show_progress: bool = True) -> TrainResult:
    """Train `model` on `data` for `config.steps` steps, calibrate, save to `out_dir`."""
    out_dir = Path(out_dir)
    # 1. device: CUDA when present (bf16 autocast there), fp32 on CPU
    device = resolve_device(config.device)
    model.to(device).train()

    # 2. a memory head remembers the normal shots (and, few-shot, the real defects' cells); training
    #    and calibration see it leave-one-out, without the defects, because the synthetic images are
    #    painted on those very shots (and pasted from those defects). The knn head's scale and
    #    bias are then Platt-fitted on the held-out rows and frozen
    #    (after the exposure reference every image is matched to, which the memory's views go through too)
    normals = [image for image, _ in pool_tensors(data.normal_shots)]
    model.set_exposure_reference(normals)
    memory = getattr(model, "memory", None)
    if memory is not None:
        model.build_memory(normals)
        if config.defect_memory:
            model.build_defect_memory(pool_tensors(data.dataset.pools.get(ANOMALY_POOL)), normals)
        memory.leave_one_out = True
    platt = fit_memory_detection(model, data, device, config.batch_size)

    # 3. optimiser and poly schedule over the trainable parameters only (the backbone is frozen)
    #    (plus, with train.evidence_loss, the scalars of the learned evidence's objective)
    objective = evidence_objective(model, config)
    groups = [{"params": list(model.trainable_parameters())}]
    if objective is not None:
        objective.to(device)
        groups.append({"params": list(objective.parameters()), "lr": objective.SCALAR_LR, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = poly_schedule(optimizer, config.steps, config.poly_power)

    # 4. the fixed number of steps; every batch mixes real normals, real anomaly shots and synthetic rows
    log: list[dict[str, float]] = []
    images_seen, started = 0, time.perf_counter()
    bar = tqdm(data.loader(config.num_workers), total=config.steps, desc="train", disable=not show_progress)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device):
            output = model(images)
        # computed in fp32 whatever the autocast
        loss = losses.discriminator_loss(output, targets, normal_class=model.config.normal_embedding)
        if objective is not None:
            evidence_logits = output.class_logits if output.evidence_logits is None else output.evidence_logits
            loss.evidence = objective(learned_evidence(evidence_logits), targets)
            loss.total = loss.total + loss.evidence
        if not torch.isfinite(loss.total):
            raise FloatingPointError(f"loss is {float(loss.total)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        scheduler.step()
        images_seen += len(images)
        parts = loss_parts(loss)
        log.append({"step": step, **parts, "lr": optimizer.param_groups[0]["lr"]})
        hidden = {"evidence"} if objective is None else set()  # no column for a part that is off
        hidden |= {"branch_ce"} if output.evidence_logits is None else set()
        bar.set_postfix({name: f"{value:.3f}" for name, value in parts.items() if name not in hidden})
    seconds = time.perf_counter() - started
    model.eval()

    # 5. type prototypes (buffers saved in the checkpoint), added to the learned type logits: each
    #    type's mean defect-region feature over the real anomaly shots (few-shot), else over the
    #    synthetic training rows (zero-shot), both sides taken from the normal shots' mean feature
    #    (few-shot, the evidence branch gets its own from the recipe-made synthetic rows);
    #    with train.learned_weight > 0 the knn head's pixel map then adds the learned evidence
    #    (standardised on the normal shots), which training itself never saw; then calibrate the
    #    thresholds on held-out synthetic rows + the normal shots and store them in the config
    if config.prototypes:
        model.build_prototypes(prototype_sources(data), normals=normals)
        if model.evidence_branch is not None and data.anomaly_shots:
            model.build_prototypes(iter_pool_tensors(recipe_rows(data.dataset.pools[SYNTHETIC_POOL])),
                                   for_branch=True)
    model.build_learned_evidence(normals, config.learned_weight, config.image_evidence_weight)
    calibration = calibrate(model, data, device, config.batch_size)
    calibration.detection_scale, calibration.detection_bias = platt or (None, None)
    model.config.pixel_threshold = calibration.pixel_threshold
    model.config.image_threshold = calibration.image_threshold
    if memory is not None:
        memory.leave_one_out = False

    # 6. save the checkpoint and the training log (a DVC plot)
    model.save_pretrained(out_dir)
    result = TrainResult(
        steps=len(log),
        final_loss=log[-1]["total"] if log else math.nan,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else math.nan,
        device=str(device),
        calibration=calibration,
    )
    write_text_atomic(out_dir / TRAIN_LOG, json.dumps({**dataclasses.asdict(result), "log": log}, indent=1))
    return result

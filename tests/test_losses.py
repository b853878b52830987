"""Discriminator losses against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from discriminator import losses
from discriminator.losses import (LossWeights, dice_loss, discriminator_loss, focal_loss, normal_class_cross_entropy,
                                  type_cross_entropy)
from discriminator.model import DiscriminatorOutput


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([0.0, 2.0, -1.0])
    target = torch.tensor([1.0, 0.0, 0.0])
    # p_t per element: sigmoid(0) for a positive, 1 - sigmoid(x) for the negatives
    p_t = [0.5, 1 - sigmoid(2.0), 1 - sigmoid(-1.0)]
    expected = sum((1 - p) ** 2 * -math.log(p) for p in p_t) / 3
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_with_gamma_zero_is_bce_and_downweights_easy_pixels():
    logits = torch.tensor([3.0, -0.5, 0.2, -4.0])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-6)
    assert focal_loss(logits, target, gamma=2.0) < bce


def test_dice_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # probs .5 .5 .75 .25
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    intersection, probs_sum, target_sum = 0.5 + 0.75, 2.0, 2.0
    expected = 1 - (2 * intersection + 1) / (probs_sum + target_sum + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert dice_loss(torch.tensor([30.0, -30.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_type_cross_entropy_only_counts_anomalous_pixels():
    torch.manual_seed(0)
    class_logits = torch.randn(1, 3, 2, 2)
    type_map = torch.tensor([[[0, 2], [3, 0]]])  # two anomalous pixels: types 1 and 2 (0-based)
    expected = (
        F.cross_entropy(class_logits[:, :, 0, 1], torch.tensor([1]))
        + F.cross_entropy(class_logits[:, :, 1, 0], torch.tensor([2]))
    ) / 2
    assert type_cross_entropy(class_logits, type_map).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = class_logits.clone()
    changed[:, :, 0, 0] += 5.0  # a normal pixel: must not matter
    assert type_cross_entropy(changed, type_map).item() == pytest.approx(expected.item(), rel=1e-6)


def make_output(batch: int = 2, types: int = 3, size: int = 4, seed: int = 0) -> DiscriminatorOutput:
    gen = torch.Generator().manual_seed(seed)
    return DiscriminatorOutput(
        class_logits=torch.randn(batch, types, size, size, generator=gen).requires_grad_(True),
        detection_logits=torch.randn(batch, 1, size, size, generator=gen).requires_grad_(True),
    )


def test_total_is_weighted_sum_of_parts():
    output = make_output()
    type_map = torch.zeros(2, 4, 4, dtype=torch.long)
    type_map[0, 1:3, 1:3] = 2
    type_map[1, 0, :] = 3
    loss = discriminator_loss(output, type_map)
    masks = (type_map > 0).unsqueeze(1).float()
    assert loss.focal.item() == pytest.approx(focal_loss(output.detection_logits, masks).item())
    assert loss.dice.item() == pytest.approx(dice_loss(output.detection_logits, masks).item())
    assert loss.ce.item() > 0
    assert loss.total.item() == pytest.approx(loss.focal.item() + loss.dice.item() + 0.5 * loss.ce.item(), rel=1e-6)
    custom = discriminator_loss(output, type_map, LossWeights(focal=0.0, dice=0.0, ce=1.0))
    assert custom.total.item() == pytest.approx(loss.ce.item(), rel=1e-6)


def test_all_normal_batch_gives_zero_ce_and_finite_gradients():
    output = make_output()
    loss = discriminator_loss(output, torch.zeros(2, 4, 4, dtype=torch.long))
    assert loss.ce.item() == 0.0
    assert torch.isfinite(loss.total)
    loss.total.backward()
    assert torch.isfinite(output.class_logits.grad).all() and torch.isfinite(output.detection_logits.grad).all()
    assert output.class_logits.grad.abs().sum() == 0  # no anomalous pixel: the types get no signal


def test_mismatched_shapes_and_ids_are_rejected():
    output = make_output()
    with pytest.raises(ValueError):
        discriminator_loss(output, torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        discriminator_loss(output, torch.full((2, 4, 4), 4, dtype=torch.long))  # only 3 types


def test_normal_class_cross_entropy_weighs_normal_and_anomalous_pixels_alike():
    torch.manual_seed(0)
    class_logits = torch.randn(1, 3, 2, 2)
    type_map = torch.tensor([[[0, 2], [0, 0]]])  # one anomalous pixel (type 2), three normal ones
    with_normal = torch.cat([torch.zeros(1, 1, 2, 2), class_logits], dim=1)  # the normal logit is 0
    per_pixel = F.cross_entropy(with_normal, type_map, reduction="none")[0]
    expected = per_pixel[0, 1] + (per_pixel[0, 0] + per_pixel[1, 0] + per_pixel[1, 1]) / 3
    assert normal_class_cross_entropy(class_logits, type_map).item() == pytest.approx(expected.item(), rel=1e-6)
    # unlike the C-way loss, a normal pixel that looks like a type costs more
    changed = class_logits.clone()
    changed[:, :, 0, 0] += 5.0
    assert normal_class_cross_entropy(changed, type_map) > normal_class_cross_entropy(class_logits, type_map) + 1.0
    # without anomalous pixels only the normal part is left
    normal_only = torch.zeros_like(type_map)
    expected_normal = F.cross_entropy(with_normal, normal_only)
    assert normal_class_cross_entropy(class_logits, normal_only).item() == pytest.approx(expected_normal.item(),
                                                                                         rel=1e-6)


def test_discriminator_loss_takes_the_normal_class_cross_entropy_when_asked():
    output = make_output()
    type_map = torch.zeros(2, 4, 4, dtype=torch.long)
    type_map[0, :2, :2] = 2
    plain, with_normal = discriminator_loss(output, type_map), discriminator_loss(output, type_map, normal_class=True)
    assert plain.ce.item() == pytest.approx(type_cross_entropy(output.class_logits, type_map).item(), rel=1e-6)
    assert with_normal.ce.item() == pytest.approx(
        normal_class_cross_entropy(output.class_logits, type_map).item(), rel=1e-6)
    assert with_normal.focal.item() == pytest.approx(plain.focal.item())


def test_an_evidence_branch_learns_the_normal_class_next_to_the_plain_type_loss():
    output = make_output()
    type_map = torch.zeros(2, 4, 4, dtype=torch.long)
    type_map[0, :2, :2] = 2
    plain = discriminator_loss(output, type_map)
    assert plain.branch_ce.item() == 0.0
    output.evidence_logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    branched = discriminator_loss(output, type_map)
    expected = normal_class_cross_entropy(output.evidence_logits, type_map)
    assert branched.branch_ce.item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 0
    assert branched.ce.item() == pytest.approx(plain.ce.item())  # the type logits keep their C-way loss
    assert branched.total.item() == pytest.approx(plain.total.item() + 0.5 * expected.item(), rel=1e-6)
    branched.total.backward()
    assert output.evidence_logits.grad[1].abs().sum() > 0  # normal pixels teach the branch
    assert output.class_logits.grad[1].abs().sum() == 0  # and not the type logits


def test_evidence_objective_rewards_evidence_that_is_high_on_defects_only():
    type_map = torch.zeros(2, 8, 8, dtype=torch.long)
    type_map[:, 2:4, 2:5] = 3  # a defect in both images
    defect = (type_map > 0).unsqueeze(1).float()
    objective = losses.EvidenceObjective(weight=1.0)
    separating = objective(8.0 * defect - 4.0, type_map)
    inverted = objective(4.0 - 8.0 * defect, type_map)
    assert float(separating) < 0.2 < 1.0 < float(inverted)
    assert float(losses.EvidenceObjective(weight=0.5)(4.0 - 8.0 * defect, type_map)) == pytest.approx(0.5 * float(inverted))
    # the gradient reaches the evidence (the type logits it comes from) and the objective's own affine
    evidence = torch.zeros(2, 1, 8, 8, requires_grad=True)
    objective(evidence, type_map).backward()
    assert evidence.grad.abs().sum() > 0 and objective.bias.grad is not None

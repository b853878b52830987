"""The global exposure changes the discriminator assumes a real test set spans beyond its few shots.

Training's photometric augmentation draws from these ranges (`discriminator.data.photometric`), and
the normal-shot memory stores each shot at the ends of the gain range (`discriminator.memory`), so
both agree on what "the same surface under another exposure" means. With exposure matching on
(`match_exposure`) every image is first brought to the shots' mean and contrast.
"""

from __future__ import annotations

import torch
from torch import Tensor

GAMMA_RANGE = (0.7, 1.4)
GAIN_RANGE = (0.75, 1.3)
OFFSET_RANGE = (-0.08, 0.08)  # of the full range


def exposure_statistics(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 2): each image's mean and standard deviation over all its pixels
    and channels (written out, not `torch.std`, so that an exported graph holds plain reductions)."""
    flat = images.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    std = (flat - mean).pow(2).mean(dim=1, keepdim=True).sqrt()
    return torch.cat([mean, std], dim=1)


def reference_statistics(shots: Tensor) -> Tensor:
    """(S, 3, H, W) normal shots -> [mean, std]: their mean intensity and contrast, the reference
    `match_exposure` brings every image to."""
    return exposure_statistics(shots.float()).mean(dim=0)


def match_exposure(images: Tensor, reference: Tensor, min_std: float = 1e-3) -> Tensor:
    """Give each image the mean and standard deviation `reference` ([mean, std], the normal shots')
    by one affine change of its intensities, clipped to [0, 1].

    Why: a product's images differ in exposure and contrast more than its few shots show, and a
    defect in a dark, flat image is a small step in the backbone's features. Matching every image
    (test images, the shots, training images) to the shots' own statistics takes the exposure out
    before the features are read, with no constant chosen for any data set."""
    stats = exposure_statistics(images.float())
    mean, std = stats[:, 0].view(-1, 1, 1, 1), stats[:, 1].view(-1, 1, 1, 1).clamp_min(min_std)
    matched = (images.float() - mean) / std * reference[1] + reference[0]
    return matched.clamp(0.0, 1.0).to(images.dtype)

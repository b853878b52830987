"""The project's reference baseline on a manifest: PatchCore-style kNN on frozen backbone features.

    python benchmarks/bench_knn_baseline.py --manifest data/prepared/manifest.json [--size 256] [--flips]

kNN distance of each stride-8/16 EfficientNet-Lite0 feature (3x3 average-pooled) to the normal
shots' features, Gaussian-smoothed (sigma 4 px), image score = map max — the baseline of
../shared/data/README.md. It uses the discriminator's own backbone and memory code, so it also
checks that the `memory` head's kNN part reproduces the baseline. Prints image and pixel AUROC
and images/s. Thresholds play no part: nothing here is tuned on the test set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discriminator.backbones import build_backbone  # noqa: E402
from discriminator.memory import FLIPS, LEGACY_MEMORY_STRIDES, memory_levels, nearest_distances, patch_features  # noqa: E402
from discriminator.metrics import auroc, pixel_auroc  # noqa: E402
from discriminator.predict import images_to_tensor  # noqa: E402
from core.images import read_sample  # noqa: E402
from core.manifest import Manifest  # noqa: E402


class KnnBaseline:
    """The baseline as a predictor: images (B, 3, S, S) in [0, 1] -> smoothed distance maps (B, S, S).

    `benchmarks/bench_predict.py` times it next to the discriminator, so it lives here once.
    """

    def __init__(self, shots: list[np.ndarray], flips: bool = False, sigma: float = 4.0):
        self.backbone = build_backbone("efficientnet_lite0")
        self.levels = memory_levels(self.backbone.strides, LEGACY_MEMORY_STRIDES)  # the data README's baseline
        self.sigma = sigma
        images = images_to_tensor(shots)
        views = [images.flip(d) if d else images for d in (FLIPS if flips else ((),))]
        with torch.no_grad():
            bank = torch.cat([patch_features(self.backbone(v), self.levels) for v in views])  # (V·S, D, h, w)
        self.bank = bank.permute(0, 2, 3, 1).reshape(1, -1, bank.shape[1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        feats = patch_features(self.backbone(images), self.levels)
        dist = nearest_distances(feats, self.bank)[:, 0]
        dist = torch.nn.functional.interpolate(dist[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
        return np.stack([cv2.GaussianBlur(d, (0, 0), self.sigma) for d in dist.numpy()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--flips", action="store_true", help="add the shots' flips to the memory")
    parser.add_argument("--sigma", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    manifest = Manifest.load(args.manifest)
    baseline = KnnBaseline([read_sample(s, args.size)[0] for s in manifest.normal_shots], args.flips, args.sigma)

    maps, masks, labels = [], [], []
    start = time.perf_counter()
    for i in range(0, len(manifest.test), args.batch):
        batch = [read_sample(s, args.size) for s in manifest.test[i : i + args.batch]]
        maps.extend(baseline(images_to_tensor([im for im, _ in batch])))
        masks.extend(mask for _, mask in batch)
        labels += [s.label for s in manifest.test[i : i + args.batch]]
    seconds = time.perf_counter() - start
    maps_arr, masks_arr = np.stack(maps), np.stack(masks)
    image_auroc = auroc(np.array(labels) > 0, maps_arr.reshape(len(maps), -1).max(axis=1))
    print(f"kNN baseline ({'with' if args.flips else 'without'} flips), {len(maps)} test images, {args.size} px")
    print(f"I-AUROC {100 * image_auroc:.1f}  P-AUROC {100 * pixel_auroc(masks_arr, maps_arr):.1f}  "
          f"{len(maps) / seconds:.1f} images/s")


if __name__ == "__main__":
    main()

"""Which backbone and which feature strides should the normal-shot memory read? kNN detection alone.

    python benchmarks/bench_memory_levels.py --manifest work/bench_mtd/zero-shot/prepared/manifest_dev.json \\
        [--backbones efficientnet_lite0 efficientnet_lite2] [--strides 8,16 8,16,32 ...] [--fractions 1 0.25]

For each backbone and each set of strides, the memory is built exactly as the `knn` detection head
builds it (`Discriminator.build_memory`: the shots and their flips, at each exposure unless `--views
flips`, `--fractions` of one view's
cells per shot by k-centre coreset, distances standardised on the shots leave-one-out; with
`--self-similarity on` also the distance to the image's own cells; with `--exposure-match on`, the
default as shipped, every image and view first matched to the shots' mean and contrast) and the test images are scored by
that alone: no training, no synthetic data. Prints image and pixel
AUROC (image score: mean of the top-100 pixels of the image map, as the head's; with self-similarity
the image map is the distance to the shots alone, so the image AUROC of the pixel map, which adds
the image's own cells, is printed too) and the backbone's images/s.
Choose on the development part (`bench_mtd.py` writes manifest_dev.json), report on the full set.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.images import read_sample  # noqa: E402
from core.manifest import Manifest  # noqa: E402
from discriminator.backbones import build_backbone  # noqa: E402
from discriminator.exposure import match_exposure, reference_statistics  # noqa: E402
from discriminator.memory import (MEMORY_FRACTION, NormalMemory, flipped_views, memory_levels, memory_views,  # noqa: E402
                                  patch_features)
from discriminator.metrics import auroc, pixel_auroc  # noqa: E402
from discriminator.predict import images_to_tensor, top_k_scores  # noqa: E402

DEFAULT_STRIDES = ["8,16", "8,16,32", "16,32", "4,8,16", "16"]
VIEWS = {"flips": flipped_views, "exposures": memory_views}


def knn_maps(memory: NormalMemory, features: list[torch.Tensor], size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, size, size) standardised distance maps of precomputed backbone levels: the pixel map and
    the image map (the same map unless self-similarity keeps the image's part apart)."""
    maps = []
    for i in range(0, len(features[0]), batch):
        distance = memory([f[i : i + batch] for f in features])
        maps.append(F.interpolate(distance, size=(size, size), mode="bilinear", align_corners=False))
    maps = torch.cat(maps)
    return maps[:, 0], maps[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                          "efficientnet_lite2"])
    parser.add_argument("--strides", nargs="+", default=DEFAULT_STRIDES, help="comma-separated stride sets")
    parser.add_argument("--fractions", nargs="+", type=float, default=[MEMORY_FRACTION],
                        help="memory entries per shot, as fractions of one view's cells")
    parser.add_argument("--self-similarity", nargs="+", choices=["off", "on"], default=["off", "on"],
                        help="score without and / or with the image's own cells (`train.self_similarity`)")
    parser.add_argument("--views", nargs="+", choices=list(VIEWS), default=["exposures"],
                        help="what the memory stores per shot: its flips, or its flips at each exposure (shipped)")
    parser.add_argument("--exposure-match", nargs="+", choices=["off", "on"], default=["on"],
                        help="match every image to the shots' mean and contrast first (`train.exposure_match`, shipped on)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    manifest = Manifest.load(args.manifest)
    samples = [read_sample(s, args.size) for s in manifest.test]
    images = images_to_tensor([image for image, _ in samples])
    masks = np.stack([mask for _, mask in samples]) > 0
    labels = np.array([s.label for s in manifest.test]) > 0
    shots = [images_to_tensor([read_sample(s, args.size)[0]])[0] for s in manifest.normal_shots]
    print(f"{len(images)} test images of {args.manifest}, {len(shots)} normal shots, {args.size} px; "
          f"kNN distance alone (the knn head's memory), metrics in %")
    print("| backbone | exposure match | strides | views | memory fraction | self-similarity | I-AUROC | P-AUROC "
          "| I-AUROC of the pixel map | backbone images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    reference = reference_statistics(torch.stack(shots))  # as `Discriminator.set_exposure_reference`
    for name, matched in itertools.product(args.backbones, args.exposure_match):
        backbone = build_backbone(name)
        prepare = (lambda x: match_exposure(x, reference)) if matched == "on" else (lambda x: x)
        started = time.perf_counter()
        batches = [backbone(prepare(images[i : i + args.batch])) for i in range(0, len(images), args.batch)]
        speed = len(images) / (time.perf_counter() - started)
        features = [torch.cat([b[level] for b in batches]) for level in range(len(backbone.strides))]
        for views in args.views:
            shot_features = [backbone(prepare(VIEWS[views](shot))) for shot in shots]
            for spec in args.strides:
                strides = [int(s) for s in spec.split(",")]
                levels = memory_levels(backbone.strides, strides)
                for fraction in args.fractions:
                    for self_similarity in args.self_similarity:
                        memory = NormalMemory(0, 0, 1, levels, self_similarity=self_similarity == "on")
                        memory.fill([patch_features(f, levels) for f in shot_features], fraction)
                        maps, image_maps = knn_maps(memory, features, args.size, args.batch)
                        image = auroc(labels, top_k_scores(image_maps, args.top_k).numpy())
                        pixel = pixel_auroc(masks, maps.numpy())
                        image_of_pixel_map = auroc(labels, top_k_scores(maps, args.top_k).numpy())
                        print(f"| {name} | {matched} | {spec} | {views} | {fraction:g} | {self_similarity} | {100 * image:.1f} | "
                              f"{100 * pixel:.1f} | {100 * image_of_pixel_map:.1f} | {speed:.1f} |", flush=True)

if __name__ == "__main__":
    main()

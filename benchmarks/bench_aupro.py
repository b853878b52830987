"""Times the exact, vectorised ``aupro`` against the textbook ``aupro_reference`` loop.

Run: ``python benchmarks/bench_aupro.py [--images 100] [--size 256] [--seed 0]``.
Prints both values, their difference and the speed-up (target: >= 20x, difference <= 0.005).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import click
import cv2
import numpy as np

from discriminator.metrics import aupro, aupro_reference
from synthesis.seeding import numpy_rng


@dataclass(frozen=True)
class BenchMaps:
    masks: np.ndarray  # (N, H, W) bool
    maps: np.ndarray  # (N, H, W) float32


def _blob_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """0-3 rotated ellipses of very different sizes, as defects come: specks to large stains."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(0, 4)):
        centre = tuple(int(c) for c in rng.integers(0, size, 2))
        axes = tuple(int(a) for a in rng.integers(2, size // 6, 2))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return mask.astype(bool)


def _score_map(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A detector's output: blurred response of random strength on the defect (so some defects are
    missed), over smooth background structure plus pixel noise (so some normal areas fire)."""
    size = mask.shape[0]
    structure = cv2.resize(rng.random((8, 8), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    response = cv2.GaussianBlur(mask.astype(np.float32) * rng.uniform(0.1, 1.0), (0, 0), sigmaX=3)
    noise = rng.normal(0.0, 0.08, mask.shape).astype(np.float32)
    return 0.4 * structure + response + noise


def make_maps(num_images: int, size: int, seed: int) -> BenchMaps:
    """Seeded masks and score maps; every image draws from its own generator."""
    rngs = [numpy_rng(seed, "bench_aupro", index) for index in range(num_images)]
    masks = np.stack([_blob_mask(size, rng) for rng in rngs])
    maps = np.stack([_score_map(mask, rng) for mask, rng in zip(masks, rngs)])
    return BenchMaps(masks=masks, maps=maps)


def _timed(function, data: BenchMaps, repeats: int) -> tuple[float, float]:
    """Value and best wall time over ``repeats`` runs (the best run is the least disturbed one)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = function(data.masks, data.maps)
        seconds.append(time.perf_counter() - start)
    return value, min(seconds)


@click.command()
@click.option("--images", default=100, show_default=True)
@click.option("--size", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="best-of-N timing for both")
def main(images: int, size: int, seed: int, repeats: int) -> None:
    data = make_maps(images, size, seed)
    print(f"{images} maps of {size}x{size}, {data.masks.mean():.2%} anomalous pixels, best of {repeats}")
    reference, reference_s = _timed(aupro_reference, data, repeats)
    fast, fast_s = _timed(aupro, data, repeats)
    print(f"aupro_reference: {reference:.5f}  in {reference_s:.3f} s")
    print(f"aupro (fast):    {fast:.5f}  in {fast_s:.3f} s")
    print(f"difference: {fast - reference:+.5f}   speed-up: {reference_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()

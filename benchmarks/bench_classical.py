"""Throughput of the classical backend and of a whole render, and whether render memory stays flat.

    python benchmarks/bench_classical.py [--sizes 256 512] [--n 48] [--mem-counts 200 2000] [--mem-size 256]

Prints images/s of `ClassicalBackend.paint` alone and of `render` (masks, painting, selection,
PNG + Parquet) per image size, then the peak RSS of renders of different lengths, each in a fresh
subprocess so one run's allocations never count towards another's. Peak RSS must not grow with
the number of images: only one shard of rows is ever held in memory.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthesis.backends.classical import ClassicalBackend  # noqa: E402
from synthesis.config import SynthesisConfig  # noqa: E402
from synthesis.render import RenderInputs, RequestBuilder, plan_tasks, render  # noqa: E402
from synthesis.foreground import classical_foreground  # noqa: E402

TYPES = ["scratch", "stain", "hole"]
SEED = 0


def surface(size: int, seed: int) -> np.ndarray:
    """A brushed-metal-like normal image: a ramp, streaks along x, and sensor noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(80, 170, size, dtype=np.float32)[None, :, None]
    streaks = rng.normal(0, 8, (size, 1, 1)).astype(np.float32)
    return np.clip(ramp + streaks + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)


def bench_inputs(size: int) -> RenderInputs:
    shot = surface(size, 99)
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 2 : size // 2 + max(2, size // 64), size // 5 : 4 * size // 5] = True
    shot[mask] = 30
    return RenderInputs(
        category="plate",
        class_names=list(TYPES),
        normal_images=[(f"good/{i:03d}.png", surface(size, i)) for i in range(4)],
        anomaly_shots=[("scratch", shot, mask)],
    )


def bench_config(images: int) -> SynthesisConfig:
    return SynthesisConfig(images_per_type=max(1, images // len(TYPES)), shard_size=32, batch_size=4)


def backend_images_per_s(size: int, images: int) -> float:
    """Paint only: the requests are built beforehand and not timed."""
    config = bench_config(images)
    builder = RequestBuilder(bench_inputs(size), config, classical_foreground)
    tasks = plan_tasks(TYPES, config.images_per_type, ["scratch"], config.few_shot_fraction, SEED)
    requests = [builder.build(task)[1] for task in tasks]
    backend = ClassicalBackend()
    start = time.perf_counter()
    for i in range(0, len(requests), config.batch_size):
        batch = requests[i : i + config.batch_size]
        backend.paint(batch, config.strengths)
    return len(requests) / (time.perf_counter() - start)


def render_images_per_s(size: int, images: int) -> float:
    config = bench_config(images)
    inputs = bench_inputs(size)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = render(inputs, config, ClassicalBackend(), out, global_seed=SEED, progress=False)
        return report.rows_written / (time.perf_counter() - start)


def render_peak_rss_child(images: int, size: int) -> None:
    """Runs in the subprocess: render, then print peak RSS in MiB (Linux reports KiB)."""
    with tempfile.TemporaryDirectory() as out:
        report = render(bench_inputs(size), bench_config(images), ClassicalBackend(), out, global_seed=SEED, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{report.rows_written} {peak:.1f}")


def peak_rss(images: int, size: int) -> tuple[int, float, float]:
    """(rows, peak MiB, seconds) of a render in a fresh interpreter."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(images), str(size)], capture_output=True, text=True, check=True
    )
    rows, peak = done.stdout.split()
    return int(rows), float(peak), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--n", type=int, default=48, help="images per throughput measurement")
    parser.add_argument("--mem-counts", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--mem-size", type=int, default=256)
    parser.add_argument("--child", type=int, nargs=2, metavar=("IMAGES", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        render_peak_rss_child(*args.child)
        return

    print(f"{'size':>5} {'backend img/s':>14} {'render img/s':>13}")
    for size in args.sizes:
        print(f"{size:>5} {backend_images_per_s(size, args.n):>14.1f} {render_images_per_s(size, args.n):>13.1f}")
    print(f"\npeak RSS of a whole render at {args.mem_size} px (fresh process each)")
    print(f"{'images':>7} {'peak MiB':>9} {'seconds':>8}")
    for count in args.mem_counts:
        rows, peak, seconds = peak_rss(count, args.mem_size)
        print(f"{rows:>7} {peak:>9.1f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()

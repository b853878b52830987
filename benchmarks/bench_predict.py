"""Prediction speed side by side, in one run on the same images: PyTorch eager, the ONNX and
OpenVINO exports of the same checkpoint, and the kNN baseline (`bench_knn_baseline.py`).

    python benchmarks/bench_predict.py --model models/demo_surface \\
        --manifest data/prepared/demo_surface/manifest.json [--threads 2] [--batch 8] [--repeats 3]

The test images are read once (at the model's resolution) and held in memory, so only the models
are timed. Every predictor gets the same thread count. Rounds are interleaved (each predictor
once per round, `--repeats` rounds) so a machine whose load changes treats them alike; the table
gives the median round. Throughput: whole test set in batches of `--batch`. Latency: one image
at a time over the first `--latency-images` images, median and 90th percentile. Exports are made
into a temporary folder unless `--onnx` / `--openvino` name existing ones. The last column is the
largest anomaly-map difference from PyTorch (the baseline's map is a different quantity).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_knn_baseline import KnnBaseline  # noqa: E402
from core.images import read_sample  # noqa: E402
from core.manifest import Manifest  # noqa: E402
from discriminator.deploy.export import export_model  # noqa: E402
from discriminator.deploy.inferencers import OpenVINOInferencer, load_inferencer  # noqa: E402
from discriminator.predict import images_to_tensor  # noqa: E402


def time_batches(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        run(images[i : i + batch])
    return time.perf_counter() - start


def latencies(run: Callable[[torch.Tensor], object], images: torch.Tensor) -> list[float]:
    out = []
    for i in range(len(images)):
        start = time.perf_counter()
        run(images[i : i + 1])
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--manifest", required=True, help="its test set is timed, e.g. data/prepared/<category>/manifest.json")
    parser.add_argument("--onnx", default=None, help="an existing export (default: exported now)")
    parser.add_argument("--openvino", default=None, help="an existing export folder (default: exported now)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-images", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="time only the first N test images")
    parser.add_argument("--baseline-flips", action="store_true", help="the baseline's memory holds the flips too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import cv2

    cv2.setNumThreads(args.threads)

    manifest = Manifest.load(args.manifest)
    work = tempfile.TemporaryDirectory(prefix="bench_predict.")
    onnx_path = args.onnx or export_model(args.model, "onnx", Path(work.name) / "model.onnx")
    openvino_path = args.openvino or export_model(args.model, "openvino", Path(work.name) / "openvino")
    predictors: dict[str, Callable] = {
        "PyTorch eager": load_inferencer(args.model, device="cpu"),
        "ONNX Runtime": load_inferencer(onnx_path, threads=args.threads),
        "OpenVINO": load_inferencer(openvino_path, threads=args.threads),
        "OpenVINO bf16 (opt-in)": OpenVINOInferencer(openvino_path, threads=args.threads, precision="bf16"),
        "OpenVINO, 2 streams (opt-in)": OpenVINOInferencer(openvino_path, threads=args.threads, streams=2),
        "OpenVINO bf16, 2 streams (opt-in)": OpenVINOInferencer(openvino_path, threads=args.threads, precision="bf16",
                                                                streams=2),
    }
    size = predictors["PyTorch eager"].image_size
    predictors["kNN baseline"] = KnnBaseline([read_sample(s, size)[0] for s in manifest.normal_shots],
                                             flips=args.baseline_flips)
    samples = manifest.test[: args.limit]
    images = images_to_tensor([read_sample(s, size)[0] for s in samples])

    reference = predictors["PyTorch eager"](images[: args.batch]).anomaly_maps
    differences = {}
    for name, run in predictors.items():  # warm-up, and the agreement check
        out = run(images[: args.batch])
        if name != "PyTorch eager" and name != "kNN baseline":
            differences[name] = float((out.anomaly_maps - reference).abs().max())
    rounds: dict[str, list[float]] = {name: [] for name in predictors}
    lats: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name, run in predictors.items():
            rounds[name].append(time_batches(run, images, args.batch))
            lats[name] += latencies(run, images[: args.latency_images])

    print(f"{len(images)} test images of {args.manifest}, {size} px, batch {args.batch}, {args.threads} threads, "
          f"{args.repeats} interleaved rounds; {os.cpu_count()} CPUs visible; torch {torch.__version__}")
    eager = len(images) / float(np.median(rounds["PyTorch eager"]))
    baseline = len(images) / float(np.median(rounds["kNN baseline"]))
    print("| predictor | images/s (median round) | all rounds | vs eager | vs kNN baseline | "
          "latency p50 / p90, 1 image | max map diff vs PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for name in predictors:
        speeds = [len(images) / s for s in rounds[name]]
        speed = len(images) / float(np.median(rounds[name]))
        p50, p90 = np.percentile(lats[name], [50, 90]) * 1000
        diff = f"{differences[name]:.1e}" if name in differences else ""
        print(f"| {name} | {speed:.1f} | {' / '.join(f'{v:.1f}' for v in speeds)} | {speed / eager:.2f}x | "
              f"{speed / baseline:.2f}x | {p50:.0f} / {p90:.0f} ms | {diff} |")


if __name__ == "__main__":
    main()

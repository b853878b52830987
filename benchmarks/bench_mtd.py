"""MTD benchmark: the protocol of ../shared/data/README.md, end to end, next to the paper's figures.

Runs, for zero-shot (K_n=2, K_a=0) and few-shot (K_n=2, K_a=1), the four stages as a user would
(`uniadc prepare → synthesize → train → evaluate`, each a subprocess with `--set` overrides on
params.yaml) into a work dir: 256 px, classical synthesis, EfficientNet-Lite0. Then prints the five
protocol metrics under our protocol (calibrated thresholds, nothing tuned on the test set) and the
reference protocol (test-set min-max normalisation, labelled so), the paper's figures, and the
training and evaluation throughput. Run by a person, not by the test suite:

    python benchmarks/bench_mtd.py --data ../shared/data/mtd --work work/bench_mtd

`--parts dev` evaluates on the fixed development part instead (every third test image in sorted
path order; choose methods there), `--parts dev full` on both; the full test set is what gets
reported. With a `knn` or `knn_residual` detection head each evaluation is repeated with each part
of the detection alone (the ablation; `--no-ablation` skips it): kNN only (the distance to the
normal shots: what they give without synthetic data or training), self-similarity only, and the
learned map only (the `knn` head's learned evidence, `knn_residual`'s residual). Per-type rows
(image AUROC vs the normal images, recall, pixel IoU) and balanced accuracy follow each table, and
the stage wall times per setting. `--seeds 0 1` runs everything once per seed (other synthetic rows,
other training draws; `<work>/seed<N>`) and adds each metric's mean and range over them: on the
development part the seed alone moves balanced accuracy by several points, so compare a lever
with the spread, not with one run.

Synthesis resumes where it stopped; `--skip-existing` also reuses finished manifests, checkpoints
and reports, so a rerun only prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.manifest import write_text_atomic

MTD_TYPES = ["blowhole", "break", "crack", "fray", "uneven"]
METRICS = [("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc"), ("PRO", "aupro"),
           ("Acc", "type_accuracy"), ("mIoU", "pixel_miou")]
# UniADC paper (DINOv3 ViT-B/16 + Stable Diffusion inpainting, 512 px; not the same split), in %
PAPER = {
    "zero-shot": [92.30, 83.52, 81.22, 64.15, 31.85],
    "few-shot": [92.57, 86.79, 83.17, 65.10, 34.33],
}
# this project's PatchCore-style kNN baseline (2 normal shots, 256 px), see the data README
BASELINE = {"I-AUROC": 71.7, "P-AUROC": 71.0}


@dataclass(frozen=True)
class Setting:
    name: str
    k_normal: int
    k_anomaly: int


SETTINGS = [Setting("zero-shot", 2, 0), Setting("few-shot", 2, 1)]


def overrides(args: argparse.Namespace, setting: Setting) -> list[str]:
    values = {
        "data.root": str(Path(args.data).resolve()),
        "data.layout": "mtd",
        "data.anomaly_types": json.dumps(MTD_TYPES),
        "data.k_normal": setting.k_normal,
        "data.k_anomaly": setting.k_anomaly,
        "image_size": args.image_size,
        "synthesis.backend": "classical",
        "train.backbone": "efficientnet_lite0",
    }
    if args.images_per_type is not None:
        values["synthesis.images_per_type"] = args.images_per_type
    if args.steps is not None:
        values["train.steps"] = args.steps
    values.update(dict(item.split("=", 1) for item in args.set))
    return [flag for key, value in values.items() for flag in ("--set", f"{key}={value}")]


DEV_EVERY = 3  # the development part: every third test image in sorted path order


def dev_manifest(manifest_path: Path) -> Path:
    """Write (once) a copy of the manifest whose test set is the fixed development part: every
    DEV_EVERY-th test image in sorted path order, starting with the first. Methods, settings and
    defaults are chosen on it; the full test set is what gets reported."""
    out = manifest_path.with_name("manifest_dev.json")
    if not out.exists():
        data = json.loads(manifest_path.read_text())
        data["test"] = sorted(data["test"], key=lambda sample: sample["path"])[::DEV_EVERY]
        write_text_atomic(out, json.dumps(data, indent=1))
    return out


def uniadc(stage: str, args: argparse.Namespace, setting: Setting, *stage_args: str) -> float:
    """Run one stage as `uniadc <stage>`; returns its wall time in seconds."""
    command = [sys.executable, "-m", "pipelines.cli", stage, "--params", args.params,
               *overrides(args, setting), *stage_args]
    print(f"[{setting.name}] uniadc {stage} {' '.join(stage_args)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def ablation(config: dict) -> list[tuple[str, str]]:
    """(label, evaluate.detection_part) of each part of the checkpoint's detection alone."""
    head = config["detection_head"]
    if head not in ("knn", "knn_residual"):
        return []
    parts = [("kNN only", "knn")]
    if config.get("self_similarity"):
        parts.append(("self-similarity only", "self"))
    if head == "knn_residual" or config.get("learned_weight"):
        parts.append(("learned map only", "learned"))
    return parts


def seed_args(args: argparse.Namespace, seed: int | None) -> argparse.Namespace:
    """`args` for one run of `--seeds`: the seed as an override and, with more than one seed, its own
    work folder (`<work>/seed<N>`), so every seed's stages are cached and resumable on their own."""
    if seed is None:
        return args
    work = Path(args.work) / f"seed{seed}" if len(args.seeds) > 1 else Path(args.work)
    return argparse.Namespace(**{**vars(args), "work": str(work), "set": [*args.set, f"seed={seed}"]})


def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of one metric over seeds."""
    return float(np.mean(values)), float(np.min(values)), float(np.max(values))


def seed_table(by_seed: dict[int, dict[str, dict]], part: str) -> str:
    """Per setting, each metric of the shipped default as mean (min–max) over the seeds: how far the
    seed alone (other synthetic rows, other training draws) moves a figure."""
    names = [("bAcc", "balanced_accuracy"), *METRICS]
    head = "| setting | seeds | " + " | ".join(name for name, _ in names) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    settings = dict.fromkeys(name for results in by_seed.values() for name in results)
    for name in settings:
        runs = [r[name]["evaluations"][part]["default"]["metrics"] for r in by_seed.values()
                if name in r and part in r[name]["evaluations"]]
        cells = []
        for _, key in names:
            values = [100 * m[key] for m in runs if m.get(key) is not None]
            cells.append("n/a" if not values else "{:.1f} ({:.1f}–{:.1f})".format(*spread(values)))
        lines.append(f"| {name} | {', '.join(map(str, by_seed))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_setting(args: argparse.Namespace, setting: Setting) -> dict:
    """prepare → synthesize → train, then evaluate on each requested part of the test set (`full`,
    `dev`), with the shipped detection and, for a two-part head, each part alone (the ablation)."""
    work = Path(args.work) / setting.name
    manifest, dataset, model = work / "prepared/manifest.json", work / "synthetic", work / "model"
    seconds: dict[str, float] = {}
    stages = [
        ("prepare", manifest, ("--out", str(manifest.parent))),
        ("synthesize", dataset / "README.md", ("--manifest", str(manifest), "--out", str(dataset))),
        ("train", model / "train_log.json", ("--dataset", str(dataset), "--manifest", str(manifest), "--out", str(model))),
    ]
    for stage, done_marker, stage_args in stages:
        if args.skip_existing and done_marker.exists():
            print(f"[{setting.name}] {stage}: reusing {done_marker}")
            continue
        seconds[stage] = uniadc(stage, args, setting, *stage_args)
    config = json.loads((model / "config.json").read_text())
    variants = [("default", None)] + ([] if args.no_ablation else ablation(config))
    evaluations: dict[str, dict[str, dict]] = {}
    for part in args.parts:
        part_manifest = manifest if part == "full" else dev_manifest(manifest)
        for label, detection_part in variants:
            reports = work / f"reports_{part}" / (detection_part or "default")
            if not (args.skip_existing and (reports / "metrics.json").exists()):
                extra = ["--set", f"evaluate.detection_part={detection_part}"] if detection_part else []
                seconds[f"evaluate {part} {label}"] = uniadc(
                    "evaluate", args, setting, "--model", str(model), "--manifest", str(part_manifest),
                    "--out", str(reports), *extra)
            evaluations.setdefault(part, {})[label] = {
                "metrics": json.loads((reports / "metrics.json").read_text()),
                "per_type": json.loads((reports / "per_type.json").read_text()),
            }
    return {"evaluations": evaluations, "train": json.loads((model / "train_log.json").read_text()),
            "seconds": seconds}


def percent(value) -> str:
    return "  n/a" if value is None else f"{100 * value:5.1f}"


def table(results: dict[str, dict], part: str) -> str:
    """A markdown table on one part of the test set: ours, its ablation rows, the reference
    protocol and the paper, per setting. Ablation rows show the ranking metrics only: their maps
    are not what the thresholds were calibrated for."""
    head = "| setting | protocol | " + " | ".join(name for name, _ in METRICS) + " | train img/s | eval img/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, result in results.items():
        if part not in result["evaluations"]:
            continue
        train = result["train"]
        for label, evaluation in result["evaluations"][part].items():
            m = evaluation["metrics"]
            speed = f"{train.get('images_per_second', 0):.1f} | {m.get('images_per_second') or 0:.1f}"
            keys = [key for _, key in METRICS] if label == "default" else [key for _, key in METRICS[:3]]
            row = " | ".join(percent(m.get(key)) if key in keys else "  –  " for _, key in METRICS)
            lines.append(f"| {name} | {'ours (calibrated)' if label == 'default' else label} | {row} | {speed} |")
            if label == "default" and isinstance(m.get("reference_protocol"), dict):
                row = " | ".join(percent(m["reference_protocol"].get(key)) for _, key in METRICS)
                lines.append(f"| {name} | reference (test min-max) | {row} | | |")
        lines.append(f"| {name} | UniADC paper | " + " | ".join(f"{v:5.1f}" for v in PAPER[name]) + " | | |")
    lines.append("| zero-shot | kNN baseline (data README) | " + " | ".join(
        f"{BASELINE[n]:5.1f}" if n in BASELINE else "" for n, _ in METRICS) + " | | 13.5 |")
    return "\n".join(lines)


def per_type_table(results: dict[str, dict], part: str) -> str:
    """Per type, for the shipped default: image AUROC against the normals, recall of the image
    type decision and pixel IoU; plus balanced accuracy (mean recall over the C+1 classes)."""
    lines = ["| setting | class | images | I-AUROC vs normal | recall | pixel IoU |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        evaluation = result["evaluations"].get(part, {}).get("default")
        if evaluation is None:
            continue
        t = evaluation["per_type"]
        for i, cls in enumerate(t["class_names"]):
            lines.append(f"| {name} | {cls} | {t['images'][i]} | {percent(t['image_auroc'][i])} | "
                         f"{percent(t['recall'][i])} | {percent(t['pixel_iou'][i])} |")
        lines.append(f"| {name} | balanced accuracy | | | {percent(evaluation['metrics'].get('balanced_accuracy'))} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/mtd", help="MTD root (MT_<Class>/Imgs/...).")
    parser.add_argument("--work", default="work/bench_mtd", help="Work dir for manifests, datasets, models, reports.")
    parser.add_argument("--params", default="params.yaml", help="Base params.yaml; the protocol is set on top.")
    parser.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                        choices=[s.name for s in SETTINGS])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images-per-type", type=int, default=None, help="Override synthesis.images_per_type.")
    parser.add_argument("--steps", type=int, default=None, help="Override train.steps.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Any other override.")
    parser.add_argument("--skip-existing", action="store_true", help="Reuse finished stage outputs.")
    parser.add_argument("--parts", nargs="+", default=["full"], choices=["full", "dev"],
                        help="Test-set parts to evaluate: full (reported) and/or dev (for choosing methods).")
    parser.add_argument("--no-ablation", action="store_true", help="Evaluate the shipped detection only.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="Run everything once per seed (params' `seed`; default: params.yaml's) and print "
                             "each metric's mean and range over them; the main tables show the first seed. "
                             "The ablation runs for the first seed only.")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"error: {args.data}: MTD not found (see ../shared/data/README.md)")

    by_seed: dict[int, dict[str, dict]] = {}
    for i, seed in enumerate(args.seeds or [None]):
        run_args = seed_args(args, seed)
        if i:
            run_args.no_ablation = True
        by_seed[seed] = {s.name: run_setting(run_args, s) for s in SETTINGS if s.name in args.settings}
    results = next(iter(by_seed.values()))
    tables = {}
    for part in args.parts:
        where = ("the full test set" if part == "full" else
                 f"the development part (every {DEV_EVERY}rd test image in sorted path order)")
        tables[part] = table(results, part) + "\n\n" + per_type_table(results, part)
        if len(by_seed) > 1:
            tables[part] += "\n\nThe shipped default over seeds, mean (min–max):\n\n" + seed_table(by_seed, part)
        print(f"\nMTD (Huang, Qiu and Yuan, 'Saliency of magnetic tile surface defects'), {where}, "
              f"{args.image_size} px, classical synthesis, EfficientNet-Lite0; metrics in %\n")
        print(tables[part])
    for name, result in results.items():  # the first seed's
        timing = ", ".join(f"{stage} {s:.0f} s" for stage, s in result["seconds"].items())
        print(f"{name}: stage wall times: {timing or 'all reused'}")
        default = [s for stage, s in result["seconds"].items() if stage in ("synthesize", "train")
                   or stage in (f"evaluate {p} default" for p in ("full",))]
        if len(default) == 3:
            print(f"{name}: synthesize + train + evaluate (full, default) {sum(default) / 60:.1f} min")
    summary = Path(args.work) / "bench_mtd.json"
    runs = {"seeds": {str(seed): r for seed, r in by_seed.items()}} if len(by_seed) > 1 else {}
    write_text_atomic(summary, json.dumps({"tables": tables, **results, **runs}, indent=1))
    print(f"\nsummary written to {summary}")


if __name__ == "__main__":
    main()

"""The `synthesize` stage: manifest → frozen dataset (Parquet shards + card).

Reads as steps: load the manifest, read the shots at the working size, build the backend and the
scorers, render this process's share, wait for every process, and let the main one finalise.
`accelerate launch --multi_gpu --num_processes N uniadc synthesize ...` (or `torchrun
--nproc_per_node N`) splits the shards over N processes, on GPUs or, without CUDA, on CPU cores;
a plain run is one process. Rerunning resumes where a crash stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from core.errors import InputError
from core.images import read_image, read_sample
from core.manifest import Manifest, Sample
from synthesis.backends.base import PaintBackend
from synthesis.config import SynthesisConfig
from synthesis.dataset import DatasetSummary, push_to_hub
from synthesis.foreground import make_foreground
from synthesis.priors import parse_priors
from synthesis.render import RenderInputs, check_out_folder, finalize, prompt_choices, render
from synthesis.selection import ZERO_SHOT_RULES, CandidateScorer, StrengthMixScorer
from synthesis.shots import describe_test_set, write_shots

BackendFactory = Callable[[SynthesisConfig], PaintBackend]


def source_id(sample: Sample, root: str | None) -> str:
    """The sample's path relative to the data root, so no machine's absolute paths enter the dataset."""
    path = Path(sample.path)
    if root:
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def load_inputs(manifest: Manifest, image_size: int) -> RenderInputs:
    """Normal and anomaly shots of the manifest at the working size (masks resized with them)."""
    root = manifest.source.get("root")
    normals = [(source_id(s, root), read_image(s.path, image_size)) for s in manifest.normal_shots]
    shots = []
    for sample in manifest.anomaly_shots:
        if not sample.mask_path:
            raise InputError(f"anomaly shot of type {sample.anomaly_type!r} has no mask file", sample.path)
        image, mask = read_sample(sample, image_size)  # mask checked against the image, then resized with it
        if not mask.any():
            raise InputError("anomaly mask is empty at the working size", sample.mask_path)
        shots.append((sample.anomaly_type, image, mask))
    return RenderInputs(
        category=manifest.category,
        class_names=list(manifest.anomaly_types),
        normal_images=normals,
        anomaly_shots=shots,
    )


def backend_name(config: SynthesisConfig) -> str:
    """`auto`: diffusion when an inpainting model is configured, classical (no weights) otherwise."""
    if config.backend == "auto":
        return "diffusion" if config.diffusion.model else "classical"
    return config.backend


def build_backend(config: SynthesisConfig) -> PaintBackend:
    name = backend_name(config)
    if name == "classical":
        from synthesis.backends.classical import ClassicalBackend

        return ClassicalBackend(recipes=config.recipes, candidates_per_strength=config.candidates)
    if name == "diffusion":
        from synthesis.backends.diffusion import DiffusionBackend  # heavy: only when asked for

        return DiffusionBackend.from_config(config.diffusion, candidates=config.candidates)
    raise InputError(f"unknown synthesis.backend {config.backend!r} (known: auto, classical, diffusion)")


def build_zero_shot_scorer(config: SynthesisConfig, inputs: RenderInputs) -> CandidateScorer | None:
    """CLIP region-vs-text when a model is configured; else `selection.zero_shot`'s rule (None lets
    the renderer use visibility)."""
    rule = config.selection.zero_shot
    if rule not in ZERO_SHOT_RULES:
        raise InputError(f"unknown synthesis.selection.zero_shot {rule!r} (known: {', '.join(ZERO_SHOT_RULES)})")
    if not config.selection.clip_model:
        return StrengthMixScorer() if rule == "strength_mix" else None
    from synthesis.clip_scoring import ClipRegionScorer  # loads transformers: only when asked for

    return ClipRegionScorer(
        config.selection.clip_model,
        {t: prompt_choices(config, inputs.category, t) for t in inputs.class_names},
        inputs.category,
        local_files_only=config.selection.local_files_only,
    )


def check_settings(config: SynthesisConfig, anomaly_types: list[str]) -> None:
    """Fail before rendering anything on a per-type setting for a type the data does not have
    (usually a typo) or an unknown prior name."""
    known = set(anomaly_types)
    for section in ("priors", "recipes", "prompts"):
        for key in getattr(config, section):
            if key != "default" and key not in known:
                raise InputError(
                    f"params synthesis.{section} names anomaly type {key!r}, which the manifest does not have "
                    f"(types: {', '.join(anomaly_types)})"
                )
    for names in config.priors.values():
        parse_priors(names)


def run_synthesize(
    manifest_path: str | Path,
    out_dir: str | Path,
    config: SynthesisConfig,
    image_size: int,
    global_seed: int,
    backend_factory: BackendFactory | None = None,
    overwrite: bool = False,
) -> DatasetSummary | None:
    """Render this process's share; the main process returns the finished dataset's summary.

    `out_dir` must be new, empty or made by this command; another job's dataset there is only
    replaced with `overwrite`. The main process prints "resuming: ..." before a resumed render and
    `summary_line` at the end.
    """
    started = time.monotonic()
    import torch
    from accelerate import PartialState  # initialises torch.distributed under `accelerate launch`

    # cpu=True is what lets N launched processes without CUDA join one gloo group; only rank,
    # world size and the barrier are used here, never the device
    state = PartialState(cpu=not torch.cuda.is_available())
    manifest = Manifest.load(manifest_path)
    if not manifest.anomaly_types:
        raise InputError("manifest lists no anomaly types to synthesize", manifest_path)
    check_settings(config, manifest.anomaly_types)
    check_out_folder(out_dir)  # before loading any model: a foreign folder is refused at once
    inputs = load_inputs(manifest, image_size)
    backend = (backend_factory or build_backend)(config)
    report = render(
        inputs,
        config,
        backend,
        out_dir,
        global_seed=global_seed,
        rank=state.process_index,
        world_size=state.num_processes,
        zero_shot_scorer=build_zero_shot_scorer(config, inputs),
        foreground=make_foreground(config.foreground),
        barrier=state.wait_for_everyone,
        progress=state.is_main_process,
        overwrite=overwrite,
        announce=lambda line: print(line, flush=True),
    )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    # the real shots travel with the dataset (config `shots`), so it alone is enough to retrain
    shots = write_shots(out_dir, manifest, lambda s: source_id(s, manifest.source.get("root")))
    summary = finalize(out_dir, shots=shots.counts, test_set=describe_test_set(manifest))
    print(summary_line(out_dir, summary, report.resumed_shards, time.monotonic() - started), flush=True)
    return summary


def summary_line(out_dir: str | Path, summary: DatasetSummary, resumed_shards: int, seconds: float) -> str:
    """What a finished `synthesize` did, in one line."""
    counts = ", ".join(f"{name} {n}" for name, n in summary.counts.items())
    minutes, secs = divmod(round(seconds), 60)
    return (
        f"{out_dir}: {summary.num_rows} rows of {len(summary.class_names)} types ({counts}) in "
        f"{summary.num_shards} shards, {resumed_shards} resumed; {len(summary.fallbacks)} placement "
        f"fallbacks{' (listed in README.md)' if summary.fallbacks else ''}; {minutes}m {secs:02d}s"
    )


def push_dataset(out_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished dataset; the token comes from HF_TOKEN (or the cached login when unset)."""
    return push_to_hub(out_dir, repo_id, private=private, token=os.environ.get("HF_TOKEN"))

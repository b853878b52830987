"""Plan the synthesis job and render this process's share of it, shard by shard, resumably.

The plan is a list of tasks with stable ids and seeds. It is cut into consecutive chunks of
`shard_size` tasks; chunk i becomes `data/train-{i:05d}-of-{n:05d}.parquet` and is rendered by rank
i % world_size. Every random choice of a task draws from `numpy_rng(task.seed)`, so the dataset is
the same bytes whatever the number of processes or the batch size; a rerun skips chunks whose shard
exists, and a crash loses at most the chunk in flight. `render_state.json` fingerprints the plan and
settings so a changed job starts fresh instead of mixing old and new shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from core.errors import InputError
from core.manifest import write_text_atomic
from synthesis.backends.base import PaintBackend, PaintRequest
from synthesis.config import SynthesisConfig
from synthesis.dataset import (
    CARD_NAME,
    CardInfo,
    DatasetRow,
    DatasetSummary,
    dataset_features,
    list_shards,
    remove_stale_temp_files,
    shard_path,
    validate_dataset,
    write_card,
    write_shard,
)
from synthesis.foreground import ForegroundFn, classical_foreground
from synthesis.priors import WHOLE_IMAGE, PlacementError, PriorLibrary, PriorSpec, default_priors_for, parse_priors
from synthesis.regions import augment_region, cut_regions, place_region
from synthesis.seeding import derive_seed, numpy_rng
from synthesis.selection import CandidateScorer, ReferenceSSIMScorer, VisibilityScorer, select_best
from synthesis.shots import SHOTS_FILE

log = logging.getLogger(__name__)

STATE_NAME = "render_state.json"
Mode = Literal["zero_shot", "few_shot"]  # `core.shards.MODES`, the dataset's `mode` column


@dataclass(frozen=True)
class RenderTask:
    task_id: str  # stable; the resume key
    index: int  # position in the plan
    anomaly_type: str
    label: int  # index into the anomaly types (normal excluded)
    mode: Mode
    seed: int


@dataclass
class RenderInputs:
    """Everything the renderer paints from, already at the working size."""

    category: str
    class_names: list[str]  # the anomaly types in label order (normal excluded)
    normal_images: list[tuple[str, np.ndarray]]  # (source id, (H, W, 3) uint8 RGB)
    anomaly_shots: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (type, image, bool mask)

    @property
    def few_shot_types(self) -> list[str]:
        with_shots = {t for t, _, _ in self.anomaly_shots}
        return [t for t in self.class_names if t in with_shots]


@dataclass
class RenderReport:
    rank: int
    world_size: int
    num_shards: int
    written: list[int]  # shard indices rendered by this call
    skipped: list[int]  # shard indices of this rank already on disk
    rows_written: int
    fresh_start: bool  # a different job's output was removed (only with overwrite)
    fallbacks: int = 0  # masks of this call's rows not drawn from their first-choice prior
    resumed_shards: int = 0  # shards of every rank already on disk when the main process started


def plan_tasks(
    anomaly_types: Sequence[str],
    images_per_type: int,
    few_shot_types: Sequence[str],
    few_shot_fraction: float,
    global_seed: int,
) -> list[RenderTask]:
    """The whole job, deterministic. Types interleave so every shard mixes them.

    Of a type with real shots, task i is few-shot when floor((i+1)·f) > floor(i·f): the share is
    exactly f, spread evenly, with no random draw.
    """
    if images_per_type < 0 or not 0.0 <= few_shot_fraction <= 1.0:
        raise InputError(
            f"need images_per_type >= 0 and 0 <= few_shot_fraction <= 1, got {images_per_type}, {few_shot_fraction}"
        )
    few = set(few_shot_types)
    tasks: list[RenderTask] = []
    for i in range(images_per_type):
        for label, anomaly_type in enumerate(anomaly_types):
            is_few = anomaly_type in few and int((i + 1) * few_shot_fraction) > int(i * few_shot_fraction)
            task_id = f"{anomaly_type}-{i:05d}"
            tasks.append(
                RenderTask(
                    task_id=task_id,
                    index=len(tasks),
                    anomaly_type=anomaly_type,
                    label=label,
                    mode="few_shot" if is_few else "zero_shot",
                    seed=derive_seed(global_seed, task_id),
                )
            )
    return tasks


def chunk_tasks(tasks: Sequence[RenderTask], shard_size: int) -> list[list[RenderTask]]:
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    return [list(tasks[i : i + shard_size]) for i in range(0, len(tasks), shard_size)]


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(range(rank, num_shards, world_size))


def prompt_choices(config: SynthesisConfig, category: str, anomaly_type: str) -> list[str]:
    return config.prompts.get(anomaly_type) or [f"a photo of a {category} with a {anomaly_type.replace('_', ' ')}"]


def prior_names(config: SynthesisConfig, anomaly_type: str) -> list[str] | None:
    """Configured prior names of a type; None means the library's default for it."""
    return config.priors.get(anomaly_type) or config.priors.get("default")


class RequestBuilder:
    """Turns a task into a paint request; caches what is shared by many tasks (foregrounds, regions)."""

    def __init__(self, inputs: RenderInputs, config: SynthesisConfig, foreground: ForegroundFn):
        if not inputs.normal_images:
            raise InputError("no normal images to paint on; the manifest needs normal shots")
        self.inputs = inputs
        self.config = config
        self.foreground = foreground
        self.priors = PriorLibrary()
        self.fallbacks: dict[str, str] = {}  # task id -> what replaced its mask (see `build`)
        self._foregrounds: dict[int, np.ndarray] = {}
        self._regions: dict[int, list] = {}
        self._specs: dict[str, list[PriorSpec]] = {}
        self._shots_by_type: dict[str, list[int]] = {}
        for i, (anomaly_type, _, _) in enumerate(inputs.anomaly_shots):
            self._shots_by_type.setdefault(anomaly_type, []).append(i)

    def foreground_of(self, index: int) -> np.ndarray:
        if index not in self._foregrounds:
            self._foregrounds[index] = self.foreground(self.inputs.normal_images[index][1])
        return self._foregrounds[index]

    def regions_of(self, shot: int) -> list:
        if shot not in self._regions:
            anomaly_type, image, mask = self.inputs.anomaly_shots[shot]
            if not mask.any():  # cut_regions would refuse it without naming the shot
                raise InputError(f"anomaly shot #{shot} of type {anomaly_type!r} has an empty mask")
            self._regions[shot] = cut_regions(image, mask)
        return self._regions[shot]

    def prior_specs(self, anomaly_type: str) -> list[PriorSpec]:
        if anomaly_type not in self._specs:
            names = prior_names(self.config, anomaly_type) or default_priors_for(anomaly_type)
            self._specs[anomaly_type] = parse_priors(names)
        return self._specs[anomaly_type]

    def build(self, task: RenderTask) -> tuple[str, PaintRequest]:
        """(source id, request); the draw order below is part of the dataset's definition.

        A mask that does not fit the foreground falls back (`PriorLibrary.sample_with_fallback`;
        a real defect region goes anywhere on the image); `fallbacks` records what was used.
        """
        rng = numpy_rng(task.seed)
        source = int(rng.integers(len(self.inputs.normal_images)))
        source_id, image = self.inputs.normal_images[source]
        foreground = self.foreground_of(source)
        prompts = prompt_choices(self.config, self.inputs.category, task.anomaly_type)
        prompt = prompts[int(rng.integers(len(prompts)))]
        reference = None
        if task.mode == "few_shot":
            shots = self._shots_by_type.get(task.anomaly_type)
            if not shots:
                raise ValueError(f"few-shot task {task.task_id} but no shot of type {task.anomaly_type!r}")
            regions = self.regions_of(shots[int(rng.integers(len(shots)))])
            patch = augment_region(regions[int(rng.integers(len(regions)))], rng)
            try:
                reference, mask = place_region(patch, image, foreground, rng)
            except PlacementError:  # one hard image must not stop the render: anywhere on it
                reference, mask = place_region(patch, image, None, rng)
                self.fallbacks[task.task_id] = f"real defect region -> {WHOLE_IMAGE}"
        else:
            try:
                draw = self.priors.sample_with_fallback(self.prior_specs(task.anomaly_type), foreground, rng)
            except PlacementError as exc:
                raise InputError(f"anomaly type {task.anomaly_type!r} cannot be rendered on {source_id}: {exc}") from None
            mask = draw.mask
            if draw.fallback:
                self.fallbacks[task.task_id] = draw.fallback
        request = PaintRequest(
            image=image,
            mask=np.asarray(mask, dtype=bool),
            anomaly_type=task.anomaly_type,
            prompt=prompt,
            seed=task.seed,
            negative_prompt=self.config.negative_prompt,
            reference=reference,
        )
        return source_id, request


def strengths_for(mode: Mode, config: SynthesisConfig, backend_name: str) -> list[float]:
    # the diffusion backend only harmonises a pasted real defect, so a low strength; classical
    # candidates are cheap, so the full sweep either way
    if mode == "few_shot" and backend_name == "diffusion":
        return [config.diffusion.few_shot_strength]
    return list(config.strengths)


def render_chunk(
    tasks: Sequence[RenderTask],
    builder: RequestBuilder,
    backend: PaintBackend,
    scorers: dict[str, CandidateScorer],
    config: SynthesisConfig,
    on_task_done: Callable[[int], None] = lambda n: None,
) -> list[DatasetRow]:
    """Rows of one chunk in plan order. Batches never mix modes (they use different strengths)."""
    built = [builder.build(task) for task in tasks]
    rows: list[DatasetRow | None] = [None] * len(tasks)
    batch_size = max(1, config.batch_size)
    for mode in ("zero_shot", "few_shot"):
        positions = [i for i, task in enumerate(tasks) if task.mode == mode]
        for start in range(0, len(positions), batch_size):
            batch = positions[start : start + batch_size]
            requests = [built[i][1] for i in batch]
            painted = backend.paint(requests, strengths_for(mode, config, backend.name))
            for i, request, candidates in zip(batch, requests, painted, strict=True):
                best, score = select_best(candidates, scorers[mode].score(request, candidates))
                task = tasks[i]
                rows[i] = DatasetRow(
                    image=best.image,
                    mask=best.mask,
                    label=task.label,
                    category=builder.inputs.category,
                    source_id=built[i][0],
                    prompt=request.prompt,
                    strength=best.strength,
                    backend=backend.name,
                    seed=task.seed,
                    score=score,
                    task_id=task.task_id,
                    mode=task.mode,
                )
            on_task_done(len(batch))
    return rows  # type: ignore[return-value]  # every position belongs to exactly one mode


def _inputs_digest(inputs: RenderInputs) -> str:
    digest = hashlib.sha256()
    for source_id, image in inputs.normal_images:
        digest.update(source_id.encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    for anomaly_type, image, mask in inputs.anomaly_shots:
        digest.update(anomaly_type.encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(np.ascontiguousarray(mask, dtype=bool).tobytes())
    return digest.hexdigest()


def render_state(
    tasks: Sequence[RenderTask],
    num_shards: int,
    inputs: RenderInputs,
    config: SynthesisConfig,
    backend_name: str,
    scorer_name: str,
    global_seed: int,
) -> dict:
    """What the output directory records about the job; `fingerprint` covers all that shapes the rows."""
    params = dataclasses.asdict(config)
    shaping = {k: v for k, v in params.items() if k != "batch_size"}  # batch size never changes a row
    plan = [(t.task_id, t.mode, t.seed) for t in tasks]
    # the columns too: shards of an older schema must not be resumed into one with a new column
    columns = list(dataset_features(inputs.class_names))
    blob = json.dumps(
        [plan, num_shards, inputs.category, inputs.class_names, shaping, backend_name, scorer_name, _inputs_digest(inputs),
         columns],
        sort_keys=True,
    )
    return {
        "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
        "num_shards": num_shards,
        "num_tasks": len(tasks),
        "category": inputs.category,
        "class_names": list(inputs.class_names),
        "backend": backend_name,
        "global_seed": int(global_seed),
        "params": params,
        "columns": columns,
    }


def read_state(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # unreadable state cannot vouch for the shards next to it: treated as a different job


def changed_settings(previous: dict, state: dict) -> list[str]:
    """Names of what differs between two jobs' states, for the refusal message."""
    changed = [key for key in ("global_seed", "category", "class_names", "backend", "num_tasks")
               if previous.get(key) != state.get(key)]
    if previous.get("columns") != state.get("columns"):
        changed.append("the dataset's columns (written by another version of uniadc)")
    old_params, new_params = previous.get("params") or {}, state.get("params") or {}
    changed += [f"synthesis.{key}" for key in sorted(set(old_params) | set(new_params))
                if key != "batch_size" and old_params.get(key) != new_params.get(key)]
    return changed or ["the input images or the scorer"]


def _planned_shards(out_dir: Path, num_shards: int) -> set[Path]:
    return {shard_path(out_dir, i, num_shards) for i in range(num_shards)}


def _own_shards(out_dir: Path, state: dict | None) -> list[Path]:
    """Shards the job recorded in `state` planned, that are on disk."""
    if not state or not isinstance(state.get("num_shards"), int):
        return []
    planned = _planned_shards(out_dir, state["num_shards"])
    return [p for p in list_shards(out_dir) if p in planned]


def check_out_folder(out_dir: str | Path) -> None:
    """Refuse a folder this tool did not make, unless it is empty: it holds someone's files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("the output folder is a file", out_dir)
    if (out_dir / STATE_NAME).is_file():
        return
    entries = sorted(p.name for p in out_dir.iterdir() if not _is_state_temp(p)) if out_dir.is_dir() else []
    if entries:
        raise InputError(
            f"folder is not empty and was not made by `uniadc synthesize` (no {STATE_NAME}; holds "
            f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); nothing was changed: "
            "choose a new or empty --out folder",
            out_dir,
        )


def _is_state_temp(path: Path) -> bool:
    """A temp file of our state write, left by a process killed while claiming the folder."""
    return path.name.startswith(f".{STATE_NAME}.") and path.name.endswith(".tmp")


def _remove_own_temp_files(out_dir: Path) -> None:
    """Temp files a killed writer left in our own folder (card, state, shards, shots)."""
    for stale in [*out_dir.glob(".*.tmp"), *remove_stale_temp_files(out_dir), *out_dir.glob("shots/.*.tmp")]:
        stale.unlink(missing_ok=True)
        log.info("removed stale temp file %s", stale)


def prepare_output(out_dir: str | Path, state: dict, overwrite: bool = False) -> bool:
    """Main process only, before any rank writes: claim the folder, then resume or start over.

    The folder must be new, empty, or one this tool made (it holds `render_state.json`). A folder
    holding another job's output (other settings) is only replaced with `overwrite`, and then only
    the files this tool wrote are removed. Returns True when another job's output was removed.
    """
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    if not state_path.is_file():
        check_out_folder(out_dir)
        write_text_atomic(state_path, json.dumps(state, indent=1))
        _remove_own_temp_files(out_dir)
        return False
    _remove_own_temp_files(out_dir)
    previous = read_state(out_dir)
    replaced = False
    if previous is None or previous.get("fingerprint") != state["fingerprint"]:
        _replace_other_job(out_dir, previous, state, overwrite)
        replaced = True
    strays = sorted(set(list_shards(out_dir)) - _planned_shards(out_dir, state["num_shards"]))
    if strays:  # not written by this job: never deleted, and they would mix into the dataset
        raise InputError(
            f"{len(strays)} shard(s) this job did not plan are in data/ (first: {strays[0].name}); "
            "move them away or choose another --out",
            out_dir,
        )
    return replaced


def _replace_other_job(out_dir: Path, previous: dict | None, state: dict, overwrite: bool) -> None:
    """Another job's output (or an unreadable state): refuse, or with `overwrite` remove its own files."""
    own = _own_shards(out_dir, previous)
    card = out_dir / CARD_NAME
    if not overwrite:
        if previous is None:
            what = f"an unreadable {STATE_NAME}"
        else:
            done = "a finished dataset" if card.is_file() else f"a partial render ({len(own)} of {previous.get('num_shards')} shards)"
            what = f"{done} made with other settings (changed: {', '.join(changed_settings(previous, state))})"
        raise InputError(
            f"holds {what}; nothing was changed: pass --overwrite to replace it (only the files "
            "`uniadc synthesize` wrote are removed), or choose another --out",
            out_dir,
        )
    log.warning("%s: --overwrite: removing the other job's %d shards and its card", out_dir, len(own))
    for path in [*own, card, out_dir / SHOTS_FILE]:  # the real shots are rewritten by the new job
        path.unlink(missing_ok=True)
    write_text_atomic(out_dir / STATE_NAME, json.dumps(state, indent=1))


def render(
    inputs: RenderInputs,
    config: SynthesisConfig,
    backend: PaintBackend,
    out_dir: str | Path,
    *,
    global_seed: int,
    rank: int = 0,
    world_size: int = 1,
    zero_shot_scorer: CandidateScorer | None = None,
    foreground: ForegroundFn | None = None,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    announce: Callable[[str], None] | None = None,
) -> RenderReport:
    """Render this rank's missing shards. `barrier` syncs ranks after the main one prepared the output.

    `overwrite` lets a different job's output in `out_dir` be replaced (see `prepare_output`);
    `announce` gets the main process's line about a resumed render.
    """
    out_dir = Path(out_dir)
    zero_shot_scorer = zero_shot_scorer or VisibilityScorer()
    tasks = plan_tasks(
        inputs.class_names, config.images_per_type, inputs.few_shot_types, config.few_shot_fraction, global_seed
    )
    chunks = chunk_tasks(tasks, config.shard_size)
    state = render_state(
        tasks, len(chunks), inputs, config, backend.name, type(zero_shot_scorer).__name__, global_seed
    )

    fresh = prepare_output(out_dir, state, overwrite=overwrite) if rank == 0 else False
    if barrier is not None:
        barrier()
    if rank != 0 and (read_state(out_dir) or {}).get("fingerprint") != state["fingerprint"]:
        raise RuntimeError(f"rank {rank} planned a different job than the main process in {out_dir}")

    resumed = sum(shard_path(out_dir, i, len(chunks)).exists() for i in range(len(chunks))) if rank == 0 else 0
    if resumed and announce is not None:
        announce(f"resuming: {resumed} of {len(chunks)} shards done")
    mine = shards_of_rank(len(chunks), rank, world_size)
    todo = [i for i in mine if not shard_path(out_dir, i, len(chunks)).exists()]
    builder = RequestBuilder(inputs, config, foreground or classical_foreground)
    scorers: dict[str, CandidateScorer] = {"zero_shot": zero_shot_scorer, "few_shot": ReferenceSSIMScorer()}
    features = dataset_features(inputs.class_names)
    rows_written = 0
    with tqdm(
        total=sum(len(chunks[i]) for i in todo), desc="synthesize", unit="img", disable=not progress or rank != 0
    ) as bar:
        for i in todo:
            rows = render_chunk(chunks[i], builder, backend, scorers, config, on_task_done=bar.update)
            fallbacks = {t.task_id: builder.fallbacks[t.task_id] for t in chunks[i] if t.task_id in builder.fallbacks}
            write_shard(rows, shard_path(out_dir, i, len(chunks)), features, {"fallbacks": fallbacks} if fallbacks else None)
            rows_written += len(rows)
    return RenderReport(
        rank=rank,
        world_size=world_size,
        num_shards=len(chunks),
        written=todo,
        skipped=[i for i in mine if i not in todo],
        rows_written=rows_written,
        fresh_start=fresh,
        fallbacks=len(builder.fallbacks),
        resumed_shards=resumed,
    )


def finalize(out_dir: str | Path, shots: dict[str, int] | None = None,
             test_set: dict | None = None) -> DatasetSummary:
    """Main process, after every rank finished: check the whole dataset and write its card.

    `shots` (shots per class, written as the `shots` config) and `test_set` (how the source's
    test set is drawn) go into the card when given.
    """
    out_dir = Path(out_dir)
    state = read_state(out_dir)
    if state is None:
        raise InputError(f"no {STATE_NAME}; this is not a synthesis output directory", out_dir)
    summary = validate_dataset(out_dir)
    if summary.num_shards != state["num_shards"] or summary.num_rows != state["num_tasks"]:
        raise InputError(
            f"incomplete: {summary.num_rows} of {state['num_tasks']} images in {summary.num_shards} of "
            f"{state['num_shards']} shards; rerun `uniadc synthesize` to finish",
            out_dir,
        )
    params = state["params"]
    diffusion = params.get("diffusion", {}) if state["backend"] == "diffusion" else {}
    write_card(
        out_dir,
        CardInfo(
            category=state["category"],
            class_names=state["class_names"],
            backend=state["backend"],
            global_seed=state["global_seed"],
            counts=summary.counts,
            params=params,
            model_id=diffusion.get("model"),
            model_revision=diffusion.get("revision"),
            fallbacks=summary.fallbacks,
            shots=shots,
            test_set=test_set,
        ),
    )
    return summary

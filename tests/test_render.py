"""The renderer: plan, shards per rank, batch-size invariance, crash + resume, fresh starts, glue."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import textwrap
import typing
from unittest import mock
from pathlib import Path

import datasets
import numpy as np
import pytest

from core.errors import InputError
from core.images import write_png
from core.manifest import Manifest, Sample
from core.shards import MODES
from synthesis.backends.base import Candidate
from synthesis.config import SynthesisConfig
from synthesis.dataset import dataset_features, legacy_features, shard_path, validate_dataset
from synthesis.render import (
    STATE_NAME,
    Mode,
    RenderInputs,
    chunk_tasks,
    finalize,
    plan_tasks,
    read_state,
    render,
    render_state,
    shards_of_rank,
)
from synthesis.seeding import derive_seed, numpy_rng

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TYPES = ["crack", "stain"]
SEED = 3


class FakeBackend:
    """Cheap, deterministic per request (like every real backend): noise blended in the mask."""

    name = "fake"

    def __init__(self, fail_after_calls: int | None = None):
        self.fail_after_calls = fail_after_calls
        self.batch_sizes: list[int] = []

    def paint(self, requests, strengths):
        if self.fail_after_calls is not None and len(self.batch_sizes) >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.batch_sizes.append(len(requests))
        out = []
        for request in requests:
            base = request.reference if request.reference is not None else request.image
            candidates = []
            for k, strength in enumerate(strengths):
                noise = numpy_rng(request.seed, k).integers(0, 256, base.shape).astype(np.float32)
                image = request.image.copy()
                m = request.mask
                image[m] = ((1 - strength) * base[m] + strength * noise[m]).astype(np.uint8)
                candidates.append(Candidate(image=image, mask=m.copy(), strength=float(strength), index=k))
            out.append(candidates)
        return out


def surface(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(90, 160, SIZE, dtype=np.float32)[None, :, None]
    return np.clip(ramp + rng.normal(0, 6, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def crack_shot() -> tuple[np.ndarray, np.ndarray]:
    image = surface(100)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[30:33, 10:50] = True
    image[mask] = 20
    return image, mask


def make_inputs() -> RenderInputs:
    image, mask = crack_shot()
    return RenderInputs(
        category="tile",
        class_names=list(TYPES),
        normal_images=[(f"good/{i:03d}.png", surface(i)) for i in range(3)],
        anomaly_shots=[("crack", image, mask)],
    )


def make_config(**overrides) -> SynthesisConfig:
    base = dict(images_per_type=5, shard_size=3, batch_size=2, strengths=[0.4, 0.7], few_shot_fraction=0.5)
    return SynthesisConfig(**{**base, **overrides})


def run(out: Path, config: SynthesisConfig | None = None, backend=None, **kwargs):
    return render(
        make_inputs(), config or make_config(), backend or FakeBackend(), out, global_seed=SEED, progress=False, **kwargs
    )


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("train-*.parquet"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """Shards of one uninterrupted single-process run: what every other way must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run(out)
    return shard_bytes(out)


# --- plan -----------------------------------------------------------------------------------------


def test_plan_is_deterministic_with_stable_ids_and_seeds():
    plan = plan_tasks(TYPES, 4, ["crack"], 0.5, SEED)
    assert plan == plan_tasks(TYPES, 4, ["crack"], 0.5, SEED)
    assert [t.task_id for t in plan[:4]] == ["crack-00000", "stain-00000", "crack-00001", "stain-00001"]
    assert [t.index for t in plan] == list(range(8))
    assert all(t.seed == derive_seed(SEED, t.task_id) for t in plan)
    assert {t.anomaly_type: t.label for t in plan} == {"crack": 0, "stain": 1}
    other = plan_tasks(TYPES, 4, ["crack"], 0.5, SEED + 1)
    assert [t.task_id for t in other] == [t.task_id for t in plan]
    assert all(a.seed != b.seed for a, b in zip(plan, other))


def test_plan_few_shot_share_is_exact_and_only_for_types_with_shots():
    assert typing.get_args(Mode) == MODES  # a task's mode is what the dataset's `mode` column holds
    plan = plan_tasks(TYPES, 10, ["crack"], 0.3, SEED)
    modes = {t: [task.mode for task in plan if task.anomaly_type == t] for t in TYPES}
    assert modes["crack"].count("few_shot") == 3
    assert set(modes["stain"]) == {"zero_shot"}
    assert all(t.mode == "few_shot" for t in plan_tasks(TYPES, 3, TYPES, 1.0, SEED))
    with pytest.raises(InputError):
        plan_tasks(TYPES, 3, [], 1.5, SEED)


def test_every_chunk_belongs_to_exactly_one_rank():
    chunks = chunk_tasks(plan_tasks(TYPES, 5, [], 0.0, SEED), 3)
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    owned = sorted(i for r in range(3) for i in shards_of_rank(len(chunks), r, 3))
    assert owned == list(range(len(chunks)))


# --- render ---------------------------------------------------------------------------------------


def test_render_writes_loadable_dataset_in_plan_order(tmp_path):
    report = run(tmp_path)
    assert (report.num_shards, report.written, report.rows_written) == (4, [0, 1, 2, 3], 10)
    summary = finalize(tmp_path)
    assert summary.counts == {"crack": 5, "stain": 5}
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].names == TYPES
    plan = plan_tasks(TYPES, 5, ["crack"], 0.5, SEED)
    assert ds["task_id"] == [t.task_id for t in plan]
    assert ds["seed"] == [t.seed for t in plan]
    assert set(ds["backend"]) == {"fake"} and set(ds["category"]) == {"tile"}
    assert set(ds["source_id"]) <= {"good/000.png", "good/001.png", "good/002.png"}
    assert ds["mode"] == [t.mode for t in plan] and set(ds["mode"]) == {"zero_shot", "few_shot"}
    assert all(p.startswith("a photo of a tile with a ") for p in ds["prompt"])
    for row, task in zip(ds, plan):
        mask = np.asarray(row["mask"]) > 0
        assert mask.any(), task.task_id
        normal = dict(make_inputs().normal_images)[row["source_id"]]
        image = np.asarray(row["image"])
        np.testing.assert_array_equal(image[~mask], normal[~mask])  # painted only inside the mask
        assert row["strength"] in (pytest.approx(0.4), pytest.approx(0.7))
    assert "| crack | 5 |" in (tmp_path / "README.md").read_text()


def test_world_size_two_gives_the_same_bytes(tmp_path, reference):
    r0 = run(tmp_path, rank=0, world_size=2)
    r1 = run(tmp_path, rank=1, world_size=2)
    assert (r0.written, r1.written) == ([0, 2], [1, 3])
    assert shard_bytes(tmp_path) == reference
    finalize(tmp_path)


def test_batch_size_does_not_change_the_output(tmp_path, reference):
    for batch_size in (1, 5):
        out = tmp_path / f"b{batch_size}"
        backend = FakeBackend()
        run(out, make_config(batch_size=batch_size), backend)
        assert max(backend.batch_sizes) <= batch_size
        assert shard_bytes(out) == reference
        assert read_state(out)["params"]["batch_size"] == batch_size


def test_crash_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    # 2 zero-shot batches per 3-task chunk at most: shard 0 lands, the crash hits inside a later chunk
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, backend=FakeBackend(fail_after_calls=3))
    done = sorted(shard_bytes(tmp_path))
    assert 0 < len(done) < 4
    with pytest.raises(InputError, match="incomplete|missing"):
        finalize(tmp_path)
    stale = tmp_path / "data" / f".{shard_path(tmp_path, 3, 4).name}.dead.tmp"
    stale.write_bytes(b"half a shard from the killed process")

    report = run(tmp_path)
    assert report.skipped == [int(name[6:11]) for name in done]
    assert not report.fresh_start and not stale.exists()
    assert shard_bytes(tmp_path) == reference
    summary = finalize(tmp_path)  # raises on duplicate or missing task ids
    assert summary.num_rows == 10


def test_rerun_of_finished_job_renders_nothing(tmp_path):
    run(tmp_path)
    backend = FakeBackend()
    report = run(tmp_path, backend=backend)
    assert report.written == [] and report.skipped == [0, 1, 2, 3] and backend.batch_sizes == []


def dir_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_changed_settings_refuse_to_replace_a_finished_dataset(tmp_path):
    out = tmp_path / "out"
    run(out)
    finalize(out)
    before = dir_bytes(out)
    with pytest.raises(InputError, match=r"holds a finished dataset made with other settings \(changed: "
                                         r"synthesis.shard_size, synthesis.strengths\).*--overwrite"):
        run(out, make_config(strengths=[0.9], shard_size=4))
    assert dir_bytes(out) == before  # nothing touched


def test_a_render_of_an_older_schema_is_never_resumed_into_the_new_one(tmp_path):
    out = tmp_path / "out"
    run(out)  # all shards, no card yet: a render that could still be resumed
    tasks = plan_tasks(TYPES, 5, ["crack"], 0.5, SEED)
    args = (tasks, 4, make_inputs(), make_config(), "fake", "VisibilityScorer", SEED)
    state = render_state(*args)
    assert state == json.loads((out / "render_state.json").read_text()) and state["columns"][-1] == "mode"
    with mock.patch("synthesis.render.dataset_features", lambda names: legacy_features(dataset_features(names))):
        older = render_state(*args)  # the same job with the columns before `mode`
    assert older["fingerprint"] != state["fingerprint"] and older["columns"] == state["columns"][:-1]
    (out / "render_state.json").write_text(json.dumps(older))
    before = dir_bytes(out)
    with pytest.raises(InputError, match=r"changed: the dataset's columns \(written by another version"):
        run(out)
    assert dir_bytes(out) == before


def test_overwrite_replaces_only_the_tools_own_files(tmp_path):
    out = tmp_path / "out"
    run(out)
    finalize(out)
    old_fingerprint = read_state(out)["fingerprint"]
    (out / "notes.txt").write_text("the user's")
    new_config = make_config(strengths=[0.9], shard_size=4)
    report = run(out, new_config, overwrite=True)
    assert report.fresh_start
    assert sorted(shard_bytes(out)) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert not (out / "README.md").exists()  # the old card described the old job
    assert (out / "notes.txt").read_text() == "the user's"
    assert read_state(out)["fingerprint"] != old_fingerprint
    run(tmp_path / "clean", new_config)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


def test_changed_input_images_refuse_a_partial_render_unless_overwrite(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, backend=FakeBackend(fail_after_calls=3))
    inputs = make_inputs()
    inputs.normal_images[0] = (inputs.normal_images[0][0], surface(99))
    with pytest.raises(InputError, match=r"holds a partial render \(\d of 4 shards\).*the input images"):
        render(inputs, make_config(), FakeBackend(), tmp_path, global_seed=SEED, progress=False)
    report = render(inputs, make_config(), FakeBackend(), tmp_path, global_seed=SEED, progress=False, overwrite=True)
    assert report.fresh_start and report.written == [0, 1, 2, 3]


def test_refuses_a_foreign_folder_and_touches_nothing(tmp_path):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "README.md").write_text("my notes")
    (out / "data" / "train-00000-of-00004.parquet").write_bytes(b"my own shard")
    before = dir_bytes(out)
    for overwrite in (False, True):  # --overwrite never applies to a folder the tool did not make
        with pytest.raises(InputError, match=r"mine: folder is not empty and was not made by `uniadc synthesize`"):
            run(out, overwrite=overwrite)
    assert dir_bytes(out) == before


def test_cli_refuses_a_users_folder_in_one_line_and_keeps_its_files(tmp_path):
    import sys

    manifest = write_manifest(tmp_path / "src")
    (tmp_path / "p.yaml").write_text("seed: 0\n")
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "README.md").write_text("my readme")
    (user / "data" / "train-00000-of-00002.parquet").write_bytes(b"my shard")
    cmd = [sys.executable, "-m", "pipelines.cli", "synthesize", "--params", "p.yaml", "--manifest", str(manifest),
           "--out", str(user), "--set", "synthesis.images_per_type=1"]
    done = subprocess.run(cmd + ["--overwrite"], cwd=tmp_path, capture_output=True, text=True)  # not even then
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {user}: folder is not empty and was not made by `uniadc synthesize` (no {STATE_NAME}; holds "
        "README.md, data); nothing was changed: choose a new or empty --out folder"
    ]
    assert (user / "README.md").read_text() == "my readme"
    assert (user / "data" / "train-00000-of-00002.parquet").read_bytes() == b"my shard"


def test_a_shard_the_job_did_not_plan_is_kept_and_refused(tmp_path):
    run(tmp_path)
    stray = tmp_path / "data" / "train-00000-of-00009.parquet"
    stray.write_bytes(b"not ours")
    with pytest.raises(InputError, match="1 shard.* this job did not plan.*train-00000-of-00009"):
        run(tmp_path)
    assert stray.read_bytes() == b"not ours"


def test_rank_with_a_different_plan_refuses_to_write(tmp_path):
    run(tmp_path, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="different job"):
        run(tmp_path, make_config(images_per_type=6), rank=1, world_size=2)


def test_configured_priors_and_prompts_are_used(tmp_path):
    config = make_config(
        few_shot_fraction=0.0,
        priors={"default": ["foreground"]},
        prompts={"stain": ["an oily stain"]},
    )
    run(tmp_path, config)
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "cache"))
    assert all(np.asarray(m).all() for m in ds["mask"])  # textured tiles: foreground is the whole image
    assert {p for p, label in zip(ds["prompt"], ds["label"]) if label == 1} == {"an oily stain"}


def test_finalize_needs_a_render_output(tmp_path):
    with pytest.raises(InputError, match=STATE_NAME):
        finalize(tmp_path)


# --- glue: manifest → dataset, one process and `accelerate launch` ---------------------------------


def write_manifest(root: Path) -> Path:
    normals = []
    for i in range(3):
        path = root / "good" / f"{i:03d}.png"
        write_png(path, surface(i))
        normals.append(Sample(str(path), "normal", 0, "tile", "train"))
    image, mask = crack_shot()
    write_png(root / "crack" / "000.png", image)
    write_png(root / "crack" / "000_mask.png", mask)
    shot = Sample(str(root / "crack" / "000.png"), "crack", 1, "tile", "train", str(root / "crack" / "000_mask.png"))
    manifest = Manifest("tile", list(TYPES), normals, [shot], [], {"root": str(root)})
    manifest.save(root / "manifest.json")
    return root / "manifest.json"


def test_run_synthesize_matches_render_on_the_same_inputs(tmp_path, reference):
    from pipelines.synthesize import run_synthesize

    manifest = write_manifest(tmp_path / "src")
    summary = run_synthesize(
        manifest, tmp_path / "out", make_config(), image_size=SIZE, global_seed=SEED, backend_factory=lambda c: FakeBackend()
    )
    assert summary.num_rows == 10
    assert shard_bytes(tmp_path / "out") == reference  # same source ids, pixels and plan as the in-memory inputs
    assert (tmp_path / "out" / "README.md").is_file()


def test_run_synthesize_says_what_it_did(tmp_path, capsys):
    from pipelines.synthesize import run_synthesize

    manifest, out = write_manifest(tmp_path / "src"), tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_synthesize(manifest, out, make_config(), image_size=SIZE, global_seed=SEED,
                       backend_factory=lambda c: FakeBackend(fail_after_calls=3))
    done = len(shard_bytes(out))
    capsys.readouterr()
    run_synthesize(manifest, out, make_config(), image_size=SIZE, global_seed=SEED, backend_factory=lambda c: FakeBackend())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"resuming: {done} of 4 shards done"
    assert re.fullmatch(
        rf"{re.escape(str(out))}: 10 rows of 2 types \(crack 5, stain 5\) in 4 shards, {done} resumed; "
        r"0 placement fallbacks; 0m \d\ds", lines[-1]
    ), lines[-1]


def test_run_synthesize_with_the_classical_backend(tmp_path):
    from pipelines.synthesize import run_synthesize

    manifest = write_manifest(tmp_path / "src")
    config = make_config(images_per_type=2, shard_size=2)
    summary = run_synthesize(manifest, tmp_path / "out", config, image_size=SIZE, global_seed=SEED)
    assert summary.counts == {"crack": 2, "stain": 2}
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(ds["backend"]) == {"classical"}
    for row in ds:
        image, mask = np.asarray(row["image"]), np.asarray(row["mask"]) > 0
        normal = dict(make_inputs().normal_images)[row["source_id"]]
        assert mask.any() and (image[mask] != normal[mask]).any()  # something was painted
        np.testing.assert_array_equal(image[~mask], normal[~mask])


def test_run_synthesize_rejects_unknown_backend(tmp_path):
    from pipelines.synthesize import run_synthesize

    manifest = write_manifest(tmp_path / "src")
    with pytest.raises(InputError, match="unknown synthesis.backend 'paint'"):
        run_synthesize(manifest, tmp_path / "out", make_config(backend="paint"), image_size=SIZE, global_seed=SEED)


LAUNCHED = """
import sys
sys.path.insert(0, {repo!r})
from pipelines.synthesize import run_synthesize
from tests.test_render import FakeBackend, make_config
run_synthesize({manifest!r}, {out!r}, make_config(), image_size={size}, global_seed={seed},
               backend_factory=lambda config: FakeBackend())
from accelerate import PartialState
state = PartialState()
print(f"rank {{state.process_index}} of {{state.num_processes}}", flush=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_failure(stderr: str) -> str:
    """Every rank's error lines and the launcher's summary: the tail alone shows only the launcher
    and the rank left waiting at a barrier, not why the other one failed."""
    errors = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(dict.fromkeys(errors))[:3000] + "\n...\n" + stderr[-2000:]


def launch_two_cpu_processes(script: Path) -> None:
    """`accelerate launch` a script that prints "rank R of N" as two CPU processes; assert both ran."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    # `--cpu` would take accelerate's single-process launcher; `--multi_gpu` is torchrun, which
    # on a machine without CUDA gives a gloo group of CPU processes
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script)]  # fmt: skip
    done = subprocess.run(cmd, cwd=script.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, launch_failure(done.stderr)
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout  # really two processes


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_accelerate_launch_two_cpu_processes(tmp_path, reference):
    manifest = write_manifest(tmp_path / "src")
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(LAUNCHED.format(repo=str(REPO), manifest=str(manifest), out=str(tmp_path / "out"), size=SIZE, seed=SEED))
    )
    launch_two_cpu_processes(script)
    assert shard_bytes(tmp_path / "out") == reference
    assert validate_dataset(tmp_path / "out").num_rows == 10
    assert (tmp_path / "out" / "README.md").is_file()


def test_clip_scorer_is_built_only_when_configured():
    from unittest import mock

    from pipelines.synthesize import build_zero_shot_scorer

    assert build_zero_shot_scorer(make_config(), make_inputs()) is None
    config = make_config(prompts={"crack": ["a cracked tile"]})
    config.selection.clip_model = "some/clip"
    with mock.patch("synthesis.clip_scoring.ClipRegionScorer") as scorer_cls:
        build_zero_shot_scorer(config, make_inputs())
    scorer_cls.assert_called_once_with(
        "some/clip",
        {"crack": ["a cracked tile"], "stain": ["a photo of a tile with a stain"]},
        "tile",
        local_files_only=True,
    )


# --- hard images: a mask that does not fit falls back, counted; the render never stops -----------


def circuit_inputs(size: int = 128) -> RenderInputs:
    from tests.test_foreground import circuit_board

    shot = circuit_board(size, 9)
    blob = np.zeros((size, size), dtype=bool)
    blob[20:60, 30:70] = True  # a large real defect: half of it never lands on thin traces
    shot[blob] = 128
    return RenderInputs(
        category="board",
        class_names=list(TYPES),
        normal_images=[(f"good/{i:03d}.png", circuit_board(size, i)) for i in range(3)],
        anomaly_shots=[("crack", shot, blob)],
    )


LARGE_PRIORS = {"default": ["circle:large", "rectangle:large"]}


def test_a_circuit_board_renders_fully_with_the_classical_foreground(tmp_path):
    config = make_config(images_per_type=3, priors=LARGE_PRIORS)
    render(circuit_inputs(), config, FakeBackend(), tmp_path, global_seed=SEED, progress=False)
    summary = finalize(tmp_path)
    assert summary.num_rows == 6 and summary.fallbacks == {}  # thin traces are no object: the whole image is


def test_masks_that_do_not_fit_the_foreground_fall_back_and_are_counted(tmp_path):
    def traces(image):  # 1 px lines, like the traces a split may take as the object of such an image
        fg = np.zeros(image.shape[:2], dtype=bool)
        fg[::8] = True
        return fg

    config = make_config(images_per_type=3, priors=LARGE_PRIORS)
    # a crash after the first shard: the fallbacks of the shards already written must still count
    with pytest.raises(RuntimeError, match="simulated crash"):
        render(circuit_inputs(), config, FakeBackend(fail_after_calls=2), tmp_path / "a", global_seed=SEED,
               progress=False, foreground=traces)
    lines: list[str] = []
    report = render(circuit_inputs(), config, FakeBackend(), tmp_path / "a", global_seed=SEED, progress=False,
                    foreground=traces, announce=lines.append)
    assert lines == ["resuming: 1 of 2 shards done"] and report.resumed_shards == 1
    summary = finalize(tmp_path / "a")
    render(circuit_inputs(), config, FakeBackend(), tmp_path / "b", global_seed=SEED, progress=False, foreground=traces)
    assert summary.fallbacks == finalize(tmp_path / "b").fallbacks and shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")

    assert summary.num_rows == 6 and len(summary.fallbacks) >= 3
    notes = set(summary.fallbacks.values())
    assert "real defect region -> whole image" in notes  # the few-shot crack region
    assert all(n.startswith(("circle:large -> ", "rectangle:large -> ", "real defect")) for n in notes)
    assert len(summary.fallbacks) == 6  # nothing keeps half of itself on 1 px lines
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"Placement fallbacks: {len(summary.fallbacks)} of 6 masks" in card
    ds = datasets.load_dataset(str(tmp_path / "a"), split="train", cache_dir=str(tmp_path / "cache"))
    assert all(np.asarray(m).any() for m in ds["mask"])

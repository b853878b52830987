"""Fault injection: `uniadc synthesize` SIGKILLed at random points, then rerun, gives the very bytes
of an uninterrupted run (every file of the dataset folder: shards, card, state, shots).

SIGKILL runs no cleanup (no `finally`, no temp-file removal), so this proves the atomic writes and
the resume together. The default test runs the CLI's `main` in processes forked from a warm fork
server (imports done once), so the kills land in the render rather than in `import torch`; the
slow one runs the real `uniadc synthesize` command as a fresh process each time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_render import write_manifest

KILLS = 5
PARAMS = """seed: 0
image_size: 32
synthesis:
  images_per_type: 12
  shard_size: 2
  strengths: [0.4, 0.6]
  few_shot_fraction: 0.5
"""


def dir_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def synthesize_argv(root: Path, out: Path) -> list[str]:
    return ["synthesize", "--params", str(root / "p.yaml"), "--manifest", str(root / "src" / "manifest.json"),
            "--out", str(out)]


def _cli_main(argv: list[str]) -> None:
    """Child: exactly what the `uniadc` entry point runs, output discarded."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ["TQDM_DISABLE"] = "1"
    sys.argv = ["uniadc", *argv]
    from pipelines.cli import main

    main()


def _noop() -> None:
    pass


@pytest.fixture
def job(tmp_path) -> Path:
    write_manifest(tmp_path / "src")
    (tmp_path / "p.yaml").write_text(PARAMS)
    return tmp_path


def count_shards(out: Path) -> int:
    return len(list((out / "data").glob("train-*.parquet")))


def test_sigkill_at_random_points_then_rerun_gives_the_same_bytes(job):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipelines.cli", "pipelines.synthesize", "synthesis.backends.classical"])

    def run(out: Path, kill_at_shards: int | None = None, extra: float = 0.0) -> int | None:
        """Exit code, or None when it was SIGKILLed `extra` seconds after `kill_at_shards` shards
        existed. Kills follow the render's progress, not wall-clock guesses: a machine that is
        slower or faster than the reference run (a fresh venv, a loaded CI box) still gets its
        kills mid-render."""
        child = ctx.Process(target=_cli_main, args=(synthesize_argv(job, out),))
        child.start()
        if kill_at_shards is not None:
            while child.is_alive() and count_shards(out) < kill_at_shards:
                time.sleep(0.002)
            time.sleep(extra)
        else:
            child.join()
        if child.is_alive():
            child.kill()  # SIGKILL
            child.join()
            assert child.exitcode == -signal.SIGKILL
            return None
        return child.exitcode

    warm = ctx.Process(target=_noop)  # starts the fork server (its imports) outside the timings
    warm.start()
    warm.join()
    assert run(job / "reference") == 0
    total = count_shards(job / "reference")
    assert total == 12

    out = job / "out"
    rng = np.random.default_rng(20261130)
    # 5 kill points: after a seeded number of finished shards (increasing, so each rerun resumes
    # further), plus a seeded pause of up to 10 ms, so a kill may land mid-shard-write. The last
    # shards are left out: a tiny shard takes milliseconds, so a kill there could come too late.
    points = np.sort(rng.choice(np.arange(1, total - 3), KILLS, replace=False))
    partial = []
    for shards, extra in zip(points, rng.uniform(0.0, 0.01, KILLS)):
        code = run(out, kill_at_shards=int(shards), extra=float(extra))
        assert code in (None, 0)
        partial.append(code is None and 0 < count_shards(out) < total)
    assert sum(partial) >= 2, f"too few kills landed mid-render: {partial}"
    assert run(out) == 0
    assert dir_bytes(out) == dir_bytes(job / "reference")


@pytest.mark.slow
def test_sigkill_the_uniadc_command_at_random_points_then_rerun_gives_the_same_bytes(job):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def run(out: Path, timeout: float | None = None) -> int | None:
        cmd = [sys.executable, "-m", "pipelines.cli", *synthesize_argv(job, out)]
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            return None

    started = time.monotonic()
    assert run(job / "reference") == 0
    seconds = time.monotonic() - started
    out = job / "out"
    for delay in np.random.default_rng(20261130).uniform(0.2, 1.0, KILLS) * seconds:
        assert run(out, timeout=delay) in (None, 0)
    assert run(out) == 0
    assert dir_bytes(out) == dir_bytes(job / "reference")

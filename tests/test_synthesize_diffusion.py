"""The synthesize stage on the real diffusion path: a tiny inpainting pipeline and a tiny CLIP model
saved to disk (random weights, no downloads), through `run_synthesize`, a crash and two processes."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest

from synthesis.config import DiffusionConfig, SelectionConfig, SynthesisConfig
from synthesis.dataset import validate_dataset
from tests.test_render import (
    REPO, SEED, SIZE, launch_two_cpu_processes, make_config, make_inputs, shard_bytes, write_manifest,
)
from tests.tiny_models import get_dummy_clip, get_dummy_inpaint_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    get_dummy_inpaint_pipeline().save_pretrained(root / "inpaint")
    model, processor = get_dummy_clip()
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return root


def diffusion_config(models: Path) -> SynthesisConfig:
    """`backend: auto` with a model configured, as a user's params.yaml would have it."""
    return make_config(
        diffusion=DiffusionConfig(model=str(models / "inpaint"), steps=4, device="cpu"),
        selection=SelectionConfig(clip_model=str(models / "clip")),
    )


def synthesize(models: Path, root: Path, backend_factory=None):
    """Render `root/src/manifest.json` (written first if missing) into `root/out`, on one thread:
    the launched processes run one thread each, and CPU kernels may round differently with more."""
    import torch

    from pipelines.synthesize import run_synthesize

    manifest = root / "src" / "manifest.json"
    if not manifest.exists():
        write_manifest(root / "src")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_synthesize(
            manifest, root / "out", diffusion_config(models), image_size=SIZE, global_seed=SEED,
            backend_factory=backend_factory,
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rendered(models, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: what a crash + resume and two processes must reproduce."""
    root = tmp_path_factory.mktemp("diffusion")
    summary = synthesize(models, root)
    assert summary.num_rows == 10
    return root / "out"


def test_dataset_is_painted_by_the_diffusion_backend_and_scored(rendered, models, tmp_path):
    ds = datasets.load_dataset(str(rendered), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(ds["backend"]) == {"diffusion"}
    normals = dict(make_inputs().normal_images)
    config = diffusion_config(models)
    modes = set()
    for row in ds:
        image, mask = np.asarray(row["image"]), np.asarray(row["mask"]) > 0
        normal = normals[row["source_id"]]
        np.testing.assert_array_equal(image[~mask], normal[~mask])  # pasted back exactly
        assert (image[mask] != normal[mask]).any()
        if row["strength"] == pytest.approx(config.diffusion.few_shot_strength):  # SSIM to the pasted real defect
            modes.add("few-shot")
            assert -1.0 <= row["score"] <= 1.0
        else:  # CLIP: probability of this type's prompt against the others and "normal tile"
            modes.add("zero-shot")
            assert any(row["strength"] == pytest.approx(s) for s in config.strengths)
            assert 0.0 < row["score"] < 1.0
    assert modes == {"few-shot", "zero-shot"}
    card = (rendered / "README.md").read_text()
    assert str(models / "inpaint") in card  # the model id is recorded


def test_crash_then_resume_gives_the_uninterrupted_dataset(rendered, models, tmp_path):
    from synthesis.backends.diffusion import DiffusionBackend

    class Crashing(DiffusionBackend):
        calls = 0

        def paint(self, requests, strengths):
            Crashing.calls += 1
            if Crashing.calls > 3:
                raise RuntimeError("simulated crash")
            return super().paint(requests, strengths)

    def crashing_factory(config):
        backend = DiffusionBackend.from_config(config.diffusion, candidates=config.candidates)
        backend.__class__ = Crashing
        return backend

    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize(models, tmp_path, backend_factory=crashing_factory)
    assert 0 < len(shard_bytes(tmp_path / "out")) < 4
    summary = synthesize(models, tmp_path)
    assert summary.num_rows == 10
    assert shard_bytes(tmp_path / "out") == shard_bytes(rendered)


LAUNCHED = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.test_synthesize_diffusion import synthesize
synthesize(Path({models!r}), Path({root!r}))
from accelerate import PartialState
print(f"rank {{PartialState().process_index}} of {{PartialState().num_processes}}", flush=True)
"""


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_render_the_same_dataset(rendered, models, tmp_path):
    write_manifest(tmp_path / "src")  # before launching: the two processes only read it
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(LAUNCHED.format(repo=str(REPO), models=str(models), root=str(tmp_path))))
    launch_two_cpu_processes(script)
    assert shard_bytes(tmp_path / "out") == shard_bytes(rendered)
    assert validate_dataset(tmp_path / "out").num_rows == 10

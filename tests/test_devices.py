"""Device settings: a name torch does not know, or a CUDA device on a machine without one, is one
clear InputError (the CLI prints it and exits 2), not a traceback from the first tensor moved."""

import pytest
import torch

from core.errors import InputError
from discriminator.predict import resolve_device
from synthesis.backends.diffusion import resolve_device as resolve_diffusion_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_and_cpu_resolve(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_diffusion_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("resolve", [resolve_device, resolve_diffusion_device], ids=["discriminator", "diffusion"])
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_clear_error(no_cuda, resolve, name):
    with pytest.raises(InputError, match=rf"'{name}' asked for, but (CUDA is not available|this machine has 0 CUDA)"):
        resolve(name)


@pytest.mark.parametrize("resolve", [resolve_device, resolve_diffusion_device], ids=["discriminator", "diffusion"])
@pytest.mark.parametrize("name", ["gpu0", "cuda0", "CPU", ""])
def test_unknown_device_names_are_refused(resolve, name):
    with pytest.raises(InputError, match=r"unknown (synthesis\.diffusion\.)?device .*use auto, cpu, cuda"):
        resolve(name)


def test_train_checks_its_device_before_loading_anything(no_cuda, tmp_path):
    from pipelines.config import load_params
    from pipelines.train import run_train

    params = load_params(None, {"train.device": "cuda"})
    with pytest.raises(InputError, match=r"'cuda' asked for, but CUDA is not available"):
        run_train(params, tmp_path / "no-dataset-here", None, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"'cuda:2' asked for, but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)

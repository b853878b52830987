"""params.yaml → typed configs: defaults, overrides, and clear errors for typos and wrong types."""

from pathlib import Path

import pytest

from discriminator.config import TrainConfig
from pipelines.config import Params, load_params
from core.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_loads_and_matches_defaults_where_unset():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.synthesis.backend == "auto"
    assert params.data.k_normal == 2
    assert isinstance(params.train, TrainConfig)


def test_no_file_gives_defaults():
    assert load_params(None) == Params()


def test_a_named_params_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(InputError, match=r"absent\.yaml: params file not found"):
        load_params(tmp_path / "absent.yaml")


def test_overrides_are_typed():
    params = load_params(
        None,
        {"synthesis.images_per_type": 3, "synthesis.strengths": [0.5], "train.lr": "2e-3"},
    )
    assert params.synthesis.images_per_type == 3
    assert params.synthesis.strengths == [0.5]
    assert params.train.lr == pytest.approx(2e-3)  # PyYAML reads 2e-3 as a string


def test_nested_sections_build_dataclasses(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("synthesis:\n  diffusion:\n    steps: 4\n  priors:\n    crack: [line, 'brush:tiny']\n")
    params = load_params(path)
    assert params.synthesis.diffusion.steps == 4
    assert params.synthesis.priors == {"crack": ["line", "brush:tiny"]}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("synthesis:\n  imagez_per_type: 3\n", "unknown key `synthesis.imagez_per_type`"),
        ("train:\n  steps: many\n", "`train.steps` must be int"),
        ("synthesis:\n  strengths: 0.5\n", "`synthesis.strengths` must be a list"),
        ("data: [1, 2]\n", "`data` must be a mapping"),
        ("seed: [\n", "not valid YAML"),
    ],
)
def test_bad_params_name_the_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_params(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("train.steps", -5, "`train.steps` must be >= 1, got -5"),
        ("image_size", 0, "`image_size` must be >= 32, got 0"),
        ("image_size", -1, "`image_size` must be >= 32, got -1"),
        ("demo.size", 0, "`demo.size` must be >= 32, got 0"),
        ("train.lr", 0, "`train.lr` must be > 0, got 0.0"),
        ("train.holdout_fraction", 1.0, "`train.holdout_fraction` must be in [0, 1), got 1.0"),
        ("train.device", "gpu0",
         "`train.device` must be a device name (auto, cpu, cuda, cuda:N, mps or xpu), got 'gpu0'"),
        ("evaluate.device", "cuda0", "`evaluate.device` must be a device name"),
        ("synthesis.diffusion.device", "GPU", "`synthesis.diffusion.device` must be a device name"),
        ("synthesis.strengths", [0.5, 1.5], "`synthesis.strengths[1]` must be in (0, 1], got 1.5"),
        ("synthesis.images_per_type", 0, "`synthesis.images_per_type` must be >= 1, got 0"),
        ("evaluate.image_top_k", 0, "`evaluate.image_top_k` must be >= 1, got 0"),
        ("data.k_normal", 0, "`data.k_normal` must be >= 1, got 0"),
        # a named choice written as a YAML boolean gets the choices, not "must be str"
        ("train.normal_embedding", True, "`train.normal_embedding` must be auto, always or never, got True"),
        ("train.device", 1, "`train.device` must be a device name"),
    ],
)
def test_values_out_of_range_name_the_file_and_key(tmp_path, key, value, fragment):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\n")
    with pytest.raises(InputError) as info:
        load_params(path, {key: value})
    assert str(info.value).startswith(f"{path}: {fragment}")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps", "xpu:0"])
def test_device_names_torch_knows_are_accepted(device):
    assert load_params(None, {"train.device": device}).train.device == device


def test_memory_backbone_reaches_the_model_config():
    from pipelines.train import model_config

    params = load_params(None, {"train.backbone": "efficientnet_lite2", "train.memory_backbone": "efficientnet_lite0"})
    config = model_config(params, "tile", ["crack"], anomaly_shots=0)
    assert config.backbone["name"] == "efficientnet_lite2" and config.memory_backbone["name"] == "efficientnet_lite0"
    assert model_config(load_params(None), "tile", ["crack"], anomaly_shots=0).memory_backbone is None

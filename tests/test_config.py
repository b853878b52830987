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


def test_missing_file_gives_defaults(tmp_path):
    params = load_params(tmp_path / "absent.yaml")
    assert params == Params()


def test_overrides_are_typed(tmp_path):
    params = load_params(
        tmp_path / "absent.yaml",
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

"""Per-type synthesis settings are checked against the manifest before anything is rendered."""

import pytest

from core.errors import InputError
from pipelines.synthesize import check_settings
from synthesis.config import SynthesisConfig

TYPES = ["crack", "hole"]


def test_known_types_and_default_pass():
    config = SynthesisConfig(priors={"crack": ["line"], "default": ["ellipse:small"]}, recipes={"hole": "hole"})
    check_settings(config, TYPES)


@pytest.mark.parametrize("section", ["priors", "recipes", "prompts"])
def test_unknown_type_names_the_setting(section):
    value = {"priors": ["line"], "recipes": "crack", "prompts": ["a crack"]}[section]
    config = SynthesisConfig(**{section: {"crak": value}})
    with pytest.raises(InputError, match=rf"synthesis\.{section} names anomaly type 'crak'.*crack, hole"):
        check_settings(config, TYPES)


def test_unknown_prior_name_fails_before_rendering():
    with pytest.raises(InputError, match="blob"):
        check_settings(SynthesisConfig(priors={"crack": ["blob"]}), TYPES)


def test_auto_backend_is_diffusion_only_when_a_model_is_configured():
    from pipelines.synthesize import backend_name

    config = SynthesisConfig()
    assert config.backend == "auto" and backend_name(config) == "classical"
    config.diffusion.model = "some/inpainting-model"
    assert backend_name(config) == "diffusion"
    config.backend = "classical"
    assert backend_name(config) == "classical"

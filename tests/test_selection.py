"""Zero-shot candidate selection without CLIP: visibility, or a strength drawn per request."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import InputError
from pipelines.synthesize import build_zero_shot_scorer
from synthesis.backends.base import Candidate, PaintRequest
from synthesis.config import SynthesisConfig
from synthesis.selection import StrengthMixScorer, VisibilityScorer, select_best

STRENGTHS = (0.4, 0.5, 0.6)


def _request(seed: int) -> tuple[PaintRequest, list[Candidate]]:
    image = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    request = PaintRequest(image=image, mask=mask, anomaly_type="spot", prompt="", seed=seed)
    # stronger = darker: visibility grows with strength
    candidates = [Candidate(np.where(mask[..., None], np.uint8(100 - 100 * s), image), mask, s, k)
                  for k, s in enumerate(STRENGTHS)]
    return request, candidates


def test_visibility_keeps_the_strongest_candidate():
    request, candidates = _request(0)
    best, _ = select_best(candidates, VisibilityScorer().score(request, candidates))
    assert best.strength == max(STRENGTHS)


def test_strength_mix_draws_every_strength_about_equally_and_repeatably():
    kept = []
    for seed in range(300):
        request, candidates = _request(seed)
        best, _ = select_best(candidates, StrengthMixScorer().score(request, candidates))
        again, _ = select_best(candidates, StrengthMixScorer().score(request, candidates))
        assert again.index == best.index
        kept.append(best.strength)
    counts = [kept.count(s) for s in STRENGTHS]
    assert min(counts) > 70, counts  # 100 each expected


def test_the_rule_is_read_from_the_config():
    config = SynthesisConfig()
    assert build_zero_shot_scorer(config, None) is None  # the renderer's visibility default
    config.selection.zero_shot = "strength_mix"
    assert isinstance(build_zero_shot_scorer(config, None), StrengthMixScorer)
    config.selection.zero_shot = "loudest"
    with pytest.raises(InputError, match="synthesis.selection.zero_shot 'loudest'"):
        build_zero_shot_scorer(config, None)

import math

import numpy as np
import pytest
import torch

from core.errors import InputError
from synthesis.backends.base import Candidate, PaintRequest
from synthesis.clip_scoring import ClipRegionScorer, region_crop
from synthesis.selection import select_best
from tests.tiny_models import get_dummy_clip

PROMPTS = {"crack": ["a photo of a tile with a crack", "a cracked tile"], "blowhole": ["a tile with a blowhole"]}


@pytest.fixture(scope="module")
def clip():
    return get_dummy_clip()


def _candidates(n: int = 3) -> tuple[PaintRequest, list[Candidate]]:
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 24:40] = True
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    request = PaintRequest(image=image, mask=mask, anomaly_type="crack", prompt="a cracked tile", seed=0)
    candidates = []
    for i in range(n):
        painted = image.copy()
        painted[mask] = rng.integers(0, 255, (int(mask.sum()), 3))
        candidates.append(Candidate(image=painted, mask=mask, strength=0.5, index=i))
    return request, candidates


def test_scores_are_probabilities_of_the_type(clip):
    scorer = ClipRegionScorer(clip, PROMPTS, "tile")
    assert scorer.classes == ["crack", "blowhole", "normal"]
    request, candidates = _candidates()
    probs = scorer.class_probabilities(candidates)
    assert probs.shape == (3, 3)
    # tolerances: fp32 rounding only (~1e-7 per op); a softmax sums to 1 within a few ulps of its
    # classes, and the same probabilities computed again differ at most in the last bits
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    scores = scorer.score(request, candidates)
    np.testing.assert_allclose(scores, probs[:, 0], rtol=1e-6)
    assert all(0.0 < s < 1.0 for s in scores)
    assert len(set(np.round(scores, 7))) > 1  # candidates are told apart
    best, best_score = select_best(candidates, scores)
    assert best_score == max(scores)


def test_score_is_softmax_of_logit_scaled_cosine(clip):
    model, processor = clip
    scorer = ClipRegionScorer(clip, PROMPTS, "tile")
    request, candidates = _candidates(1)
    crop = region_crop(candidates[0].image, candidates[0].mask)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=[crop], return_tensors="pt")).pooler_output
        texts = [PROMPTS["crack"], PROMPTS["blowhole"], ["a photo of a normal tile"]]
        class_embeds = []
        for group in texts:
            tokens = processor(text=group, return_tensors="pt", padding=True)
            e = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            class_embeds.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        cos = torch.nn.functional.normalize(image, dim=-1) @ torch.stack(class_embeds).T
        expected = (model.logit_scale.exp() * cos).softmax(-1)[0, 0].item()
    # rel 1e-5: the same fp32 maths in another batch and reduction order (rounding, ~1e-7 per op over
    # a few dozen ops); a wrong prompt, normalisation or logit scale moves the score by far more
    assert scorer.score(request, candidates)[0] == pytest.approx(expected, rel=1e-5)


def test_logit_scale_sharpens_the_softmax():
    model, processor = get_dummy_clip()
    request, candidates = _candidates()
    spreads = []
    for scale in (1.0, 100.0):
        with torch.no_grad():
            model.logit_scale.fill_(math.log(scale))
        probs = ClipRegionScorer((model, processor), PROMPTS, "tile").class_probabilities(candidates)
        spreads.append(np.abs(probs - 1 / 3).max())
    assert spreads[1] > 5 * spreads[0]


def test_single_type_still_has_the_normal_negative(clip):
    scorer = ClipRegionScorer(clip, {"crack": ["a cracked tile"]}, "tile")
    assert scorer.classes == ["crack", "normal"]
    request, candidates = _candidates()
    scores = scorer.score(request, candidates)
    assert all(0.0 < s < 1.0 for s in scores)
    assert len(set(np.round(scores, 7))) > 1
    # no prompts listed: the default wording
    default = ClipRegionScorer(clip, {"crack": []}, "tile").score(request, candidates)
    explicit = ClipRegionScorer(clip, {"crack": ["a photo of a tile with a crack"]}, "tile").score(request, candidates)
    np.testing.assert_allclose(default, explicit, rtol=1e-6)


def test_region_crop_keeps_context_inside_the_image():
    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    mask = np.zeros((64, 64), bool)
    mask[2:6, 58:62] = True  # near the top-right corner
    crop = region_crop(image, mask, context=0.5, min_side=16)
    assert crop.shape == (16, 16, 3)
    assert np.array_equal(crop, image[0:16, 48:64])


def test_unknown_type_and_missing_model(clip, tmp_path):
    scorer = ClipRegionScorer(clip, PROMPTS, "tile")
    request, candidates = _candidates(1)
    request.anomaly_type = "stain"
    with pytest.raises(ValueError, match="stain"):
        scorer.score(request, candidates)
    with pytest.raises(InputError, match="no_clip_here"):
        ClipRegionScorer(str(tmp_path / "no_clip_here"), PROMPTS, "tile")


def test_loads_from_a_saved_directory(clip, tmp_path):
    model, processor = clip
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    loaded = ClipRegionScorer(str(tmp_path / "clip"), PROMPTS, "tile")
    request, candidates = _candidates()
    # rel 1e-5: the same weights bit for bit, in other memory, may round differently in the last bits
    np.testing.assert_allclose(
        loaded.score(request, candidates), ClipRegionScorer(clip, PROMPTS, "tile").score(request, candidates), rtol=1e-5
    )

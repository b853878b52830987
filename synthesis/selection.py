"""Candidate scores: which of a request's candidates to keep.

- few-shot: SSIM between the candidate and the pasted reference inside the defect's box (the
  paper's rule: stay closest to the real defect while blending in);
- zero-shot without a CLIP model: visibility, the mean absolute change inside the mask, so a
  candidate that barely changed the surface loses (it nearly always keeps the top strength); or,
  opt-in, a strength drawn per request (`StrengthMixScorer`), so the rows span faint to strong;
- zero-shot with CLIP: region-vs-text match (see `ClipRegionScorer`).
Scores are pure functions of the pixels; `select_best` breaks ties by the lower index.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import cv2
import numpy as np

from synthesis.backends.base import Candidate, PaintRequest
from synthesis.seeding import numpy_rng


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return slice(None), slice(None)
    h, w = mask.shape
    return (
        slice(max(0, ys.min() - pad), min(h, ys.max() + pad + 1)),
        slice(max(0, xs.min() - pad), min(w, xs.max() + pad + 1)),
    )


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two images (uint8, gray or RGB), Gaussian window, in [-1, 1]."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.ndim == 3:
        a = a.mean(axis=2)
        b = b.mean(axis=2)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (window, window), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim_to_reference(candidate: np.ndarray, reference: np.ndarray, mask: np.ndarray, pad: int = 8) -> float:
    """SSIM restricted to the defect's bounding box (plus context), where candidates differ."""
    box = _bbox(mask, pad)
    return ssim(candidate[box], reference[box])


def visibility(candidate: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change inside the mask, in [0, 1]."""
    if not mask.any():
        return 0.0
    diff = np.abs(candidate.astype(np.float32) - source.astype(np.float32)).mean(axis=2)
    return float(diff[mask].mean() / 255.0)


class CandidateScorer(Protocol):
    def score(self, request: PaintRequest, candidates: Sequence[Candidate]) -> list[float]: ...


class ReferenceSSIMScorer:
    """Few-shot rule: SSIM of each candidate to the pasted reference."""

    def score(self, request: PaintRequest, candidates: Sequence[Candidate]) -> list[float]:
        if request.reference is None:
            raise ValueError("ReferenceSSIMScorer needs a few-shot request with a reference")
        return [ssim_to_reference(c.image, request.reference, c.mask) for c in candidates]


class VisibilityScorer:
    """Zero-shot rule without a CLIP model: prefer the candidate that changed the surface most."""

    def score(self, request: PaintRequest, candidates: Sequence[Candidate]) -> list[float]:
        return [visibility(c.image, request.image, c.mask) for c in candidates]


class StrengthMixScorer:
    """Zero-shot rule without a CLIP model: keep a strength drawn from the request's seed (each of
    the candidates' strengths equally likely), the most visible candidate of it when there are
    several. Visibility alone keeps the top strength about 70 % of the time (MTD, 256 px), so the
    synthetic defects are nearly all the strongest version of themselves; real ones are not."""

    def score(self, request: PaintRequest, candidates: Sequence[Candidate]) -> list[float]:
        strengths = sorted({c.strength for c in candidates})
        drawn = strengths[int(numpy_rng(request.seed, "strength").integers(len(strengths)))]
        return [visibility(c.image, request.image, c.mask) if c.strength == drawn else -1.0 for c in candidates]


ZERO_SHOT_RULES = ("visibility", "strength_mix")


def select_best(candidates: Sequence[Candidate], scores: Sequence[float]) -> tuple[Candidate, float]:
    """The highest-scoring candidate (first one on ties; NaN scores never win)."""
    if not candidates or len(candidates) != len(scores):
        raise ValueError("need one score per candidate and at least one candidate")
    best = max(range(len(candidates)), key=lambda i: (np.nan_to_num(scores[i], nan=-np.inf), -i))
    return candidates[best], float(scores[best])

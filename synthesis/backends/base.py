"""The one small interface every painting backend implements.

A backend gets a batch of requests (a normal image, a mask, a type and its prompt, a seed, and
for few-shot the cut-pasted reference) and a list of strengths, and returns candidates for each
request. Selection (synthesis/selection.py) then keeps the best candidate; the backend never
chooses. Pixels outside `mask` must be exactly those of `image` in every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass
class PaintRequest:
    image: np.ndarray  # (H, W, 3) uint8 RGB: the normal image to paint on
    mask: np.ndarray  # (H, W) bool: where to paint
    anomaly_type: str
    prompt: str
    seed: int  # task seed; candidate k draws from derive_seed(seed, k)
    negative_prompt: str | None = None
    reference: np.ndarray | None = None  # few-shot: (H, W, 3) uint8, the real defect pasted in

    @property
    def few_shot(self) -> bool:
        return self.reference is not None


@dataclass
class Candidate:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool: the anomalous pixels of this candidate
    strength: float
    index: int  # candidate index within its request (the seed key)


class PaintBackend(Protocol):
    name: str

    def paint(
        self, requests: Sequence[PaintRequest], strengths: Sequence[float]
    ) -> list[list[Candidate]]:
        """One list of candidates per request (at least one candidate per strength)."""
        ...

"""Painting backends: `classical` (no weights) and `diffusion` (diffusers inpainting)."""

from synthesis.backends.base import Candidate, PaintBackend, PaintRequest

__all__ = ["Candidate", "PaintBackend", "PaintRequest"]

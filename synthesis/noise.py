"""Procedural noise (Perlin) shared by the Perlin-blob prior and the classical texture recipes."""

from __future__ import annotations

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_2d(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One octave of 2-D gradient noise in about [-1, 1] with `cells` lattice cells along (y, x)."""
    h, w = shape
    cy, cx = max(1, int(cells[0])), max(1, int(cells[1]))
    angles = rng.uniform(0, 2 * np.pi, size=(cy + 1, cx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, cy, h, endpoint=False)
    xs = np.linspace(0, cx, w, endpoint=False)
    yi, xi = ys.astype(int), xs.astype(int)
    yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grads[yi[:, None] + oy, xi[None, :] + ox]
        return g[..., 0] * (yf - oy) + g[..., 1] * (xf - ox)

    u, v = _fade(xf), _fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (top * (1 - v) + bottom * v) * np.sqrt(2)


def fractal_noise(
    shape: tuple[int, int], base_cells: int, rng: np.random.Generator, octaves: int = 3
) -> np.ndarray:
    """Octaves of Perlin noise summed with halving amplitude, rescaled to [0, 1] (float32)."""
    total = np.zeros(shape, dtype=np.float64)
    amplitude, cells = 1.0, max(1, base_cells)
    for _ in range(octaves):
        total += amplitude * perlin_2d(shape, (cells, cells), rng)
        amplitude *= 0.5
        cells *= 2
    lo, hi = total.min(), total.max()
    return ((total - lo) / (hi - lo + 1e-12)).astype(np.float32)

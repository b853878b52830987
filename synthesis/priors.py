"""The library of anomaly mask priors: shape generators × size classes, placed on the foreground.

Every shape is drawn the same way, which is what keeps the geometry right:

1. its generator turns the target area into an `Outline` — a scalar field over offsets from the
   shape's own centre (in the shape's unrotated frame) whose sublevel sets are the shape, plus
   how far from the centre the shape can reach;
2. `draw_shape` evaluates the field on a canvas of pixel centres around the requested centre,
   rotated about that centre, and keeps exactly the `area` lowest-field pixels.

So the drawn (unclipped) area equals the requested area up to rounding, whatever rasterisation
does to thin lines or tiny circles, and no retry loop is needed to hit a size class. Only
placement retries (the shape must land mostly on the foreground), and those are bounded.

Adding a shape is one generator function plus one line in `SHAPES`.

A prior that cannot be placed (a thin or fragmented foreground) does not stop a render:
`PriorLibrary.sample_with_fallback` tries the type's other priors, smaller size classes, then the
whole image, and says which it used so the renderer can count it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from core.errors import InputError
from synthesis.noise import fractal_noise

# Size classes as fractions of the image area (H * W): the shape's area is drawn uniformly in its range.
SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "tiny": (0.001, 0.005),
    "small": (0.005, 0.02),
    "medium": (0.02, 0.06),
    "large": (0.06, 0.15),
}

FOREGROUND = "foreground"  # the whole foreground mask: not drawn, so it has no size class
WHOLE_IMAGE = "whole image"  # the last fallback: the prior placed ignoring the foreground
EDGE = "edge"  # placement suffix: "@edge" centres the shape near the foreground's border
# an edge shape's centre lies within this share of its own radius (sqrt(area / pi)) of the border,
# so the border cuts it and at least half of it stays on the foreground
EDGE_BAND = 0.5
MIN_STROKE_WIDTH = 1.5  # px: thinner strokes break into dots once rasterised
PERLIN_ROUGHNESS = 1.5  # noise weight against the radial falloff (1 = one blob radius): higher, more ragged
CANVAS_MARGIN = 1.25  # canvas half-size / shape reach: the field must exceed the kept level at the border

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PlacementError(InputError):
    """A shape or a real defect region found no place on the foreground (the renderer falls back)."""


@dataclass(frozen=True)
class Outline:
    """A shape before rasterisation: lower `field(u, v)` = more inside; `reach` bounds its extent (px)."""

    field: Field
    reach: float


@dataclass(frozen=True)
class ShapeKind:
    make: Callable[[float, np.random.Generator], Outline]  # (area in px, rng) -> outline
    sizes: tuple[str, ...]


# --- shape generators: (area, rng) -> Outline, centred at (0, 0), unrotated ----------------------


def _rectangle(area: float, rng: np.random.Generator) -> Outline:
    aspect = rng.uniform(1.0, 3.0)
    half_w, half_h = math.sqrt(area * aspect) / 2, math.sqrt(area / aspect) / 2
    field = lambda u, v: np.maximum(np.abs(u) / half_w, np.abs(v) / half_h)  # noqa: E731
    return Outline(field, math.hypot(half_w, half_h))


def _ellipse_of(aspect_range: tuple[float, float]) -> Callable[[float, np.random.Generator], Outline]:
    def make(area: float, rng: np.random.Generator) -> Outline:
        aspect = rng.uniform(*aspect_range)
        # half-axes from the area (pi * a * b = area): the reference passed full sizes as half-axes
        a, b = math.sqrt(area * aspect / math.pi), math.sqrt(area / (aspect * math.pi))
        return Outline(lambda u, v: (u / a) ** 2 + (v / b) ** 2, a)

    return make


def _hollow_ellipse(area: float, rng: np.random.Generator) -> Outline:
    aspect = rng.uniform(1.0, 2.0)
    # ring half-width relative to the mid-line ellipse: the kept level ~ width < 1 leaves a hole
    width = rng.uniform(0.2, 0.4)
    # ring between radii (1 - width) and (1 + width) of the mid ellipse: area = 4 * pi * a * b * width
    a = math.sqrt(area * aspect / (4 * math.pi * width))
    b = a / aspect
    return Outline(lambda u, v: np.abs(np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0), a * (1 + width))


def _polygon(area: float, rng: np.random.Generator) -> Outline:
    count = int(rng.integers(5, 10))
    # jittered but ordered angles, every gap < pi: the polygon is star-shaped about its centre
    angles = 2 * np.pi * (np.arange(count) + rng.uniform(-0.35, 0.35, count)) / count
    radii = rng.uniform(0.55, 1.0, count)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    nxt = np.roll(pts, -1, axis=0)
    unit_area = 0.5 * float(np.sum(pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1]))
    pts = pts * math.sqrt(area / unit_area)
    nxt = np.roll(pts, -1, axis=0)
    # each edge's line n . p = c: the gauge n . p / c of the sector a point lies in is 1 on the boundary
    normals = np.stack([nxt[:, 1] - pts[:, 1], pts[:, 0] - nxt[:, 0]], axis=1)
    offsets = np.sum(normals * pts, axis=1)
    starts = np.mod(angles, 2 * np.pi)
    order = np.argsort(starts)

    def field(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        theta = np.mod(np.arctan2(v, u), 2 * np.pi)
        pos = np.searchsorted(starts[order], theta, side="right") - 1
        edge = order[np.mod(pos, count)]  # angles before the first start belong to the last edge
        return (normals[edge, 0] * u + normals[edge, 1] * v) / offsets[edge]

    return Outline(field, float(np.max(np.hypot(pts[:, 0], pts[:, 1]))))


def _perlin(area: float, rng: np.random.Generator) -> Outline:
    radius = math.sqrt(area / math.pi)
    cells = int(rng.integers(2, 5))
    # radial falloff minus noise: an irregular blob around the centre rather than noise over the image
    return Outline(
        lambda u, v: np.hypot(u, v) / radius - PERLIN_ROUGHNESS * fractal_noise(u.shape, cells, rng),
        (1.0 + PERLIN_ROUGHNESS) * radius,
    )


def _stroke_field(vertices: np.ndarray, half_width: float) -> Field:
    """Distance to a polyline in units of its half-width: the thick stroke is the level-1 set."""

    def field(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        best = np.full(u.shape, np.inf)
        for (ax, ay), (bx, by) in zip(vertices[:-1], vertices[1:]):
            dx, dy = bx - ax, by - ay
            t = np.clip(((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
            best = np.minimum(best, np.hypot(u - ax - t * dx, v - ay - t * dy))
        return best / half_width

    return field


def _stroke_dims(area: float, aspect: float) -> tuple[float, float]:
    """(length, width) of a capsule of `area` and length/width `aspect`, never under MIN_STROKE_WIDTH."""
    aspect = max(1.0, min(aspect, area / MIN_STROKE_WIDTH**2 - math.pi / 4))
    width = math.sqrt(area / (aspect + math.pi / 4))
    return aspect * width, width


def _line(area: float, rng: np.random.Generator) -> Outline:
    length, width = _stroke_dims(area, rng.uniform(8.0, 25.0))
    ends = np.array([[-length / 2, 0.0], [length / 2, 0.0]])
    return Outline(_stroke_field(ends, width / 2), (length + width) / 2)


def _brush(area: float, rng: np.random.Generator) -> Outline:
    length, width = _stroke_dims(area, rng.uniform(5.0, 12.0))
    steps = int(rng.integers(3, 8))
    headings = np.cumsum(rng.normal(0.0, 0.5, steps))  # a random walk of directions: a bending stroke
    moves = (length / steps) * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    vertices = np.vstack([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
    mids = (vertices[:-1] + vertices[1:]) / 2
    vertices = vertices - mids.mean(axis=0)  # equal-length segments: this is the stroke's centroid
    reach = float(np.max(np.hypot(vertices[:, 0], vertices[:, 1]))) + width
    return Outline(_stroke_field(vertices, width / 2), reach)


SHAPES: dict[str, ShapeKind] = {
    "rectangle": ShapeKind(_rectangle, ("small", "medium", "large")),
    "line": ShapeKind(_line, ("tiny", "small")),
    "polygon": ShapeKind(_polygon, ("small", "medium", "large")),
    "perlin": ShapeKind(_perlin, ("small", "medium", "large")),
    "brush": ShapeKind(_brush, ("tiny", "small", "medium")),
    "ellipse": ShapeKind(_ellipse_of((1.5, 3.0)), ("small", "medium", "large")),
    "circle": ShapeKind(_ellipse_of((1.0, 1.15)), ("tiny", "small", "medium", "large")),
    "hollow_ellipse": ShapeKind(_hollow_ellipse, ("small", "medium", "large")),
}
PRIOR_NAMES: tuple[str, ...] = (*SHAPES, FOREGROUND)


def _shape_kind(name: str) -> ShapeKind:
    if name not in SHAPES:
        raise InputError(f"unknown mask prior '{name}' (known: {', '.join(PRIOR_NAMES)})")
    return SHAPES[name]


# --- specs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorSpec:
    """One entry of a type's prior list: a shape, optionally its size class (None = any it
    supports) and whether it sits on the foreground's edge ("polygon:small@edge": a break, a chip,
    material missing at the rim) rather than anywhere on it."""

    shape: str
    size: str | None = None
    at_edge: bool = False

    def __post_init__(self) -> None:
        if self.shape == FOREGROUND:
            if self.size is not None or self.at_edge:
                raise InputError(f"mask prior '{self}': '{FOREGROUND}' takes no size class or placement")
            return
        supported = _shape_kind(self.shape).sizes
        if self.size is not None and self.size not in supported:
            raise InputError(
                f"mask prior '{self}': '{self.shape}' has no size class '{self.size}' "
                f"(supported: {', '.join(supported)})"
            )

    @classmethod
    def parse(cls, text: str) -> "PriorSpec":
        """"ellipse", "brush:tiny", "rectangle:small", "polygon:small@edge" -> spec; anything
        else -> InputError."""
        body, at, placement = str(text).strip().lower().partition("@")
        if at and placement != EDGE:
            raise InputError(f"mask prior '{text}': unknown placement '@{placement}' (known: @{EDGE})")
        shape, sep, size = body.partition(":")
        if sep and not size:
            raise InputError(f"mask prior '{text}': empty size class after ':'")
        return cls(shape, size or None, bool(at))

    def sizes(self) -> tuple[str, ...]:
        """The size classes this spec may draw (none for the foreground prior)."""
        if self.shape == FOREGROUND:
            return ()
        return (self.size,) if self.size else SHAPES[self.shape].sizes

    def __str__(self) -> str:
        name = f"{self.shape}:{self.size}" if self.size else self.shape
        return f"{name}@{EDGE}" if self.at_edge else name


def parse_priors(names: Sequence[str]) -> list[PriorSpec]:
    """Parse a type's prior list; the error names the bad entry."""
    if isinstance(names, str) or not names:
        raise InputError(f"mask priors must be a non-empty list of names, got {names!r}")
    return [PriorSpec.parse(name) for name in names]


# First matching keyword rule wins: thin defects, then round ones, then diffuse surface changes.
_DEFAULT_RULES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    # breaks and fray are areas (missing material, a rough patch), not lines, whatever the words suggest
    # Placed anywhere, not "@edge": edge priors for break/chip/missing and two of fray's three gave
    # nothing on the MTD development part over two seeds (README lever table); users may set them.
    (("break", "broken", "chip", "missing"), ("polygon:small", "polygon:medium", "perlin:small")),
    (("fray", "rough"), ("perlin:medium", "perlin:large", "polygon:medium")),
    (("crack", "scratch", "line", "cut", "tear"), ("line", "brush:tiny", "brush:small")),
    (("hole", "spot", "dot", "pit", "bubble", "pore"), ("circle:tiny", "circle:small", "ellipse:small")),
    # a large smooth region, not the whole foreground: an all-anomalous image teaches nothing about borders
    (("uneven",), ("rectangle:large", "rectangle:medium", "perlin:large")),
    (
        ("stain", "color", "colour", "contamination", "glue", "oil", "liquid"),
        ("perlin:medium", "perlin:large", "ellipse:medium", "ellipse:large"),
    ),
)
_BROAD_MIX = ("rectangle", "polygon", "ellipse", "perlin", "brush", "line", "hollow_ellipse")


def default_priors_for(anomaly_type: str) -> list[str]:
    """Prior names for a type that params.yaml does not configure, by keyword of the type's name."""
    name = anomaly_type.lower()
    for keywords, priors in _DEFAULT_RULES:
        if any(keyword in name for keyword in keywords):
            return list(priors)
    return list(_BROAD_MIX)


# --- drawing and placement ----------------------------------------------------------------------


def _lowest(field: np.ndarray, count: int) -> np.ndarray:
    """The `count` lowest-field pixels (stable order on ties, so the result is deterministic)."""
    keep = np.zeros(field.size, dtype=bool)
    keep[np.argsort(field, axis=None, kind="stable")[:count]] = True
    return keep.reshape(field.shape)


def draw_shape(
    spec_shape: str,
    shape_hw: tuple[int, int],
    center: tuple[float, float],
    area: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A (H, W) bool mask of one shape of `area` px centred at `center` (y, x), rotated about that centre.

    Parts falling outside the image are cut off; the unclipped shape has exactly round(area) px.
    """
    if area <= 0:
        raise ValueError(f"shape area must be positive, got {area}")
    outline = _shape_kind(spec_shape).make(float(area), rng)
    angle = rng.uniform(0.0, 2 * np.pi)
    count = max(1, round(area))
    cy, cx = center
    half = math.ceil(CANVAS_MARGIN * outline.reach) + 2
    ys = np.arange(math.floor(cy) - half, math.floor(cy) + half + 2)
    xs = np.arange(math.floor(cx) - half, math.floor(cx) + half + 2)
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    cos, sin = math.cos(angle), math.sin(angle)
    field = outline.field(cos * dx + sin * dy, cos * dy - sin * dx)
    local = _lowest(field, count)
    border = np.concatenate([local[0], local[-1], local[:, 0], local[:, -1]])
    if border.any():  # a generator under-reported its reach: the shape would be cut by the canvas
        raise RuntimeError(f"shape '{spec_shape}' of {count} px overflowed its canvas")

    h, w = shape_hw
    mask = np.zeros((h, w), dtype=bool)
    rows = (ys >= 0) & (ys < h)
    cols = (xs >= 0) & (xs < w)
    if rows.any() and cols.any():
        mask[ys[rows][0] : ys[rows][-1] + 1, xs[cols][0] : xs[cols][-1] + 1] = local[np.ix_(rows, cols)]
    return mask


def class_area(size: str, shape_hw: tuple[int, int], rng: np.random.Generator) -> float:
    """A shape area in px drawn uniformly in the size class's range of the image area."""
    lo, hi = SIZE_CLASSES[size]
    return rng.uniform(lo, hi) * shape_hw[0] * shape_hw[1]


def border_distance(fg: np.ndarray) -> np.ndarray:
    """(H, W) distance in px of each foreground pixel to the nearest pixel off the foreground or
    off the image (1 on the outermost ring); 0 off the foreground."""
    padded = np.pad(fg.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]


SIZE_ORDER = {name: i for i, name in enumerate(SIZE_CLASSES)}


@dataclass(frozen=True)
class PriorDraw:
    """A drawn prior mask; `fallback` says what replaced the first choice ("circle:large -> circle:small")."""

    mask: np.ndarray
    fallback: str | None = None


def fallback_order(specs: Sequence[PriorSpec], shape: str, size: str) -> list[tuple[str, str | None]]:
    """What to try when `shape:size` cannot be placed, most alike first: the type's other priors
    no larger than it (list order), then the shape's smaller size classes. (shape, None) = FOREGROUND."""
    order: list[tuple[str, str | None]] = []
    for spec in specs:
        options = [(FOREGROUND, None)] if spec.shape == FOREGROUND else [
            (spec.shape, s) for s in spec.sizes() if SIZE_ORDER[s] <= SIZE_ORDER[size]
        ]
        order += [o for o in options if o != (shape, size) and o not in order]
    smaller = sorted((s for s in SHAPES[shape].sizes if SIZE_ORDER[s] < SIZE_ORDER[size]), key=SIZE_ORDER.get, reverse=True)
    order += [(shape, s) for s in smaller if (shape, s) not in order]
    return order


@dataclass(frozen=True)
class PriorLibrary:
    """Draws prior masks on a foreground: a shape only counts if most of it lands on the foreground."""

    min_kept_fraction: float = 0.5  # of the shape's own area
    min_pixels: int = 4

    def sample(
        self,
        specs: Sequence[PriorSpec],
        foreground: np.ndarray,
        rng: np.random.Generator,
        max_tries: int = 30,
    ) -> np.ndarray:
        """(H, W) bool mask inside `foreground`: one spec drawn uniformly, then its size, then placed."""
        fg = self._check_foreground(foreground)
        shape, size, at_edge = self._choose(specs, rng)
        if shape == FOREGROUND:
            return fg.copy()
        return self.place(shape, size, fg, rng, max_tries, at_edge)

    def sample_with_fallback(
        self,
        specs: Sequence[PriorSpec],
        foreground: np.ndarray,
        rng: np.random.Generator,
        max_tries: int = 30,
    ) -> PriorDraw:
        """`sample` (same draws while the first choice fits), but a prior that cannot be placed falls
        back to `fallback_order` (placed anywhere), then to the first choice on the whole image,
        ignoring the foreground."""
        fg = self._check_foreground(foreground)
        shape, size, at_edge = self._choose(specs, rng)
        if shape == FOREGROUND:
            return PriorDraw(fg.copy())
        try:
            return PriorDraw(self.place(shape, size, fg, rng, max_tries, at_edge))
        except PlacementError:
            pass
        first = f"{shape}:{size}"
        for alt_shape, alt_size in fallback_order(specs, shape, size):
            if alt_shape == FOREGROUND:
                return PriorDraw(fg.copy(), f"{first} -> {FOREGROUND}")
            try:
                return PriorDraw(self.place(alt_shape, alt_size, fg, rng, max_tries), f"{first} -> {alt_shape}:{alt_size}")
            except PlacementError:
                continue
        whole = np.ones_like(fg)
        try:
            mask = self.place(shape, size, whole, rng, max_tries)
        except PlacementError:  # centred, the shape keeps what fits in the image
            h, w = fg.shape
            mask = draw_shape(shape, fg.shape, ((h - 1) / 2, (w - 1) / 2), class_area(size, fg.shape, rng), rng)
            if mask.sum() < self.min_pixels:
                raise
        return PriorDraw(mask, f"{first} -> {WHOLE_IMAGE}")

    def place(
        self, shape: str, size: str, fg: np.ndarray, rng: np.random.Generator, max_tries: int = 30,
        at_edge: bool = False,
    ) -> np.ndarray:
        """`shape` of a `size`-class area with most of it on `fg`, in at most `max_tries` draws;
        `at_edge`: centred within EDGE_BAND of its radius of the foreground's border (the image's
        border counts), so the border cuts it."""
        ys, xs = np.nonzero(fg)
        inside = border_distance(fg)[ys, xs] if at_edge else None
        for _ in range(max_tries):
            area = class_area(size, fg.shape, rng)
            if inside is not None:
                near = np.flatnonzero(inside <= max(1.0, EDGE_BAND * math.sqrt(area / math.pi)))
                pick = int(near[rng.integers(len(near))])
            else:
                pick = int(rng.integers(len(ys)))
            center = (ys[pick] + rng.uniform(-0.5, 0.5), xs[pick] + rng.uniform(-0.5, 0.5))
            kept = draw_shape(shape, fg.shape, center, area, rng) & fg
            if kept.sum() >= max(self.min_kept_fraction * area, self.min_pixels):
                return kept
        raise PlacementError(
            f"could not place mask prior '{shape}:{size}' in {max_tries} tries: the foreground "
            f"({int(fg.sum())} px of {fg.size}) is too small or too thin for it"
        )

    @staticmethod
    def _choose(specs: Sequence[PriorSpec], rng: np.random.Generator) -> tuple[str, str | None, bool]:
        """One spec drawn uniformly, then one of its size classes: (shape, size, at_edge);
        (FOREGROUND, None, False)."""
        if not specs:
            raise InputError("no mask priors to sample from")
        spec = specs[int(rng.integers(len(specs)))]
        if spec.shape == FOREGROUND:
            return FOREGROUND, None, False
        sizes = spec.sizes()
        return spec.shape, sizes[int(rng.integers(len(sizes)))], spec.at_edge

    @staticmethod
    def _check_foreground(foreground: np.ndarray) -> np.ndarray:
        fg = np.asarray(foreground)
        if fg.ndim != 2:
            raise InputError(f"foreground mask must be 2-D (H, W), got shape {fg.shape}")
        fg = fg.astype(bool)
        if not fg.any():
            raise InputError("foreground mask is empty: there is nowhere to place an anomaly")
        return fg

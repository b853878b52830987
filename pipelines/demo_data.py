"""A small procedural dataset in the MVTec AD layout, so the whole pipeline runs without real data.

Two categories, so the default `dvc repro` exercises a run over several categories:
``demo_surface``, brushed-metal surfaces (horizontal streaks, slow shading, lighting ramp), and
``demo_fabric``, a blue plain-weave fabric (threads going over and under, fibre grain, folds).
Both get the same four defect types
drawn with their masks: ``crack`` (branching thin dark line), ``hole`` (round pit, lit from the
upper left), ``scratch`` (thin curved groove with a bright edge), ``stain`` (brownish blob).
Deterministic: the same arguments give byte-identical files. Each image draws from its own
generator seeded by (seed, split, type, index), so changing one count never changes the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from core.errors import InputError
from core.images import encode_png
from synthesis.noise import fractal_noise
from synthesis.seeding import numpy_rng

DEMO_CATEGORY = "demo_surface"
FABRIC_CATEGORY = "demo_fabric"
DEMO_CATEGORIES = (DEMO_CATEGORY, FABRIC_CATEGORY)  # what `uniadc demo-data` writes
# Written last into the category folder: the files this generator wrote and their digests, so a
# rerun replaces only a folder holding nothing else.
MARKER_NAME = ".uniadc-demo.json"


def _surface(rng: np.random.Generator, size: int, tint: np.ndarray) -> np.ndarray:
    """A brushed-metal texture, float (H, W, 3) in about [0, 1]."""
    streaks = cv2.blur(rng.normal(size=(size, size)).astype(np.float32), (max(3, size // 4), 1))
    streaks /= np.abs(streaks).max() + 1e-6
    grain = fractal_noise((size, size), max(2, size // 16), rng, octaves=2) - 0.5
    shading = fractal_noise((size, size), 2, rng, octaves=2) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    grey = 0.55 + 0.07 * streaks + 0.04 * grain + 0.12 * shading + 0.10 * ramp
    return grey[..., None] * tint[None, None, :]


def _weave(rng: np.random.Generator, size: int, tint: np.ndarray) -> np.ndarray:
    """A plain-weave fabric texture, float (H, W, 3) in about [0, 1]: warp and weft threads
    alternate over/under in a checkerboard, each bright along its middle."""
    period = size / rng.uniform(18.0, 24.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = (xx + rng.uniform(0, period)) / period, (yy + rng.uniform(0, period)) / period
    warp_on_top = (np.floor(x) + np.floor(y)) % 2 == 0
    thread = np.where(warp_on_top, np.sin(np.pi * (x % 1.0)), np.sin(np.pi * (y % 1.0))) ** 0.6
    grain = fractal_noise((size, size), max(2, size // 32), rng, octaves=2) - 0.5
    folds = fractal_noise((size, size), 2, rng, octaves=1) - 0.5
    grey = 0.38 + 0.22 * thread + 0.05 * grain + 0.14 * folds
    return grey[..., None] * (tint * FABRIC_TINT)[None, None, :]


FABRIC_TINT = np.array([0.72, 0.86, 1.25], np.float32)  # denim blue


def _point(rng: np.random.Generator, size: int, margin: float = 0.15) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, size=2)


def _draw_lines(size: int, polylines: list[np.ndarray], thickness: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    pts = [np.round(p).astype(np.int32).reshape(-1, 1, 2) for p in polylines]
    cv2.polylines(canvas, pts, isClosed=False, color=255, thickness=thickness, lineType=cv2.LINE_8)
    return canvas > 0


def _darken(image: np.ndarray, mask: np.ndarray, amount: float, blur: int) -> np.ndarray:
    """Darken inside `mask`, with a soft edge of `blur` px so the defect is not a pasted stamp."""
    alpha = mask.astype(np.float32)
    if blur > 1:
        alpha = np.maximum(alpha, cv2.GaussianBlur(alpha, (0, 0), blur / 2))
    return image * (1 - amount * alpha[..., None])


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    start = _point(rng, size)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.6) * size
    end = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 2, size - 3)
    bend = (start + end) / 2 + rng.normal(0, 0.08 * size, size=2)
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # quadratic Bézier
    thickness = max(1, size // 128)
    mask = _draw_lines(size, [curve], thickness)
    glint = _draw_lines(size, [curve + np.array([0.0, -thickness - 1.0])], 1) & ~mask
    out = _darken(image, mask, 0.55, 1)
    out[glint] = np.minimum(out[glint] * 1.25, 1.0)
    return out, mask


def _hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _point(rng, size, 0.2)
    radius = rng.uniform(0.025, 0.055) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    dist = np.sqrt(dx**2 + dy**2)
    mask = dist <= 1.0
    # Light from the upper left: the pit's far (lower-right) wall catches it, the near wall is shaded.
    wall = np.clip(0.5 + 0.5 * (dx + dy) / np.sqrt(2), 0, 1)
    depth = 0.12 + 0.25 * dist**2 + 0.25 * wall * dist
    out = image.copy()
    out[mask] = depth[mask][:, None] * image[mask] / image[mask].mean(axis=1, keepdims=True).clip(1e-3)
    rim = (dist > 1.0) & (dist <= 1.35)
    out[rim] *= (1 - 0.2 * (1 - wall[rim]))[:, None]
    return out, mask


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _point(rng, size, 0.25)
    rx, ry = rng.uniform(0.06, 0.14, size=2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    falloff = 1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2
    blob = falloff + 0.6 * (fractal_noise((size, size), 6, rng, octaves=2) - 0.5)
    mask = blob > 0.15
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)[..., None] * rng.uniform(0.45, 0.7)
    colour = np.array([0.62, 0.45, 0.25], np.float32) * rng.uniform(0.7, 1.0)
    return image * (1 - alpha) + colour * alpha * image.mean(axis=2, keepdims=True) / 0.55, mask


def _crack_path(
    rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float, depth: int
) -> list[np.ndarray]:
    """A jittered walk that spawns shorter side branches (depth-limited)."""
    points, paths = [start], []
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
        if depth > 0 and rng.random() < 0.12:
            side = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
            paths += _crack_path(rng, points[-1], side, steps // 2, step, depth - 1)
    return [np.array(points), *paths]


def _crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    paths = _crack_path(rng, _point(rng, size, 0.3), rng.uniform(0, 2 * np.pi), 24, size / 64, 2)
    paths = [np.clip(p, 1, size - 2) for p in paths]
    mask = _draw_lines(size, paths, max(1, size // 160))
    return _darken(image, mask, 0.65, 2), mask


DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "crack": _crack,
    "hole": _hole,
    "scratch": _scratch,
    "stain": _stain,
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(arr))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_marker(built: Path, **settings) -> None:
    files = {p.relative_to(built).as_posix(): _digest(p) for p in sorted(built.rglob("*")) if p.is_file()}
    (built / MARKER_NAME).write_text(json.dumps({**settings, "files": files}, indent=1))


def check_target(target: Path) -> None:
    """Refuse to replace a folder holding any file this generator did not write (or that was edited)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError("exists and is not a folder; nothing was changed", target)
    try:
        own = json.loads((target / MARKER_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        own = {}
    for path in sorted(target.rglob("*")):
        name = path.relative_to(target).as_posix()
        if path.is_file() and name != MARKER_NAME and own.get(name) != _digest(path):
            raise InputError(
                f"holds files `uniadc demo-data` did not write (first: {name}); nothing was changed: "
                "move them away or choose another OUT folder",
                target,
            )


def _swap_in(built: Path, target: Path) -> None:
    """Replace `target` by the finished `built` folder; a crash leaves either the old or the new."""
    old = _scratch_dir(target.parent, f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(built, target)
    shutil.rmtree(old, ignore_errors=True)


def _scratch_dir(parent: Path, prefix: str) -> Path:
    """A fresh hidden sibling path (not mkdtemp: its 0700 mode would follow the rename)."""
    path = parent / f"{prefix}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    return path


def generate_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    size: int = 256,
    n_train: int = 12,
    n_test_good: int = 10,
    n_per_type: int = 8,
    category: str = DEMO_CATEGORY,
) -> Path:
    """Write ``<out_dir>/<category>/`` in the MVTec AD layout and return that folder.

    An existing ``<category>/`` folder is replaced only when it holds nothing but this generator's
    own files; files of anyone else's there (or edited ones) make it refuse, touching nothing.
    """
    if category not in SURFACES:
        raise InputError(f"unknown demo category {category!r} (known: {', '.join(SURFACES)})")
    texture = SURFACES[category]
    # the first category keeps the seeds it always had, so its files do not change
    key = ("demo",) if category == DEMO_CATEGORY else ("demo", category)
    out_dir = Path(out_dir)
    target = out_dir / category
    check_target(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    tint = np.array([0.97, 1.0, 1.04], np.float32) * numpy_rng(seed, *key, "tint").uniform(0.95, 1.05, 3)
    build = _scratch_dir(out_dir, f".{category}.tmp")
    build.mkdir()
    try:
        for split, folder, count in (("train", "train/good", n_train), ("test", "test/good", n_test_good)):
            for i in range(count):
                rng = numpy_rng(seed, *key, split, "good", i)
                _write(build / folder / f"{i:03d}.png", _to_uint8(texture(rng, size, tint)))
        for name, paint in DEFECTS.items():
            for i in range(n_per_type):
                rng = numpy_rng(seed, *key, "test", name, i)
                image, mask = paint(texture(rng, size, tint), rng)
                _write(build / "test" / name / f"{i:03d}.png", _to_uint8(image))
                _write(build / "ground_truth" / name / f"{i:03d}_mask.png", mask)
        _write_marker(build, seed=seed, size=size)
        _swap_in(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return target


SURFACES: dict[str, Callable[[np.random.Generator, int, np.ndarray], np.ndarray]] = {
    DEMO_CATEGORY: _surface,
    FABRIC_CATEGORY: _weave,
}


def generate_demo_categories(out_dir: str | Path, seed: int = 0, size: int = 256,
                             categories: tuple[str, ...] = DEMO_CATEGORIES, **counts) -> list[Path]:
    """Every demo category under `out_dir` (an MVTec AD root); returns the category folders."""
    return [generate_demo_dataset(out_dir, seed=seed, size=size, category=c, **counts) for c in categories]

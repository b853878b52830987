"""Figures for people: confusion matrix, overlay grid, and single-image overlays.

matplotlib with the Agg backend (no display needed, safe in DVC stages and on servers). Every file
is written atomically, like the rest of the project's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from core.atomic import atomic_path  # noqa: E402
from core.images import write_png  # noqa: E402

OVERLAY_ALPHA = 0.5


def type_colours(num_classes: int) -> np.ndarray:
    """(C+1, 3) uint8: black for normal, then distinct tab10/tab20 colours for the anomaly types."""
    cmap = plt.get_cmap("tab10" if num_classes <= 11 else "tab20")
    colours = [(0.0, 0.0, 0.0)] + [cmap(i % cmap.N)[:3] for i in range(num_classes - 1)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, type_map: np.ndarray, num_classes: int) -> np.ndarray:
    """The image with each predicted anomalous pixel tinted by its type's colour."""
    colours = type_colours(num_classes)[type_map]
    alpha = (type_map > 0)[..., None] * OVERLAY_ALPHA
    return (image * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def save_overlay(image: np.ndarray, type_map: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """One image's overlay PNG (predict): the image with its predicted type colours."""
    write_png(path, overlay(image, type_map, len(class_names)))
    return Path(path)


def save_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    n = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.7 * n))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted type")
    ax.set_ylabel("true type")
    ax.set_title(title)
    return save_figure(fig, path)


@dataclass
class OverlayRow:
    """One test image in the grid; type maps use 0 normal, 1..C the anomaly types."""

    image: np.ndarray  # (H, W, 3) uint8
    true_types: np.ndarray  # (H, W) int
    anomaly_map: np.ndarray  # (H, W) float in [0, 1]
    predicted_types: np.ndarray  # (H, W) int
    caption: str


def save_overlay_grid(rows: list[OverlayRow], class_names: list[str], path: str | Path) -> Path:
    """Columns: image, ground truth types, predicted anomaly map, predicted types."""
    n = len(class_names)
    titles = ("image", "ground truth", "anomaly map", "predicted types")
    fig, axes = plt.subplots(max(len(rows), 1), 4, figsize=(8, 2 * max(len(rows), 1)), squeeze=False)
    for axis_row, row in zip(axes, rows):
        panels = (row.image, overlay(row.image, row.true_types, n), row.anomaly_map,
                  overlay(row.image, row.predicted_types, n))
        for ax, panel in zip(axis_row, panels):
            ax.imshow(panel, cmap="inferno" if panel.ndim == 2 else None, vmin=0, vmax=1 if panel.ndim == 2 else None)
        # horizontal, left of the row: a rotated multi-line caption ran into the rows above and below
        axis_row[0].set_ylabel(row.caption, fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    colours = type_colours(n) / 255
    fig.legend(handles=[Patch(color=colours[i], label=name) for i, name in enumerate(class_names) if i],
               loc="lower center", ncol=min(n - 1, 6), fontsize=7)
    return save_figure(fig, path)

"""A PatchCore-style memory of the real normal shots, as a detection signal next to the learned one.

The learned discriminator only ever sees a few normal backgrounds (the shots the synthetic defects
were painted on), so on a new normal image it can fire on anything unfamiliar. The kNN distance of
each pixel's frozen backbone feature to the normal shots' features is the complementary signal:
it knows nothing of defect types but a lot about what "normal" looked like.

The memory is built once at train time from the normal shots (their flips at three exposures, the augmentations
training used) and saved in model.safetensors as a buffer, so a checkpoint stays self-contained.
It is kept per shot, (S, N, D), for one reason: the synthetic training and calibration images are
painted on those very shots, so their background would match itself at distance ~0, unlike any
test image. In `leave_one_out` mode (training and calibration) each image ignores the shot that
matches it best, which is the one it was painted on, and sees distances like a new image's.

Two normal shots cannot show every normal variation a new image has. The image itself can: on a
surface, a normal patch has look-alikes elsewhere in the same image, a defect patch does not. So the
memory can add each cell's distance to the rest of its own image (`self_distances`, outside a window
around it) to the distance to the shots, each standardised on the shots. Both must be small for a
cell to look normal.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discriminator.exposure import GAIN_RANGE

FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both: training's flips
# Which backbone strides the memory (and the type prototypes) read: mid-level texture (8, 16) plus
# the stride-32 level's context. kNN image / pixel AUROC on the MTD development part
# (EfficientNet-Lite0, `benchmarks/bench_memory_levels.py`): 79.5 / 74.5 with (8, 16, 32) vs
# 76.0 / 72.4 with (8, 16), at the default fraction. A checkpoint records its own strides.
MEMORY_STRIDES = (8, 16, 32)
# entries per shot as a fraction of one view's cells: a quarter costs 0.6 image-AUROC points there
# (79.5 vs 80.1 with one view's worth; half: 79.8) for a quarter of the kNN search
MEMORY_FRACTION = 0.25
LEGACY_MEMORY_STRIDES = (8, 16)  # checkpoints saved before the strides were recorded; the kNN baseline's
# The memory also holds each shot's flips at the ends of training's photometric gain range
# (`discriminator.exposure`, the exposures training assumes a test set spans): a new image
# brighter or darker than the shots then finds its texture in the memory. On the MTD development
# part (kNN alone with self-similarity, `benchmarks/bench_memory_levels.py --views flips exposures`)
# image / pixel AUROC 79.5 / 77.6 with the flips alone, 80.7 / 77.8 with these; the kNN search does not grow
# (the coreset keeps `memory_fraction` of one view per shot, whatever the number of views).
MEMORY_GAINS = (1.0, *GAIN_RANGE)
# Self-similarity: a cell is compared with every SELF_STEP-th row and column of its own image's cells,
# except those within SELF_RADIUS cells (its own neighbourhood, which the 3x3 pooling and the upsampled
# coarse levels smear over); its distance is the SELF_K-th nearest, so that a few repeats of a defect
# do not vouch for each other. On the MTD development part (kNN alone, strides 8/16/32, quarter
# memory, `benchmarks/bench_memory_levels.py`) pixel AUROC 74.5 rose to 77.4 with the mean of both
# distances; radius 3-6, k 2-10 and step 1-4 all gave 76.9-77.6 (one-off sweep). Step 4 (64
# references at 256 px) gave 77.6 and costs 1.4 ms per image on 2 cores, step 2 3.6 ms.
SELF_RADIUS, SELF_K, SELF_STEP = 4, 5, 4
MEMORY_PARTS = ("shots", "self", "defects")  # the distances; an ablation may read one alone
# Few-shot: the cells of the real anomaly shots' defect regions form a second, small bank. A pixel
# nearer to a real defect than to any normal cell gains DEFECT_WEIGHT times the difference (both
# standardised on the normal shots) in the pixel map; image scores are untouched. On the MTD
# development part (few-shot, kNN alone with self-similarity, exposure matched; one-off script)
# pixel AUROC / PRO 76.8 / 74.4 -> 77.6 / 75.3, 77.9 / 75.6, 77.9 / 75.0 for weights 0.25 / 0.5 / 1,
# while the same term in the image score lowered image AUROC (80.2 -> 79.6 at 0.5).
DEFECT_WEIGHT = 0.5
# The same term reaches the image map only above its maximum over the normal shots' views
# (`NormalMemory.set_defect_ceiling`), like the learned evidence (`discriminator.model.
# IMAGE_EVIDENCE_WEIGHT`): those views then score exactly as before, so the image threshold's floor
# does not move. The few-shot development checkpoints of the MTD development part, seeds 0 / 1,
# re-scored (one-off script): image AUROC 80.3 / 80.5 -> 80.7 / 80.8 at weight 1 (0.5: 80.6 / 80.7,
# 2: 80.8 / 80.8); anomalies caught with 5 % of the normal images flagged 44.5 -> 48.4 %; with the
# calibrated threshold (two-seed mean) accuracy +0.45 and balanced accuracy +1.5, the maps untouched.
DEFECT_IMAGE_WEIGHT = 1.0
# a stride-8 cell joins the defect bank when at least this share of it lies in the defect mask
DEFECT_CELL_SHARE = 0.5
# Image scores read the distance to the shots alone. The shots' own cells are all the memory knows of
# normal self-distances, and new normal images hold more unique content (edges, marks) than two
# shots do: with self-similarity in the image score, the threshold floor (the highest score of a
# normal shot's view) flagged 64 % of the MTD development part's normal images instead of 30 %
# (zero-shot end to end: image AUROC 81.8 vs 79.5, accuracy 37.4 vs 59.2). In the pixel map the same
# self-distances rank pixels within images, where that offset matters less.
IMAGE_PART = "shots"


def memory_levels(strides: list[int], wanted: tuple[int, ...] | list[int] = MEMORY_STRIDES) -> list[int]:
    """The backbone levels the memory uses: those at the `wanted` strides, else all (e.g. a ViT's,
    whose levels all share one stride)."""
    chosen = [i for i, s in enumerate(strides) if s in wanted]
    return chosen or list(range(len(strides)))


def patch_features(features: list[Tensor], levels: list[int]) -> Tensor:
    """(B, D, h, w): chosen levels 3x3 average-pooled (local context), upsampled to the finest, concatenated."""
    # zero padding counted in the average (PyTorch's default) damps border features, so image borders
    # match only image borders; excluding it made borders the loudest "anomaly" of normal images
    # (kNN image AUROC on the MTD test set 76 vs 60)
    chosen = [F.avg_pool2d(features[i].float(), 3, stride=1, padding=1, count_include_pad=True) for i in levels]
    size = chosen[0].shape[-2:]
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in chosen], dim=1)


def nearest_distances(queries: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """queries (B, D, h, w), bank (S, N, D) -> (B, S, h, w): per shot, L2 distance to the nearest entry.

    |q - b|² = |q|² - 2 q·b + |b|²: one matmul per shot, [q, 1]·[-2b, |b|²], minimised over the
    entries before the square root, which is then taken once per query. `torch.cdist` runs the same
    matmul but takes the root of every pair (most of its time on CPU) and does not export to ONNX.
    Queries go in chunks only to bound the (queries × entries) matrix; an exported graph takes them whole.
    """
    b, d, h, w = queries.shape
    flat = queries.flatten(2).transpose(1, 2).reshape(-1, d)  # (B·h·w, D)
    augmented = torch.cat([flat, torch.ones_like(flat[:, :1])], dim=1)
    parts = [augmented] if torch.onnx.is_in_onnx_export() or flat.shape[0] <= chunk else augmented.split(chunk)
    nearest = []
    for shot in bank:
        entries = torch.cat([-2 * shot, shot.pow(2).sum(dim=1, keepdim=True)], dim=1).T  # (D + 1, N)
        nearest.append(torch.cat([(part @ entries).amin(dim=1) for part in parts]))
    squared = torch.stack(nearest, dim=1) + flat.pow(2).sum(dim=1, keepdim=True)  # (B·h·w, S)
    return squared.clamp_min(0).sqrt().view(b, h, w, -1).permute(0, 3, 1, 2)


@lru_cache(maxsize=8)
def self_reference_mask(h: int, w: int, radius: int = SELF_RADIUS, k: int = SELF_K,
                        step: int = SELF_STEP) -> tuple[np.ndarray, int]:
    """(h·w, m) True where reference cell j (every `step`-th row and column) lies within `radius`
    cells of query cell i, plus the k to use. On a grid too small to leave k references outside
    every window, the radius shrinks; below radius 0 there is no window and k is capped at m.
    NumPy, from the grid's shape alone: an exported graph holds it as a constant."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ref_y, ref_x = ys[::step, ::step].ravel(), xs[::step, ::step].ravel()
    ys, xs = ys.ravel(), xs.ravel()
    for r in range(radius, -1, -1):
        near = (np.abs(ys[:, None] - ref_y[None]) <= r) & (np.abs(xs[:, None] - ref_x[None]) <= r)
        if (~near).sum(axis=1).min() >= k:
            return near, k
    return np.zeros_like(near), min(k, len(ref_y))


def tracing() -> bool:
    """True while torch.export / the ONNX exporter / torch.compile traces the model (the torch.compiler
    checks are looked up: torch releases before 2.5 that pyproject.toml allows lack `is_exporting`)."""
    compiler_checks = (getattr(torch.compiler, name, None) for name in ("is_exporting", "is_compiling"))
    return torch.onnx.is_in_onnx_export() or any(check() for check in compiler_checks if check is not None)


@lru_cache(maxsize=8)
def _reference_mask_on(h: int, w: int, radius: int, k: int, step: int, device: torch.device) -> tuple[Tensor, int]:
    """`self_reference_mask` as a tensor on `device`, made once per device, not copied per batch."""
    near, k = self_reference_mask(h, w, radius, k, step)
    return torch.from_numpy(near).to(device), k


def self_distances(queries: Tensor, radius: int = SELF_RADIUS, k: int = SELF_K, step: int = SELF_STEP) -> Tensor:
    """(B, D, h, w) -> (B, 1, h, w): each cell's k-th nearest L2 distance among its own image's
    cells (every `step`-th row and column) outside a window of `radius` cells around it."""
    b, d, h, w = queries.shape
    flat = queries.flatten(2).transpose(1, 2)  # (B, h·w, D)
    refs = queries[:, :, ::step, ::step].flatten(2).transpose(1, 2)  # (B, m, D)
    if tracing():  # a tensor made while tracing is the tracer's (fake) tensor: never cache it
        near, k = self_reference_mask(h, w, radius, k, step)
        near = torch.from_numpy(near).to(queries.device)
    else:
        near, k = _reference_mask_on(h, w, radius, k, step, queries.device)
    squared = (flat.pow(2).sum(dim=2, keepdim=True) - 2 * flat @ refs.transpose(1, 2)
               + refs.pow(2).sum(dim=2)[:, None, :])
    squared = squared.masked_fill(near, float("inf"))
    kth = squared.topk(k, dim=2, largest=False).values[:, :, -1]
    return kth.clamp_min(0).sqrt().view(b, 1, h, w)


def standardise(values: Tensor) -> Tensor:
    """[mean, std] of a sample of distances, the std kept away from zero."""
    return torch.stack([values.mean(), values.std().clamp_min(1e-6)])


def k_center_coreset(entries: Tensor, size: int) -> Tensor:
    """`size` of the (N, D) entries, picked greedily so that every entry lies near a picked one
    (PatchCore's coreset): a query's nearest distance rises by at most the largest remaining gap.
    Deterministic: starts from the entry nearest the mean."""
    if size >= len(entries):
        return entries
    entries = entries.float()
    first = int((entries - entries.mean(dim=0)).pow(2).sum(dim=1).argmin())
    picked = [first]
    gap = (entries - entries[first]).pow(2).sum(dim=1)
    for _ in range(size - 1):
        picked.append(int(gap.argmax()))
        gap = torch.minimum(gap, (entries - entries[picked[-1]]).pow(2).sum(dim=1))
    return entries[picked]


class NormalMemory(nn.Module):
    """Per-shot feature bank plus the scale of a new normal image's distances (to standardise them)."""

    def __init__(self, shots: int, entries: int, dim: int, levels: list[int], self_similarity: bool = False,
                 defect_entries: int = 0, defect_image_weight: float = 0.0):
        super().__init__()
        self.levels = list(levels)
        self.register_buffer("bank", torch.zeros(shots, entries, dim))
        # mean and std of the leave-one-out distances of the shots themselves: what normal looks like
        self.register_buffer("stats", torch.tensor([0.0, 1.0]))
        self.self_similarity = self_similarity
        if self_similarity:  # mean and std of the shots' distances to the rest of themselves
            self.register_buffer("self_stats", torch.tensor([0.0, 1.0]))
        if defect_entries:  # cells of the real anomaly shots' defects; set by fill_defects
            self.register_buffer("defect_bank", torch.zeros(defect_entries, dim))
        # weight of the defect term above its maximum on the normal shots' views in the image map
        self.defect_image_weight = float(defect_image_weight) if defect_entries else 0.0
        if self.defect_image_weight:  # that maximum; set by set_defect_ceiling
            self.register_buffer("defect_ceiling", torch.tensor(0.0))
        # not saved; see `forward`
        self.parts = tuple(p for p in MEMORY_PARTS if p == "shots" or (p == "self" and self_similarity)
                           or (p == "defects" and defect_entries))
        self.leave_one_out = False  # set by training; a loaded checkpoint uses every shot

    @property
    def shots(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def fill(self, per_image_features: list[Tensor], fraction: float = 1.0) -> None:
        """Store each shot's features (one (F, D, h, w) tensor per shot, F views) and the distance stats.

        Per shot, the bank keeps `fraction` of one view's cells (h·w), chosen from all F views by
        `k_center_coreset`: the views widen what the memory covers without multiplying the search,
        which is the largest single cost of prediction on CPU. Raw kNN maps on every third MTD
        test image, strides 8/16: image / pixel AUROC 76.4 / 71.9 with one view's worth, 76.6 /
        72.0 with all 4 views, 75.0 / 70.9 with the unflipped view alone (strides 8/16; for strides
        8/16/32 and other fractions see `MEMORY_FRACTION`).
        """
        bank = torch.stack([
            k_center_coreset(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]),
                             max(1, round(fraction * f.shape[2] * f.shape[3])))
            for f in per_image_features
        ])
        self.bank = bank.to(self.bank.device, self.bank.dtype)
        if self.shots > 1:
            loo = torch.cat([self.distances(f[:1], leave_one_out=True).flatten() for f in per_image_features])
            self.stats = standardise(loo).to(self.stats)
        if self.self_similarity:
            own = torch.cat([self_distances(f[:1].float()).flatten() for f in per_image_features])
            self.self_stats = standardise(own).to(self.self_stats)

    @property
    def defect_entries(self) -> int:
        bank = getattr(self, "defect_bank", None)
        return 0 if bank is None else bank.shape[0]

    @torch.no_grad()
    def fill_defects(self, features: list[Tensor], masks: list[Tensor], fraction: float = 1.0) -> None:
        """Store the defect cells of the real anomaly shots: one (F, D, h, w) tensor of views per
        shot and its (F, H, W) defect masks. A cell counts when DEFECT_CELL_SHARE of it is defect
        (else a shot gives its most-defect cell; a shot with an empty mask gives none); a k-centre
        coreset keeps `fraction` of one view's cells in all, as the normal bank does per shot.
        Registers the buffer when there was none."""
        cells = []
        for f, mask in zip(features, masks):
            share = F.adaptive_avg_pool2d(mask.float()[:, None].to(f.device), f.shape[-2:])[:, 0]  # (F, h, w)
            if share.max() <= 0:
                continue
            keep = share >= DEFECT_CELL_SHARE
            if not keep.any():
                keep = share >= share.max()
            cells.append(f.permute(0, 2, 3, 1)[keep])
        if not cells:
            return
        f = features[0]
        bank = k_center_coreset(torch.cat(cells).float(), max(1, round(fraction * f.shape[2] * f.shape[3])))
        self.register_buffer("defect_bank", bank.to(self.bank.device, self.bank.dtype))  # replaces an earlier one
        if "defects" not in self.parts:
            self.parts = (*self.parts, "defects")

    def distances(self, queries: Tensor, leave_one_out: bool | None = None) -> Tensor:
        """(B, D, h, w) features -> (B, 1, h, w) nearest-normal distance."""
        per_shot = nearest_distances(queries.float(), self.bank)
        leave_one_out = self.leave_one_out if leave_one_out is None else leave_one_out
        if not leave_one_out or self.shots < 2:
            return per_shot.min(dim=1, keepdim=True).values
        # drop the shot this image matches best overall: the one it was painted on, if any
        own = per_shot.mean(dim=(2, 3)).argmin(dim=1)
        keep = torch.ones_like(per_shot[:, :, 0, 0], dtype=torch.bool)
        keep[torch.arange(len(own)), own] = False
        masked = per_shot.masked_fill(~keep[:, :, None, None], float("inf"))
        return masked.min(dim=1, keepdim=True).values

    def forward(self, features: list[Tensor]) -> Tensor:
        """Backbone levels -> (B, 1 or 2, h, w) standardised distance: ~0 on normal pixels, large on
        anomalies. Channel 0 is the pixel map: the mean of the distances in use (`parts`: to the
        shots, to the image's own cells), plus the defect term when there is a defect bank (never
        leave-one-out: the synthetic rows training and calibration score were cut from those very
        defects). With more than one part a channel 1 follows, the image map: the distance to the
        shots alone, which image scores read (see `IMAGE_PART`), plus the defect term above its
        ceiling once `set_defect_ceiling` has set one (see `DEFECT_IMAGE_WEIGHT`)."""
        queries = patch_features(features, self.levels)
        scores = {}
        if "shots" in self.parts:
            scores["shots"] = self.shot_scores(queries)
        if "self" in self.parts:
            self_mean, self_std = self.self_stats
            scores["self"] = (self_distances(queries.float()) - self_mean) / self_std
        pixel, image = sum(scores.values()) / len(scores), scores.get(IMAGE_PART)
        if "defects" in self.parts and "shots" in scores and not self.leave_one_out:
            defect = self.defect_term(queries, scores["shots"])
            pixel = pixel + DEFECT_WEIGHT * defect
            if self.defect_image_weight:
                image = image + self.defect_image_weight * (defect - self.defect_ceiling).clamp_min(0)
        return torch.cat([pixel, image], dim=1) if len(self.parts) > 1 else pixel

    def shot_scores(self, queries: Tensor, leave_one_out: bool | None = None) -> Tensor:
        """(B, 1, h, w) nearest-normal distance standardised on the shots' leave-one-out distances."""
        mean, std = self.stats
        return (self.distances(queries, leave_one_out) - mean) / std

    def defect_term(self, queries: Tensor, to_shots: Tensor) -> Tensor:
        """How much nearer each cell is to a real defect cell than to the normal shots (`to_shots`,
        standardised), both in the normal shots' units; 0 where normal is nearer."""
        mean, std = self.stats
        to_defect = (nearest_distances(queries.float(), self.defect_bank[None]) - mean) / std
        return (to_shots - to_defect).clamp_min(0)

    @torch.no_grad()
    def set_defect_ceiling(self, per_shot_views: list[Tensor], weight: float = DEFECT_IMAGE_WEIGHT) -> None:
        """Let the defect term into the image map at `weight`, above its maximum over the normal
        shots' views (one (F, D, h, w) tensor per shot), each scored leave-one-out as a new normal
        image is: no view then scores higher in the image map than without the term, since scored
        with every shot each is nearer to normal still. Registers the buffer (saved in the
        checkpoint), replacing an earlier one; a no-op without a defect bank."""
        if not self.defect_entries or weight <= 0:
            return
        ceiling = max(float(self.defect_term(f, self.shot_scores(f, leave_one_out=True)).max()) for f in per_shot_views)
        self.register_buffer("defect_ceiling", torch.tensor(ceiling, device=self.bank.device))
        self.defect_image_weight = float(weight)


def flipped_views(image: Tensor) -> Tensor:
    """(3, H, W) -> (len(FLIPS), 3, H, W): the shot and its flips, as training augments it."""
    return torch.stack([image.flip(dims) if dims else image for dims in FLIPS])


def memory_views(image: Tensor) -> Tensor:
    """(3, H, W) -> (len(FLIPS) · len(MEMORY_GAINS), 3, H, W): the views the memory stores for one
    shot, the flips first (view 0 is the shot itself), then the flips at each other exposure."""
    flips = flipped_views(image)
    return torch.cat([flips if gain == 1.0 else (flips * gain).clamp(0.0, 1.0) for gain in MEMORY_GAINS])

"""Training data: the frozen synthetic dataset plus the manifest's real shots, mixed per batch.

Every training image becomes a pair (RGB image, per-pixel type map) where 0 is normal and
1..C are the anomaly types in the manifest's order, whatever pool it came from:
- synthetic rows: the mask marks pixels of the row's `label` (+1, the frozen dataset excludes normal);
- real normal shots: an all-normal map;
- real anomaly shots: the mask marks pixels of the shot's manifest label.

Batches mix the three pools in fixed shares (real normals and real anomaly shots oversampled, as in
the paper), drawn by a sampler seeded from (seed, step) only, so a run is reproducible whatever
the number of data-loader workers. A slice of the synthetic rows, chosen by hash of the task id
(stable whatever the shard layout), never enters training: it calibrates the thresholds.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import cv2
import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from discriminator.config import TrainConfig
from discriminator.exposure import GAIN_RANGE, GAMMA_RANGE, OFFSET_RANGE
from core.errors import InputError
from core.images import decode_png, read_sample, resize_image, resize_mask
from core.manifest import NORMAL, Manifest, Sample
from core.shards import MODES, SHARD_PATTERN, ZERO_SHOT, shard_name

SHARD_GLOB = "data/train-*.parquet"
SHOTS_GLOB = "shots/train-*.parquet"  # the dataset's `shots` config: the real shots it was made from
MAX_SHIFT_FRACTION = 1 / 16  # small shifts keep thin defects inside the frame


# --------------------------------------------------------------------------- the frozen dataset


@dataclass
class SyntheticRows:
    """The frozen dataset's rows, kept as PNG bytes and decoded on access (cheap to hold)."""

    root: Path
    class_names: list[str]  # anomaly types, normal excluded
    images: list[bytes]
    masks: list[bytes]
    labels: list[int]  # 0..C-1 into class_names
    task_ids: list[str]
    category: str = ""
    # how each row's defect was made (`core.shards.MODES`); None for a dataset written before the column
    modes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _cell_bytes(cell) -> bytes:
    if not cell or cell.get("bytes") is None:
        raise ValueError("image cell has no embedded bytes")
    return cell["bytes"]


def check_shards_complete(root: Path, shards: Sequence[Path]) -> None:
    """Refuse a dataset whose rendering did not finish (a crash or an error mid-render leaves some
    shards): training on it would silently use part of the data."""
    found: dict[int, set[int]] = {}
    for path in shards:
        match = SHARD_PATTERN.match(path.name)
        if match is None:
            raise InputError("not a shard name of the frozen dataset (train-XXXXX-of-YYYYY.parquet)", path)
        found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if len(found) > 1:
        raise InputError(f"shards of different renders are mixed (of {', '.join(map(str, sorted(found)))})", root / "data")
    total, present = found.popitem()
    missing = [shard_name(i, total) for i in range(total) if i not in present]
    if missing:
        raise InputError(
            f"rendering did not finish: {len(missing)} of {total} shards missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); rerun the same `uniadc synthesize` to finish it",
            root,
        )


def load_synthetic_rows(dataset_dir: str | Path, manifest: Manifest | None = None) -> SyntheticRows:
    """Read the frozen dataset and, when a manifest is given, check it against the manifest.

    Read straight from the Parquet shards (no `datasets` cache on disk); the `datasets` features in
    the schema metadata give the class names.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError("frozen dataset folder not found; run `uniadc synthesize` first", root)
    shards = sorted(root.glob(SHARD_GLOB))
    if not shards:
        raise InputError("no Parquet shards under data/; run `uniadc synthesize` first", root)
    check_shards_complete(root, shards)
    try:
        table = pa.concat_tables(pq.read_table(p) for p in shards)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read the Parquet shards ({exc})", root) from None
    label = datasets.Features.from_arrow_schema(table.schema).get("label")
    if not isinstance(label, datasets.ClassLabel):
        raise InputError("column `label` is not a ClassLabel; not a frozen dataset", root)
    if manifest is not None and list(label.names) != list(manifest.anomaly_types):
        raise InputError(
            f"dataset anomaly types {list(label.names)} differ from the manifest's "
            f"{list(manifest.anomaly_types)}",
            root,
        )
    if table.num_rows == 0:
        raise InputError("the frozen dataset has no rows", root)
    has_modes = "mode" in table.column_names  # datasets written before the column lack it
    columns = table.select(["image", "mask", "label", "category", "task_id", *(["mode"] * has_modes)]).to_pydict()
    unknown = sorted(set(columns.get("mode", [])) - set(MODES))
    if unknown:
        raise InputError(f"column `mode` holds {unknown}; expected one of {list(MODES)}", root)
    categories = sorted(set(columns["category"]))
    if manifest is None and len(categories) != 1:
        raise InputError(f"the frozen dataset mixes categories {categories}; train one per category", root)
    if manifest is not None and categories != [manifest.category]:
        raise InputError(
            f"dataset category {categories} differs from the manifest's {manifest.category!r}", root
        )
    try:
        images = [_cell_bytes(c) for c in columns["image"]]
        masks = [_cell_bytes(c) for c in columns["mask"]]
    except ValueError as exc:
        raise InputError(str(exc), root) from None
    return SyntheticRows(root, list(label.names), images, masks, columns["label"], columns["task_id"],
                         categories[0], columns.get("mode"))


def split_holdout(task_ids: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train, holdout) row indices: the round(fraction·N) rows with the smallest task-id hash.

    Hash-based so the split is the same whatever the shard order; at least one row is held out
    when fraction > 0 and at least one stays for training.
    """
    n = len(task_ids)
    k = min(max(round(fraction * n), 1 if fraction > 0 else 0), n - 1) if n > 1 else 0
    order = sorted(range(n), key=lambda i: (zlib.crc32(task_ids[i].encode()), task_ids[i]))
    holdout = sorted(order[:k])
    held = set(holdout)
    return [i for i in range(n) if i not in held], holdout


# --------------------------------------------------------------------------- image pools


@dataclass
class LabelledImage:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    type_map: np.ndarray  # (H, W) int64: 0 normal, 1..C anomaly types


class ImagePool(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> LabelledImage: ...


class SyntheticPool:
    """A subset of the synthetic rows at the working resolution."""

    def __init__(self, rows: SyntheticRows, indices: Sequence[int], size: int):
        self.rows, self.indices, self.size = rows, list(indices), size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> LabelledImage:
        row = self.indices[index]
        image = resize_image(decode_png(self.rows.images[row]), self.size)
        mask = decode_png(self.rows.masks[row])
        mask = resize_mask(mask.max(axis=-1) > 127 if mask.ndim == 3 else mask > 127, self.size)
        return LabelledImage(image, mask.astype(np.int64) * (self.rows.labels[row] + 1))


def recipe_rows(pool: SyntheticPool) -> SyntheticPool:
    """The rows of `pool` whose defect a recipe (or a prompt) made, not cut from a real anomaly shot;
    all of them for a dataset that does not record how (`SyntheticRows.modes` is None)."""
    modes = pool.rows.modes
    return SyntheticPool(pool.rows, [i for i in pool.indices if modes is None or modes[i] == ZERO_SHOT], pool.size)


class ShotPool:
    """Real shots from the manifest; few, so decoded once and kept."""

    def __init__(self, samples: Sequence[Sample], size: int):
        self.items = []
        for sample in samples:
            image, mask = read_sample(sample, size)
            self.items.append(LabelledImage(image, mask.astype(np.int64) * sample.label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LabelledImage:
        return self.items[index]

    @classmethod
    def from_items(cls, items: Sequence[LabelledImage]) -> "ShotPool":
        pool = cls.__new__(cls)
        pool.items = list(items)
        return pool


def has_stored_shots(dataset_dir: str | Path) -> bool:
    return any(Path(dataset_dir).glob(SHOTS_GLOB))


def load_stored_shots(dataset_dir: str | Path, rows: SyntheticRows, size: int) -> tuple[ShotPool, ShotPool]:
    """(normal, anomaly) shots from the dataset's `shots` config, at the working size.

    They are stored at full resolution (RGB PNG, masks L 0/255), so decoding and resizing here
    gives the same pixels as reading the manifest's files would.
    """
    root = Path(dataset_dir)
    paths = sorted(root.glob(SHOTS_GLOB))
    try:
        table = pa.concat_tables(pq.read_table(p) for p in paths)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read the shots config ({exc})", root / "shots") from None
    label = datasets.Features.from_arrow_schema(table.schema).get("label")
    expected = [NORMAL, *rows.class_names]
    if not isinstance(label, datasets.ClassLabel) or list(label.names) != expected:
        names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
        raise InputError(f"shots label names {names} differ from {expected} (normal + the dataset's types)",
                         root / "shots")
    columns = table.select(["image", "mask", "label", "category"]).to_pydict()
    if set(columns["category"]) - {rows.category}:
        raise InputError(f"shots of category {sorted(set(columns['category']))}, rows of {rows.category!r}",
                         root / "shots")
    normal, anomaly = [], []
    for image_cell, mask_cell, value in zip(columns["image"], columns["mask"], columns["label"]):
        try:
            image = resize_image(decode_png(_cell_bytes(image_cell)), size)
            mask = decode_png(_cell_bytes(mask_cell))
        except ValueError as exc:
            raise InputError(f"shots config: {exc}", root / "shots") from None
        mask = resize_mask(mask.max(axis=-1) > 127 if mask.ndim == 3 else mask > 127, size)
        (normal if value == 0 else anomaly).append(LabelledImage(image, mask.astype(np.int64) * int(value)))
    if not normal:
        raise InputError("the shots config holds no normal shot", root / "shots")
    return ShotPool.from_items(normal), ShotPool.from_items(anomaly)


# --------------------------------------------------------------------------- augmentation


def augment(item: LabelledImage, rng: np.random.Generator) -> LabelledImage:
    """Flips, transpose and a small shift, the same for image and type map (defects keep their place)."""
    image, type_map = item.image, item.type_map
    if rng.random() < 0.5:
        image, type_map = image[:, ::-1], type_map[:, ::-1]
    if rng.random() < 0.5:
        image, type_map = image[::-1], type_map[::-1]
    if rng.random() < 0.5 and image.shape[0] == image.shape[1]:
        image, type_map = image.transpose(1, 0, 2), type_map.T
    h, w = type_map.shape
    limit = max(1, int(min(h, w) * MAX_SHIFT_FRACTION))
    dx, dy = (int(v) for v in rng.integers(-limit, limit + 1, size=2))
    if dx or dy:
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        image = cv2.warpAffine(np.ascontiguousarray(image), shift, (w, h), flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_REFLECT_101)
        type_map = cv2.warpAffine(np.ascontiguousarray(type_map).astype(np.int32), shift, (w, h),
                                  flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101).astype(np.int64)
    return LabelledImage(np.ascontiguousarray(image), np.ascontiguousarray(type_map))


def photometric(item: LabelledImage, rng: np.random.Generator) -> LabelledImage:
    """A random global gamma, gain and offset: the few normal shots (and everything painted on
    them) then span the exposures a real test set has; the type map is unchanged."""
    gamma, gain, offset = rng.uniform(*GAMMA_RANGE), rng.uniform(*GAIN_RANGE), rng.uniform(*OFFSET_RANGE)
    lut = np.clip((np.arange(256) / 255.0) ** gamma * gain + offset, 0.0, 1.0)
    return LabelledImage(np.rint(lut * 255.0).astype(np.uint8)[item.image], item.type_map)


def to_tensors(item: LabelledImage) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) float in [0, 1] and (H, W) long, the model's input and target."""
    image = torch.from_numpy(np.ascontiguousarray(item.image)).permute(2, 0, 1).float().div_(255.0)
    return image, torch.from_numpy(np.ascontiguousarray(item.type_map)).long()


def iter_pool_tensors(pool: ImagePool | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every item of a pool (none when there is no pool) as `to_tensors` gives it, in order, decoded
    one at a time: what is read once (type prototypes over thousands of synthetic rows) need not
    hold the whole pool's tensors in memory."""
    if pool is None:
        return
    for i in range(len(pool)):
        yield to_tensors(pool[i])


def pool_tensors(pool: ImagePool | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`iter_pool_tensors` as a list, for what is read more than once."""
    return list(iter_pool_tensors(pool))


def step_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]))


# --------------------------------------------------------------------------- batch mixing

NORMAL_POOL, ANOMALY_POOL, SYNTHETIC_POOL = "normal", "anomaly", "synthetic"


@dataclass(frozen=True)
class ItemKey:
    """One slot of one batch: which pool, which item, and the seed of its augmentation."""

    pool: str
    index: int
    seed: int


@dataclass(frozen=True)
class BatchComposition:
    normal: int
    anomaly: int
    synthetic: int


def batch_composition(batch_size: int, config: TrainConfig, n_normal: int, n_anomaly: int,
                      n_synthetic: int) -> BatchComposition:
    """How many slots of a batch each pool fills; an empty pool's share goes to the synthetic rows."""
    normal = round(batch_size * config.real_normal_fraction) if n_normal else 0
    anomaly = round(batch_size * config.real_anomaly_fraction) if n_anomaly else 0
    normal, anomaly = max(normal, 1 if n_normal else 0), max(anomaly, 1 if n_anomaly else 0)
    synthetic = batch_size - normal - anomaly if n_synthetic else 0
    if synthetic < 0 or normal + anomaly + synthetic == 0:
        raise InputError(f"batch size {batch_size} is too small for the batch fractions in params.yaml")
    return BatchComposition(normal, anomaly, synthetic)


class MixedBatchSampler:
    """Yields `steps` batches of `ItemKey`s, each a function of (seed, step) alone.

    Synthetic rows are walked in per-epoch permutations so every row is seen once per epoch;
    the few real shots are drawn with replacement.
    """

    def __init__(self, composition: BatchComposition, pool_sizes: dict[str, int], steps: int, seed: int):
        self.composition, self.pool_sizes, self.steps, self.seed = composition, pool_sizes, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for step in range(self.steps):
            yield self.batch(step)

    def _permutation(self, epoch: int) -> np.ndarray:
        return step_rng(self.seed, 1, epoch).permutation(self.pool_sizes[SYNTHETIC_POOL])

    def batch(self, step: int) -> list[ItemKey]:
        rng = step_rng(self.seed, 0, step)
        c = self.composition
        slots = [(NORMAL_POOL, int(i)) for i in rng.integers(0, max(self.pool_sizes[NORMAL_POOL], 1), c.normal)]
        slots += [(ANOMALY_POOL, int(i)) for i in rng.integers(0, max(self.pool_sizes[ANOMALY_POOL], 1), c.anomaly)]
        n_syn = self.pool_sizes[SYNTHETIC_POOL]
        positions = range(step * c.synthetic, (step + 1) * c.synthetic)
        perms = {epoch: self._permutation(epoch) for epoch in {p // n_syn for p in positions}}
        slots += [(SYNTHETIC_POOL, int(perms[p // n_syn][p % n_syn])) for p in positions]
        seeds = rng.integers(0, 2**31 - 1, len(slots))
        return [ItemKey(pool, index, int(s)) for (pool, index), s in zip(slots, seeds)]


class MixedTrainingSet(torch.utils.data.Dataset):
    """Maps an `ItemKey` to an (augmented) (image, type map) pair of tensors."""

    def __init__(self, pools: dict[str, ImagePool], augment_images: bool, photometric_images: bool = False):
        self.pools, self.augment_images, self.photometric_images = pools, augment_images, photometric_images

    def __len__(self) -> int:
        return sum(len(p) for p in self.pools.values())

    def __getitem__(self, key: ItemKey) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.pools[key.pool][key.index]
        rng = step_rng(key.seed)
        if self.augment_images:
            item = augment(item, rng)
        if self.photometric_images:
            item = photometric(item, rng)
        return to_tensors(item)


# --------------------------------------------------------------------------- everything train needs


@dataclass
class TrainingData:
    dataset: MixedTrainingSet
    sampler: MixedBatchSampler
    holdout: ImagePool  # synthetic rows never trained on, for calibration
    normal_shots: ImagePool
    class_names: list[str]  # anomaly types, normal excluded
    category: str = ""

    @property
    def anomaly_shots(self) -> int:
        """How many real anomaly shots training sees (0: zero-shot)."""
        return len(self.dataset.pools[ANOMALY_POOL])

    def loader(self, num_workers: int = 0) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                           persistent_workers=num_workers > 0)


def build_training_data(dataset_dir: str | Path, manifest: Manifest | None, config: TrainConfig,
                        image_size: int, seed: int) -> TrainingData:
    """The training pools. The real shots come from the manifest when one is given, else from the
    dataset's own `shots` config (the dataset alone is then enough)."""
    rows = load_synthetic_rows(dataset_dir, manifest)
    train_idx, holdout_idx = split_holdout(rows.task_ids, config.holdout_fraction)
    if manifest is not None:
        normal, anomaly = ShotPool(manifest.normal_shots, image_size), ShotPool(manifest.anomaly_shots, image_size)
    elif has_stored_shots(dataset_dir):
        normal, anomaly = load_stored_shots(dataset_dir, rows, image_size)
    else:
        raise InputError("the frozen dataset carries no real shots (config `shots`, written by `uniadc "
                         "synthesize` since it stores them); pass the manifest with --manifest", dataset_dir)
    pools: dict[str, ImagePool] = {
        NORMAL_POOL: normal,
        ANOMALY_POOL: anomaly,
        SYNTHETIC_POOL: SyntheticPool(rows, train_idx, image_size),
    }
    sizes = {name: len(pool) for name, pool in pools.items()}
    composition = batch_composition(config.batch_size, config, sizes[NORMAL_POOL], sizes[ANOMALY_POOL],
                                    sizes[SYNTHETIC_POOL])
    return TrainingData(
        dataset=MixedTrainingSet(pools, config.augment, config.photometric_augment),
        sampler=MixedBatchSampler(composition, sizes, config.steps, seed),
        holdout=SyntheticPool(rows, holdout_idx, image_size),
        normal_shots=pools[NORMAL_POOL],
        class_names=rows.class_names,
        category=rows.category,
    )

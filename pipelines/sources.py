"""Dataset readers: a dataset on disk → typed `Sample`s grouped by anomaly type.

Readers only list files and pair images with masks; they never decode pixels (`prepare` does,
when it validates). Supported layouts, one reader each, registered in `READERS`:

- ``mvtec``: MVTec AD. ``<root>/<category>/train/good/*``, ``test/<type>/*`` (``good`` = normal),
  masks ``ground_truth/<type>/<stem>_mask.png``. `root` may be the category folder itself.
- ``mvtec_fs``: MVTec-FS / UniADC jsonl. ``<root>/samples/{train,test}_<category>.jsonl``, one
  JSON object per line, paths relative to `root`. Accepted keys (first one present wins):
  image ``filename | image_path | image | path``; mask ``maskname | mask_path | mask``;
  type ``label_name | anomaly_type | specie_name | defect_type`` (``normal`` / ``good`` = normal;
  missing type and ``anomaly: 0`` = normal); class id ``label | class_id | cls_id`` — masks store
  this id as pixel value, so it becomes `Sample.mask_value` (no id: binary mask). Samples typed
  ``combined`` (several defect types in one image) are left out: they have no single class. The
  anomaly types are declared by their class ids, and samples keep the files' line order (the
  authors' shot order).
- ``mtd``: Magnetic Tile Defect. ``<root>/MT_<Class>/Imgs/<stem>.jpg`` with mask ``<stem>.png``
  beside it; ``MT_Free`` is normal; type = lower-cased class; category ``magnetic_tile``.
- ``folder``: plain folder. Normal images directly in ``<root>`` or in ``<root>/good`` (or
  ``normal``); every other sub-folder ``<root>/<type>/`` holds defect images with masks in
  ``<root>/<type>/masks/<stem>.png``. Category = `category` or the folder's name.

File-system layouts list files in sorted file-name order and split ``train`` only for MVTec's
``train/good``; everything else is ``test`` (a single pool that `prepare` draws shots from).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError
from core.images import is_image_file
from core.manifest import NORMAL, Sample

NORMAL_FOLDERS = ("good", "normal")
MTD_CATEGORY = "magnetic_tile"
MTD_NORMAL_CLASS = "free"
FS_COMBINED = "combined"


@dataclass
class SourceData:
    """What a reader found: the category, its anomaly types (label order) and samples by type.

    `samples` maps "normal" and every anomaly type to its samples in reader order; labels are
    0 for normal and 1..C in `anomaly_types` order.
    """

    root: str
    layout: str
    category: str
    anomaly_types: list[str]
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def of_type(self, anomaly_type: str, split: str | None = None) -> list[Sample]:
        found = self.samples.get(anomaly_type, [])
        return [s for s in found if split is None or s.split == split]

    @property
    def all_samples(self) -> list[Sample]:
        return [s for t in [NORMAL, *self.anomaly_types] for s in self.samples.get(t, [])]


@dataclass(frozen=True)
class _Entry:
    """A sample before labels are known: readers collect these, `_assemble` labels them."""

    path: Path
    anomaly_type: str
    split: str
    mask_path: Path | None = None
    mask_value: int | None = None


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _assemble(
    root: Path,
    layout: str,
    category: str,
    entries: Iterable[_Entry],
    declared_types: list[str] | None = None,
) -> SourceData:
    """Group entries by type and give labels: normal 0, then declared (else sorted) types."""
    entries = list(entries)
    if not entries:
        raise InputError(f"no images found ({layout} layout)", root)
    found = {e.anomaly_type for e in entries} - {NORMAL}
    types = declared_types if declared_types is not None else sorted(found)
    labels = {NORMAL: 0, **{t: i + 1 for i, t in enumerate(types)}}
    samples: dict[str, list[Sample]] = {t: [] for t in labels}
    for e in entries:
        samples[e.anomaly_type].append(
            Sample(
                path=str(e.path),
                anomaly_type=e.anomaly_type,
                label=labels[e.anomaly_type],
                category=category,
                split=e.split,
                mask_path=None if e.mask_path is None else str(e.mask_path),
                mask_value=e.mask_value,
            )
        )
    return SourceData(str(root), layout, category, list(types), samples)


def _require_mask(image: Path, mask: Path) -> Path:
    if not mask.is_file():
        raise InputError(f"defect image has no mask (expected {mask})", image)
    return mask


# ---- MVTec AD ------------------------------------------------------------------------------


def _is_mvtec_category(folder: Path) -> bool:
    has_train = (folder / "train" / "good").is_dir()
    return has_train or ((folder / "test").is_dir() and (folder / "ground_truth").is_dir())


def _pick_category(root: Path, candidates: list[str], category: str | None, what: str) -> str:
    if category is not None:
        if category not in candidates:
            raise InputError(f"category {category!r} not found; {what} has {candidates}", root)
        return category
    if len(candidates) != 1:
        raise InputError(f"{what} holds several categories {candidates}; choose one", root)
    return candidates[0]


def read_mvtec(root: Path, category: str | None = None) -> SourceData:
    if _is_mvtec_category(root):
        folder = root
        if category is not None and category != root.name:
            raise InputError(f"is the MVTec category {root.name!r}, not {category!r}", root)
    else:
        names = [p.name for p in _subfolders(root) if _is_mvtec_category(p)]
        folder = root / _pick_category(root, names, category, "this MVTec AD folder")
    train_good, test = folder / "train" / "good", folder / "test"
    entries = [_Entry(p, NORMAL, "train") for p in _images_in(train_good)] if train_good.is_dir() else []
    if test.is_dir():
        for type_dir in _subfolders(test):
            normal = type_dir.name in NORMAL_FOLDERS
            for image in _images_in(type_dir):
                if normal:
                    entries.append(_Entry(image, NORMAL, "test"))
                else:
                    mask = folder / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                    entries.append(_Entry(image, type_dir.name, "test", _require_mask(image, mask)))
    return _assemble(root, "mvtec", folder.name, entries)


# ---- MVTec-FS jsonl ------------------------------------------------------------------------

FS_IMAGE_KEYS = ("filename", "image_path", "image", "path")
FS_MASK_KEYS = ("maskname", "mask_path", "mask")
FS_TYPE_KEYS = ("label_name", "anomaly_type", "specie_name", "defect_type")
FS_ID_KEYS = ("label", "class_id", "cls_id")
_FS_FILE = re.compile(r"^(train|test)_(.+)\.jsonl$")


def _first(record: dict, keys: tuple[str, ...]):
    return next((record[k] for k in keys if record.get(k) not in (None, "")), None)


def _fs_categories(root: Path) -> list[str]:
    names = {m.group(2) for p in (root / "samples").glob("*.jsonl") if (m := _FS_FILE.match(p.name))}
    return sorted(names)


def _fs_record(
    root: Path, record: dict, split: str, jsonl: Path, number: int
) -> tuple[_Entry, int | None] | None:
    """Line `number` of `jsonl` → (entry, class id); None for samples without a single class."""

    def bad(problem: str) -> InputError:
        return InputError(f"line {number}: {problem}", jsonl)

    image = _first(record, FS_IMAGE_KEYS)
    if not isinstance(image, str):
        raise bad(f"no image path (one of {list(FS_IMAGE_KEYS)})")
    anomaly_type = _first(record, FS_TYPE_KEYS)
    if anomaly_type is None:
        anomaly_type = NORMAL if record.get("anomaly", 1) in (0, False) else None
    if not isinstance(anomaly_type, str):
        raise bad(f"no anomaly type (one of {list(FS_TYPE_KEYS)})")
    anomaly_type = NORMAL if anomaly_type in NORMAL_FOLDERS else anomaly_type
    if anomaly_type == FS_COMBINED:
        return None
    class_id = _first(record, FS_ID_KEYS)
    if class_id is not None and not isinstance(class_id, int):
        raise bad(f"class id {class_id!r} is not an integer")
    if anomaly_type == NORMAL:
        return _Entry(root / image, NORMAL, split), None
    mask = _first(record, FS_MASK_KEYS)
    if not isinstance(mask, str):
        raise bad(f"defect sample has no mask path (one of {list(FS_MASK_KEYS)})")
    mask_path = _require_mask(root / image, root / mask)
    return _Entry(root / image, anomaly_type, split, mask_path, class_id), class_id


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number} is not valid JSON ({exc.msg})", path) from None
        if not isinstance(record, dict):
            raise InputError(f"line {number} is not a JSON object", path)
        records.append(record)
    return records


def read_mvtec_fs(root: Path, category: str | None = None) -> SourceData:
    category = _pick_category(root, _fs_categories(root), category, "samples/")
    entries: list[_Entry] = []
    class_ids: dict[str, int | None] = {}
    for split in ("train", "test"):
        path = root / "samples" / f"{split}_{category}.jsonl"
        if not path.is_file():
            continue
        for number, record in enumerate(_read_jsonl(path), start=1):
            parsed = _fs_record(root, record, split, path, number)
            if parsed is None:
                continue
            entry, class_id = parsed
            entries.append(entry)
            if entry.anomaly_type != NORMAL:
                known = class_ids.setdefault(entry.anomaly_type, class_id)
                if known != class_id:
                    raise InputError(
                        f"line {number}: type {entry.anomaly_type!r} has class id {class_id}, "
                        f"earlier lines gave {known}",
                        path,
                    )
    # Class ids declare the type order when every type has one; otherwise fall back to names.
    if class_ids and all(v is not None for v in class_ids.values()):
        declared = sorted(class_ids, key=lambda t: (class_ids[t], t))
    else:
        declared = None
    return _assemble(root, "mvtec_fs", category, entries, declared)


# ---- Magnetic Tile Defect ------------------------------------------------------------------


def _mtd_class_dirs(root: Path) -> list[Path]:
    return [p for p in _subfolders(root) if p.name.startswith("MT_") and (p / "Imgs").is_dir()]


def read_mtd(root: Path, category: str | None = None) -> SourceData:
    entries = []
    for class_dir in _mtd_class_dirs(root):
        anomaly_type = class_dir.name[3:].lower()
        normal = anomaly_type == MTD_NORMAL_CLASS
        # Imgs/ holds both the photos and their .png masks: every non-PNG image is a photo.
        for image in _images_in(class_dir / "Imgs"):
            if image.suffix.lower() == ".png":
                continue
            if normal:
                entries.append(_Entry(image, NORMAL, "test"))
            else:
                mask = _require_mask(image, image.with_suffix(".png"))
                entries.append(_Entry(image, anomaly_type, "test", mask))
    return _assemble(root, "mtd", category or MTD_CATEGORY, entries)


# ---- plain folder --------------------------------------------------------------------------


def read_folder(root: Path, category: str | None = None) -> SourceData:
    entries = [_Entry(p, NORMAL, "test") for p in _images_in(root)]
    for sub in _subfolders(root):
        if sub.name in NORMAL_FOLDERS:
            entries += [_Entry(p, NORMAL, "test") for p in _images_in(sub)]
            continue
        images = _images_in(sub)
        if not images:
            raise InputError("defect-type folder holds no images", sub)
        for image in images:
            mask = _require_mask(image, sub / "masks" / f"{image.stem}.png")
            entries.append(_Entry(image, sub.name, "test", mask))
    return _assemble(root, "folder", category or root.resolve().name, entries)


# ---- layout detection and the registry -----------------------------------------------------

READERS: dict[str, Callable[[Path, str | None], SourceData]] = {
    "mvtec": read_mvtec,
    "mvtec_fs": read_mvtec_fs,
    "mtd": read_mtd,
    "folder": read_folder,
}


def detect_layout(root: str | Path) -> str:
    """The layout name of the dataset at `root` (one of `READERS`), from its folder structure."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset folder not found", root)
    if (root / "samples").is_dir() and _fs_categories(root):
        return "mvtec_fs"
    if _mtd_class_dirs(root):
        return "mtd"
    if _is_mvtec_category(root) or any(_is_mvtec_category(p) for p in _subfolders(root)):
        return "mvtec"
    return "folder"


def list_categories(root: str | Path, layout: str = "auto") -> list[str]:
    """Every category the layout finds under `root`, sorted: what `data.categories: all` means.

    MVTec AD: the category folders (or the root itself when it is one); MVTec-FS: the
    ``samples/{train,test}_<category>.jsonl`` names; MTD and plain folders hold one category.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset folder not found", root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "mvtec":
        names = [root.name] if _is_mvtec_category(root) else [p.name for p in _subfolders(root) if _is_mvtec_category(p)]
    elif layout == "mvtec_fs":
        names = _fs_categories(root)
    elif layout in READERS:
        names = [READERS[layout](root, None).category]
    else:
        raise InputError(f"unknown dataset layout {layout!r}; known: {sorted(READERS)} or 'auto'")
    if not names:
        raise InputError(f"no categories found ({layout} layout)", root)
    return sorted(names)


def read_source(root: str | Path, layout: str = "auto", category: str | None = None) -> SourceData:
    """Read the dataset at `root`; `layout="auto"` detects it. Unknown layout → `InputError`."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset folder not found", root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in READERS:
        raise InputError(f"unknown dataset layout {layout!r}; known: {sorted(READERS)} or 'auto'")
    return READERS[layout](root, category)

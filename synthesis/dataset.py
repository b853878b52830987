"""The frozen dataset: the only contract between the synthesis and the training halves.

One row per synthetic image. The `datasets.Features` are declared once (`dataset_features`) and
drive the Parquet schema of every shard (with the features in the schema metadata, as `datasets`
writes them) and the YAML of the dataset card, so `datasets.load_dataset(<dir>)` returns typed
`Image` / `ClassLabel` columns and the Hub viewer shows the same thing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from core.atomic import atomic_path
from core.errors import InputError
from core.shards import SHARD_PATTERN, shard_name
from core.images import encode_png
from core.manifest import write_text_atomic
from core.hub_ids import check_repo_id
from synthesis.hub import check_write_access, hub_step, resolve_token
from synthesis.shots import SHOTS_CONFIG, SHOTS_DIR, shot_features

DATA_DIR = "data"
CARD_NAME = "README.md"
# Parquet schema metadata key of the renderer's notes on a shard (placement fallbacks per task id),
# beside `datasets`' own `huggingface` key: they travel with the shard, so a resumed or multi-process
# render still counts every fallback.
NOTES_KEY = b"uniadc"
LICENSE = "other"  # inherits the licence of the source images, which we cannot know
TAGS = ["anomaly-detection", "synthetic", "industrial-inspection", "uniadc"]


@dataclass
class DatasetRow:
    """One synthetic image and how it was made (the row of the frozen dataset)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool
    label: int  # index into the anomaly types (normal excluded)
    category: str
    source_id: str  # the normal image it was painted on
    prompt: str
    strength: float
    backend: str
    seed: int
    score: float  # selection score of the kept candidate
    task_id: str  # stable; the resume key
    mode: str  # how the defect was made (`core.shards.MODES`): by a recipe, or cut from a real anomaly shot


@dataclass
class DatasetSummary:
    num_rows: int
    num_shards: int
    class_names: list[str]
    counts: dict[str, int]  # rows per anomaly type, in class order
    fallbacks: dict[str, str] = field(default_factory=dict)  # task id -> what replaced its mask prior


@dataclass
class CardInfo:
    """What the dataset card says about how the dataset was made."""

    category: str
    class_names: list[str]
    backend: str
    global_seed: int
    counts: dict[str, int]
    params: dict = field(default_factory=dict)  # the synthesis settings used
    model_id: str | None = None
    model_revision: str | None = None
    fallbacks: dict[str, str] = field(default_factory=dict)  # task id -> what replaced its mask prior
    shots: dict[str, int] | None = None  # real shots per class (normal first) in the `shots` config
    test_set: dict | None = None  # how the source's test set is drawn (`shots.describe_test_set`)


def dataset_features(class_names: Sequence[str]) -> datasets.Features:
    """The schema of the frozen dataset; `class_names` are the anomaly types (no normal)."""
    if not class_names:
        raise ValueError("the dataset needs at least one anomaly type")
    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            "category": datasets.Value("string"),
            "source_id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "strength": datasets.Value("float32"),
            "backend": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "score": datasets.Value("float32"),
            "task_id": datasets.Value("string"),
            "mode": datasets.Value("string"),
        }
    )


# columns a dataset written before them lacks; it still validates and trains (`legacy_features`)
ADDED_COLUMNS = ("mode",)


def legacy_features(features: datasets.Features) -> datasets.Features:
    """The schema of a dataset written before `ADDED_COLUMNS` existed."""
    return datasets.Features({k: v for k, v in features.items() if k not in ADDED_COLUMNS})


def shard_path(out_dir: str | Path, index: int, total: int) -> Path:
    return Path(out_dir) / DATA_DIR / shard_name(index, total)


def rows_to_table(rows: Sequence[DatasetRow], features: datasets.Features) -> pa.Table:
    columns = {
        "image": [{"bytes": encode_png(r.image), "path": None} for r in rows],
        # bool → L 0/255, so any image viewer shows the mask
        "mask": [{"bytes": encode_png(np.asarray(r.mask, dtype=bool)), "path": None} for r in rows],
        "label": [int(r.label) for r in rows],
        "category": [r.category for r in rows],
        "source_id": [r.source_id for r in rows],
        "prompt": [r.prompt for r in rows],
        "strength": [float(r.strength) for r in rows],
        "backend": [r.backend for r in rows],
        "seed": [int(r.seed) for r in rows],
        "score": [float(r.score) for r in rows],
        "task_id": [r.task_id for r in rows],
        "mode": [r.mode for r in rows],
    }
    return pa.Table.from_pydict(columns, schema=features.arrow_schema)


def write_shard(
    rows: Sequence[DatasetRow], path: str | Path, features: datasets.Features, notes: dict | None = None
) -> None:
    """Write one Parquet shard atomically: a crash leaves either the whole shard or none.

    `notes` (JSON) go into the schema metadata under `NOTES_KEY`; `shard_notes` reads them back.
    """
    table = rows_to_table(rows, features)
    if notes:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), NOTES_KEY: json.dumps(notes, sort_keys=True).encode()}
        )
    with atomic_path(path) as tmp:  # hidden temp name: neither `data/train-*` nor `datasets` picks it up
        pq.write_table(table, tmp)


def shard_notes(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[NOTES_KEY]) if NOTES_KEY in meta else {}


def remove_stale_temp_files(out_dir: str | Path) -> list[Path]:
    """Delete temp files a crashed writer left behind; returns what was removed."""
    stale = sorted((Path(out_dir) / DATA_DIR).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def list_shards(out_dir: str | Path) -> list[Path]:
    data = Path(out_dir) / DATA_DIR
    return sorted(p for p in data.glob("train-*.parquet") if SHARD_PATTERN.match(p.name)) if data.is_dir() else []


def _features_of(path: Path) -> datasets.Features:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet shard ({exc})", path) from None
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta is None:
        raise InputError("Parquet shard has no `datasets` features in its schema metadata", path)
    return datasets.Features.from_dict(json.loads(meta)["info"]["features"])


def validate_dataset(out_dir: str | Path) -> DatasetSummary:
    """Check a finished dataset: every shard present, one schema (today's, or one written before
    `ADDED_COLUMNS` existed), each task id once."""
    out_dir = Path(out_dir)
    shards = list_shards(out_dir)
    if not shards:
        raise InputError("no shards `data/train-XXXXX-of-YYYYY.parquet`; run `uniadc synthesize` first", out_dir)
    totals = {int(SHARD_PATTERN.match(p.name).group(2)) for p in shards}
    if len(totals) != 1:
        raise InputError(f"shards from different runs are mixed (totals {sorted(totals)})", out_dir / DATA_DIR)
    total = totals.pop()
    missing = sorted(set(range(total)) - {int(SHARD_PATTERN.match(p.name).group(1)) for p in shards})
    if missing:
        raise InputError(f"{len(missing)} of {total} shards missing (first: {shard_name(missing[0], total)})", out_dir)

    features = _features_of(shards[0])
    label = features.get("label")
    if not isinstance(label, datasets.ClassLabel):
        raise InputError("column `label` is not a ClassLabel", shards[0])
    expected = dataset_features(label.names)
    if features == legacy_features(expected):
        expected = legacy_features(expected)
    seen: set[str] = set()
    counts: Counter[int] = Counter()
    fallbacks: dict[str, str] = {}
    for path in shards:
        if _features_of(path) != expected:
            raise InputError("schema differs from the frozen dataset schema", path)
        fallbacks.update(shard_notes(path).get("fallbacks", {}))
        columns = pq.read_table(path, columns=["task_id", "label"]).to_pydict()
        for task_id in columns["task_id"]:
            if task_id in seen:
                raise InputError(f"duplicate task id {task_id!r}", path)
            seen.add(task_id)
        counts.update(columns["label"])
    return DatasetSummary(
        num_rows=len(seen),
        num_shards=total,
        class_names=list(label.names),
        counts={name: counts.get(i, 0) for i, name in enumerate(label.names)},
        fallbacks=dict(sorted(fallbacks.items())),
    )


def card_yaml(info: CardInfo) -> dict:
    """The card's front matter: what `datasets` and the Hub read to load and show the data."""
    features = dataset_features(info.class_names)
    front = {
        "license": LICENSE,
        "task_categories": ["image-segmentation", "image-classification"],
        "tags": TAGS,
        "pretty_name": f"UniADC synthetic anomalies: {info.category}",
        "size_categories": [_size_category(sum(info.counts.values()))],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*"}]}],
        # as `datasets` itself writes it on push_to_hub; no `splits`, whose num_bytes we do not know
        "dataset_info": datasets.DatasetInfo(features=features)._to_yaml_dict(),
    }
    if info.shots is not None:  # a second config: the real shots, so the dataset alone retrains
        front["configs"].append(
            {"config_name": SHOTS_CONFIG, "data_files": [{"split": "train", "path": f"{SHOTS_DIR}/train-*"}]}
        )
        front["dataset_info"] = [
            {"config_name": "default", **front["dataset_info"]},
            {"config_name": SHOTS_CONFIG,
             **datasets.DatasetInfo(features=shot_features(info.class_names))._to_yaml_dict()},
        ]
    if info.test_set is not None:
        front["uniadc"] = {"test_set": info.test_set}
    return front


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < bound:
            return name
    return "100K<n<1M"


def card_text(info: CardInfo) -> str:
    front = yaml.safe_dump(card_yaml(info), sort_keys=False)
    model = f"`{info.model_id}`" + (f" (revision `{info.model_revision}`)" if info.model_revision else "")
    counts = "\n".join(f"| {name} | {info.counts.get(name, 0)} |" for name in info.class_names)
    lines = [
        "---",
        front.rstrip(),
        "---",
        "",
        f"# UniADC synthetic anomalies: {info.category}",
        "",
        f"Synthetic anomalies painted on normal images of `{info.category}` by `uniadc synthesize`",
        "(a re-implementation of UniADC, arXiv 2511.06644). Each row is one image with its pixel mask",
        "(L, 0/255), its anomaly type (`label`), the normal image it was painted on (`source_id`),",
        "the prompt, the strength and selection score of the kept candidate, a stable `task_id`, and",
        "how the defect was made (`mode`: `zero_shot`, painted by a recipe or a prompt; `few_shot`, cut",
        "from one of the real anomaly shots and pasted).",
        "",
        "## How it was made",
        "",
        f"- backend: `{info.backend}`" + (f", model {model}" if info.model_id else ""),
        f"- global seed: {info.global_seed} (each row's `seed` is derived from it and the task id)",
        "",
        "| anomaly type | images |",
        "|---|---|",
        counts,
        "",
        *_fallback_section(info),
        "Synthesis parameters:",
        "",
        "```yaml",
        yaml.safe_dump(info.params, sort_keys=True).rstrip(),
        "```",
        "",
        *_shots_section(info),
        "## Use",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("<this repo or folder>", split="train")',
        *(['shots = datasets.load_dataset("<this repo or folder>", "shots", split="train")'] if info.shots else []),
        "```",
        "",
        *(["Retrain the discriminator from this dataset alone: `uniadc train --dataset <folder or repo@revision>`.",
           ""] if info.shots else []),
    ]
    return "\n".join(lines)


def _fallback_section(info: CardInfo) -> list[str]:
    """How many masks were not drawn from their first-choice prior, by type and replacement."""
    if not info.fallbacks:
        return []
    by_kind = Counter((task_id.rsplit("-", 1)[0], note) for task_id, note in info.fallbacks.items())
    return [
        f"Placement fallbacks: {len(info.fallbacks)} of {sum(info.counts.values())} masks did not fit the "
        "foreground with their first-choice prior and were drawn as below (task ids in the shards' "
        f"`{NOTES_KEY.decode()}` Parquet metadata).",
        "",
        "| anomaly type | first choice -> drawn instead | images |",
        "|---|---|---|",
        *(f"| {anomaly_type} | {note} | {n} |" for (anomaly_type, note), n in sorted(by_kind.items())),
        "",
    ]


def _shots_section(info: CardInfo) -> list[str]:
    """The card's prose about the real shots and the source's test set (empty when absent)."""
    lines: list[str] = []
    if info.shots is not None:
        lines += [
            "## Real shots (config `shots`)",
            "",
            "The real images the rows were made from, at full resolution: normal shots and anomaly",
            "shots with their masks (L, 0/255); `label` 0 is normal, then the anomaly types.",
            "",
            "| class | shots |",
            "|---|---|",
            *(f"| {name} | {count} |" for name, count in info.shots.items()),
            "",
        ]
    if info.test_set is not None:
        t = info.test_set
        lines += [
            "## The source's test set",
            "",
            f"Layout `{t.get('layout')}`, source root folder `{t.get('root_name')}`, category `{t.get('category')}`, "
            f"k_normal {t.get('k_normal')}, k_anomaly {t.get('k_anomaly')}: {t.get('test_images')} test images.",
            f"Shot rule: {t.get('shot_rule')}",
            "(also in the front matter under `uniadc.test_set`)",
            "",
        ]
    return lines


def write_card(out_dir: str | Path, info: CardInfo) -> Path:
    path = Path(out_dir) / CARD_NAME
    write_text_atomic(path, card_text(info))
    return path


def push_to_hub(out_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the card and shards (nothing else) to a Hub dataset repo; returns the commit URL.

    The repo id, the dataset and the token (one `whoami` call) are checked before any upload;
    every failure a user can cause is one `InputError` line (`synthesis.hub`).
    """
    from huggingface_hub import HfApi  # the only network-facing import; kept out of module import

    out_dir = Path(out_dir)
    check_repo_id(repo_id)
    validate_dataset(out_dir)
    if not (out_dir / CARD_NAME).is_file():
        raise InputError("dataset card README.md missing; the synthesize stage did not finish", out_dir)
    api = HfApi(token=resolve_token(token))
    check_write_access(api, repo_id)
    hub_step(f"create the dataset repo {repo_id}", api.create_repo, repo_id, repo_type="dataset",
             private=private, exist_ok=True)
    commit = hub_step(
        f"upload to {repo_id}", api.upload_folder,
        folder_path=str(out_dir),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[CARD_NAME, f"{DATA_DIR}/train-*.parquet", f"{SHOTS_DIR}/train-*.parquet"],
        commit_message="Upload UniADC synthetic dataset",
    )
    return str(getattr(commit, "commit_url", commit))

"""Where a frozen dataset comes from: a local folder, or a Hub dataset repo (`owner/name@revision`).

A Hub id is fetched with `huggingface_hub.snapshot_download` (repo type "dataset"), which keeps
it in the Hugging Face cache and honours `HF_HUB_OFFLINE` / `HF_HOME`: an offline run uses the
cached snapshot or says that there is none. Only the card and the Parquet files are fetched.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import InputError
from core.hub_ids import first_line, repo_id_problem

DATASET_FILES = ["README.md", "data/*.parquet", "shots/*.parquet"]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """`owner/name[@revision]` → (repo id, revision); None when `spec` cannot be a Hub id."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return None
    repo, sep, revision = spec.partition("@")
    if "/" not in repo or repo_id_problem(repo) is not None or (sep and not revision):
        return None
    return repo, revision or None


def resolve_dataset(spec: str | Path) -> Path:
    """The local folder of the dataset `spec`: the folder itself, or the Hub snapshot it names."""
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise InputError("the frozen dataset must be a folder (Parquet shards + README.md)", path)
        return path
    hub = parse_hub_id(str(spec))
    # `data/synthetic` could be a Hub id too; when its first folder exists here, it means a local path
    if hub is None or Path(str(spec).split("/")[0]).is_dir():
        raise InputError("frozen dataset folder not found; run `uniadc synthesize` first", path)
    repo_id, revision = hub
    import huggingface_hub  # network-facing: imported only when a Hub id is given

    try:
        local = huggingface_hub.snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision, allow_patterns=DATASET_FILES
        )
    except (OSError, ValueError) as exc:  # hub errors are OSErrors; a malformed id a ValueError
        raise InputError(
            f"no such folder, and the Hub dataset {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" could not be fetched ({type(exc).__name__}: {first_line(exc)}); offline, it must be in the HF cache",
            path,
        ) from None
    return Path(local)

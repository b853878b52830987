"""How the frozen dataset names its Parquet shards (shard i of n is `train-{i:05d}-of-{n:05d}.parquet`)
and what its `mode` column says.

Part of the contract between the halves: `synthesis/` writes these names and modes, `discriminator/`
reads from the names alone whether a render finished and from the modes which rows a recipe made,
so the one definition lives below both.
"""

from __future__ import annotations

import re

SHARD_PATTERN = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")


def shard_name(index: int, total: int) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"


# The `mode` column: how a row's defect was made. ZERO_SHOT: a recipe (or a prompt) painted it;
# FEW_SHOT: cut from a real anomaly shot and pasted. Datasets written before the column existed
# have no way to tell them apart.
ZERO_SHOT, FEW_SHOT = "zero_shot", "few_shot"
MODES = (ZERO_SHOT, FEW_SHOT)

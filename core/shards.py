"""How the frozen dataset names its Parquet shards: shard i of n is `train-{i:05d}-of-{n:05d}.parquet`.

Part of the contract between the halves: `synthesis/` writes these names and `discriminator/`
reads from them alone whether a render finished, so the one definition lives below both.
"""

from __future__ import annotations

import re

SHARD_PATTERN = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")


def shard_name(index: int, total: int) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"

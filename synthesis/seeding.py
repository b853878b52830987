"""Seeds derived from (global seed, task id, ...): the same dataset whatever the process count.

Every random choice in synthesis draws from a generator made here; nothing uses global RNG state.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(global_seed: int, *keys: str | int) -> int:
    """A 63-bit seed from the global seed and any number of keys (task id, candidate index...)."""
    entropy = [int(global_seed) & 0xFFFFFFFF]
    for key in keys:
        entropy.append(zlib.crc32(str(key).encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def numpy_rng(seed: int, *keys: str | int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys) if keys else seed)


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen

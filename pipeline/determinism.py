"""Helpers that keep results the same bytes on every machine: a fixed torch thread count and seeded row splits."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """torch's, numpy's and Python's global generators seeded alike. The loop draws only from torch, but a
    checkpoint records all three, so an unseeded one (a Ray worker starts from OS entropy) would make two runs of
    the same params write different checkpoints."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block (also usable as a decorator), restored after.
    CPU kernels split float sums by thread count and round differently (measured: 1 vs 2 threads changes the last
    bits), so a pinned count makes weights and latents independent of the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def holdout_split(num_rows: int, holdout: int, seed: int, param: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices (train, held out) of a seeded permutation, the first `holdout` held out; `param` names
    the setting in errors. At least one row stays for training."""
    if not 0 <= holdout < num_rows:
        raise ValueError(f"{param}={holdout} must be in [0, {num_rows - 1}] for {num_rows} ingested images")
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])

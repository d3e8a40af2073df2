"""The `evaluate` section: the metrics' own settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaluateParams:
    pr_k: int
    kid_subsets: int
    kid_subset_size: int
    is_splits: int
    batch_size: int
    use_gpu: bool
    seed: int  # KID subset draws

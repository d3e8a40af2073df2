"""The `curve` section: FID of every kept checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.load import ParamsError
from pipeline.params.rules import Precision, check_precision


@dataclass(frozen=True)
class CurveParams:
    num_samples: int  # per checkpoint
    sampler: Literal["ddpm", "ddim", "dpm-solver++"]
    steps: int  # sampler steps
    cfg_scale: float  # 1.0 = no guidance (the paper's training curves)
    cfg_channels: int | None
    batch_size: int  # images per sampler loop: throughput only
    micro_batch: int  # images per network call: fixes the pixels (see pipeline.sample)
    precision: Precision
    use_gpu: bool
    seed: int

    def __post_init__(self):
        check_params(self)


def check_params(p: CurveParams) -> None:
    for name in ("num_samples", "steps", "batch_size", "micro_batch"):
        if getattr(p, name) < 1:
            raise ParamsError(f"'curve.{name}' must be >= 1, got {getattr(p, name)}")
    if p.num_samples < 2:
        raise ParamsError(f"'curve.num_samples' must be >= 2 for a covariance, got {p.num_samples}")
    check_precision("curve", p.precision, p.use_gpu)

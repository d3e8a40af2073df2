"""The `tracking` section: MLflow on or off, and the experiment's name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool
    experiment: str

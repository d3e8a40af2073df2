"""The `register` section: the registered model's name and the metric that moves `champion`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal



@dataclass(frozen=True)
class RegisterParams:
    model_name: str
    metric: Literal["fid", "kid"]  # lower is better for both

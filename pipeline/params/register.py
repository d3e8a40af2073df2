"""The `register` section: the registered model's name and the metric that moves `champion`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.load import ParamsError


@dataclass(frozen=True)
class RegisterParams:
    model_name: str
    metric: Literal["fid", "kid"]  # lower is better for both
    max_labels_per_request: int  # the served model's bound on images per request (pipeline/serving.py)

    def __post_init__(self):
        if self.max_labels_per_request < 1:
            raise ParamsError(f"'register.max_labels_per_request' must be >= 1, got {self.max_labels_per_request}")

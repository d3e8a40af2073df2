"""The `encode` section: how images become latents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.load import ParamsError
from pipeline.params.rules import check_storage_path


@dataclass(frozen=True)
class EncodeParams:
    flip: bool  # also encode the horizontal flip (F = 2)
    store: Literal["posterior", "sample"]
    dtype: Literal["float16", "float32"]
    batch_size: int  # rows per Ray task; a throughput/memory knob that never changes the bytes
    micro_batch: int  # images per VAE forward; part of the numerics (kernels are chosen by shape)
    num_actors: int
    use_gpu: bool
    seed: int  # store: sample draws image i's noise from (seed, i)
    # Where the images and the VAE reach every node (pipeline/shared_storage.py): s3://... or a directory every
    # node mounts; "" = the driver's paths (one machine, or a shared file system). Never the bytes.
    storage_path: str = ""

    def __post_init__(self):
        for key in ("batch_size", "micro_batch", "num_actors"):
            if getattr(self, key) < 1:
                raise ParamsError(f"'encode.{key}' must be >= 1, got {getattr(self, key)}")
        check_storage_path("encode.storage_path", self.storage_path)

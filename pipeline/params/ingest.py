"""The `ingest` section: which images, at what size, and how many bad inputs fail the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import synthetic
from pipeline.params.load import ParamsError
from pipeline.provenance import NO_INPUT, local_input


@dataclass(frozen=True)
class SyntheticParams:
    num_images: int
    num_classes: int
    seed: int

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(synthetic.CLASSES):
            raise ParamsError(
                f"'ingest.synthetic.num_classes' must be in 1..{len(synthetic.CLASSES)} "
                f"(the designed shapes: {', '.join(synthetic.CLASSES)}), got {self.num_classes}"
            )
        if self.num_images < 1:
            raise ParamsError(f"'ingest.synthetic.num_images' must be >= 1, got {self.num_images}")


@dataclass(frozen=True)
class HFParams:
    path: str | None  # hub id ("uoft-cs/cifar10") or builder name; None = read local_dir
    local_dir: str  # a local dataset directory tracked with `dvc add` (a dvc.yaml dep); provenance.NO_INPUT = none
    name: str | None
    split: str
    revision: str | None
    image_column: str
    label_column: str
    streaming: bool
    max_images: int | None  # inputs read (valid or not); None = the whole split

    def __post_init__(self):
        if self.max_images is not None and self.max_images < 1:
            raise ParamsError(f"'ingest.hf.max_images' must be >= 1 or null, got {self.max_images}")
        if (self.path is None) == (local_input(self.local_dir) is None):
            raise ParamsError(
                "set exactly one of 'ingest.hf.path' (a hub id) and 'ingest.hf.local_dir' (a local "
                f"directory; {NO_INPUT} = none): got path {self.path!r}, local_dir {self.local_dir!r}"
            )


@dataclass(frozen=True)
class ImageFolderParams:
    root: str


@dataclass(frozen=True)
class IngestParams:
    source: Literal["synthetic", "hf", "imagefolder"]
    image_size: int
    shard_size: int
    max_bad_fraction: float
    min_image_side: int
    max_image_pixels: int  # width x height an input's header may claim; larger ones are refused before decoding
    max_file_bytes: int  # size of one input file (or a dataset row's image bytes); larger ones are not read
    num_workers: int
    synthetic: SyntheticParams
    hf: HFParams
    imagefolder: ImageFolderParams

    def __post_init__(self):
        for key in ("image_size", "shard_size", "min_image_side", "max_image_pixels", "max_file_bytes"):
            if getattr(self, key) < 1:
                raise ParamsError(f"'ingest.{key}' must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ParamsError(f"'ingest.max_bad_fraction' must be in [0, 1), got {self.max_bad_fraction}")
        if self.num_workers < 0:
            raise ParamsError(f"'ingest.num_workers' must be >= 0 (0 = in-process), got {self.num_workers}")

"""The `reference` section: the feature extractor and the real-data statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.load import ParamsError
from pipeline.provenance import local_input


@dataclass(frozen=True)
class ReferenceParams:
    extractor: Literal["classifier", "inception"]
    mode: Literal["clean", "legacy_tensorflow"]  # inception only
    inception_weights: str  # a local file tracked with `dvc add` (a dvc.yaml dep); NO_INPUT = clean-fid's copy
    classifier_steps: int
    classifier_batch_size: int
    classifier_lr: float
    holdout: int
    max_features: int | None  # real features stored for KID and precision/recall; None = all
    batch_size: int  # feature extraction batch
    use_gpu: bool  # feature extraction device; the classifier always trains on CPU
    seed: int
    # An ADM reference batch (.npz, e.g. VIRTUAL_imagenet256_labeled.npz): its stored whole-dataset mu/sigma (and
    # mu_s/sigma_s for sFID) are the statistics, its arr_0 the features kept; the ingested images give none.
    adm_batch: str  # a local .npz tracked with `dvc add` (a dvc.yaml dep); NO_INPUT = none

    def __post_init__(self):
        if local_input(self.adm_batch) is not None and (self.extractor, self.mode) != (
            "inception",
            "legacy_tensorflow",
        ):
            raise ParamsError(
                "'reference.adm_batch' stores TF Inception statistics of TF's resize: it needs "
                "reference.extractor: inception and reference.mode: legacy_tensorflow"
            )

"""ADM's reference batches (Dhariwal & Nichol 2021, guided-diffusion `evaluations/`): the format and its reader.

A reference batch such as `VIRTUAL_imagenet256_labeled.npz` holds
- `arr_0`: uint8 (N, H, W, 3), a sample of the real images (10,000 for ImageNet), which ADM's evaluator uses for
  precision and recall;
- `mu`, `sigma`: float64 (2048,), (2048, 2048): the pool3 statistics of the whole dataset under TF Inception-V3
  (inception-2015-12-05), which ADM's evaluator uses for FID, so an FID against this file is against them, not
  against the statistics of the N images in `arr_0`;
- `mu_s`, `sigma_s`: (2023,), (2023, 2023): the same for the spatial features that sFID compares (the first 7
  channels of `mixed_6/conv`, 17 x 17 x 7, flattened in TF's NHWC order).

Each statistics pair is optional here (a plain npz of images is a batch without stored statistics), but a pair is
whole or absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import ArtifactError, require_file, sha256_file

IMAGES_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma")
SPATIAL_STATS_KEYS = ("mu_s", "sigma_s")


@dataclass(frozen=True)
class AdmBatch:
    images: np.ndarray  # uint8 (N, H, W, 3)
    mu: np.ndarray | None  # (D,) float64, whole-dataset pool3 statistics
    sigma: np.ndarray | None  # (D, D)
    spatial_mu: np.ndarray | None  # (S,) float64, whole-dataset spatial statistics
    spatial_sigma: np.ndarray | None  # (S, S)
    sha256: str


def _pair(data, keys: tuple[str, str], path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    present = [k for k in keys if k in data]
    if not present:
        return None, None
    if len(present) == 1:
        raise ArtifactError(
            f"{path} has {present[0]} but not {[k for k in keys if k not in present][0]}; "
            f"a reference batch stores both or neither"
        )
    mu, sigma = np.asarray(data[keys[0]], np.float64), np.asarray(data[keys[1]], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ArtifactError(f"{path}: {keys[0]} must be (D,) and {keys[1]} (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def read_adm_batch(path: str | Path) -> AdmBatch:
    """The images and whatever statistics the file stores."""
    path = require_file(path, "reference")
    with np.load(path) as data:
        if IMAGES_KEY not in data:
            raise ArtifactError(f"{path}: no {IMAGES_KEY}; an ADM batch is np.savez(path, images_uint8_NHWC, ...)")
        images = data[IMAGES_KEY]
        mu, sigma = _pair(data, STATS_KEYS, path)
        spatial_mu, spatial_sigma = _pair(data, SPATIAL_STATS_KEYS, path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ArtifactError(f"{path}: {IMAGES_KEY} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return AdmBatch(images, mu, sigma, spatial_mu, spatial_sigma, sha256_file(path))


def stores_statistics(path: str | Path) -> bool:
    """Whether the file stores pool3 statistics (without reading its images)."""
    with np.load(require_file(path, "reference")) as data:
        return STATS_KEYS[0] in data.files

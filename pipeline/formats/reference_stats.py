"""`data/reference/`, format `dit-reference` v1: the real images' feature statistics, `stats.npz` (`mu`, `sigma`
float64 over all N images for FID; `features` (M, D) float32 and `labels` (M,) for KID and precision/recall;
`spatial_mu`, `spatial_sigma` for sFID when imported from an ADM reference batch) and a
manifest describing the extractor and the data. The extractor itself (`extractor.json`, `classifier.pt`) is
saved and loaded by `pipeline.features`.

Written by the reference stage (`write_npz`, `write_reference_manifest`); read by evaluate and curve through
`load_reference`, which imports nothing of the classifier training or the image shards.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import ArtifactError, atomic_write, read_manifest, require_file, sha256_file, write_manifest

REFERENCE_FORMAT, REFERENCE_VERSION, STAGE = "dit-reference", 1, "reference"
STATS_FILE = "stats.npz"


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """An uncompressed .npz with fixed zip timestamps, so equal arrays give equal bytes (np.savez stamps the time)."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

    return atomic_write(path, write)


def write_reference_manifest(out_dir: str | Path, **fields) -> Path:
    return write_manifest(out_dir, REFERENCE_FORMAT, REFERENCE_VERSION, **fields)


@dataclass(frozen=True)
class Reference:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray  # (N, D) float32
    image_size: int
    num_classes: int | None
    description: dict  # what the protocol records about it
    spatial_mu: np.ndarray | None = None  # (S,) float64: sFID's statistics, where the reference stores them
    spatial_sigma: np.ndarray | None = None  # (S, S)


def load_reference(directory: str | Path) -> Reference:
    manifest = read_manifest(directory, REFERENCE_FORMAT, REFERENCE_VERSION, STAGE)
    path = require_file(Path(directory) / STATS_FILE, STAGE)
    stats_sha256 = sha256_file(path)
    if stats_sha256 != manifest["stats_sha256"]:
        raise ArtifactError(f"{path} does not match its manifest's sha256; run `dvc repro {STAGE}`")
    with np.load(path) as stats:
        mu, sigma, features = stats["mu"], stats["sigma"], stats["features"]
        spatial = (stats["spatial_mu"], stats["spatial_sigma"]) if "spatial_mu" in stats else (None, None)
    description = {
        "extractor": manifest["extractor"],
        "extractor_mode": manifest["mode"],
        "feature_dim": manifest["feature_dim"],
        "reference_count": manifest["count"],
        "reference_features": manifest["features_kept"],
        "reference_stats_sha256": stats_sha256,
    }
    if manifest.get("adm_batch_sha256"):  # imported from an ADM reference batch (`reference.adm_batch`)
        description.update(
            reference_stats="stored mu/sigma of ADM reference batch",
            reference_features_from="arr_0 (KID, precision/recall)",
            adm_batch_sha256=manifest["adm_batch_sha256"],
        )
    return Reference(mu, sigma, features, manifest["image_size"], manifest["num_classes"], description, *spatial)

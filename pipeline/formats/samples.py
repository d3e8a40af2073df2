"""`data/samples/`, format `dit-samples` v1: `samples.npz` in ADM's evaluator layout (arr_0 uint8 (N, H, W, 3),
labels int64 (N,)) and a manifest recording every setting that determines the pixels.

Written by the sample stage (`write_samples`); read by evaluate (`read_samples_manifest`, `read_samples`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import ArtifactError, atomic_write, read_manifest, require_file, sha256_file, write_manifest

FORMAT, VERSION, STAGE = "dit-samples", 1, "sample"
SAMPLES_FILE = "samples.npz"


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Atomic, uncompressed np.savez (ADM's evaluator reads samples.npz's arr_0 this way)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.savez would append ".npz" to the temp name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def write_samples(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, /, **settings) -> Path:
    """samples.npz, then the manifest: num_samples, `settings` (the sampling protocol, `num_classes` among them),
    samples_sha256 and the count of each label."""
    out_dir = Path(out_dir)
    save_npz(out_dir / SAMPLES_FILE, arr_0=images, labels=labels)
    return write_manifest(
        out_dir,
        FORMAT,
        VERSION,
        num_samples=len(images),
        **settings,
        samples_sha256=sha256_file(out_dir / SAMPLES_FILE),
        label_counts=np.bincount(labels, minlength=settings["num_classes"]).tolist(),
    )


def read_samples_manifest(samples_dir: str | Path) -> dict:
    return read_manifest(samples_dir, FORMAT, VERSION, STAGE)


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An ADM-format batch: arr_0 uint8 (N, H, W, 3), optional labels int (N,)."""
    with np.load(require_file(path, STAGE)) as data:
        if "arr_0" not in data:
            raise ArtifactError(f"{path}: no arr_0; ADM's format is np.savez(path, images_uint8_NHWC[, labels])")
        images = data["arr_0"]
        labels = data["labels"] if "labels" in data else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ArtifactError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels is not None and labels.shape != (len(images),):
        raise ArtifactError(f"{path}: labels must be ({len(images)},), got {labels.shape}")
    return images, labels

"""`data/images/`, format `dit-images` v1: parquet shards of PNG-encoded RGB images with labels, and a manifest.

Written by the ingest stage (`pipeline.ingest`, through `ShardWriter` and `write_images_manifest`); read by vae,
encode and reference through the readers below, which import nothing of the ingest sources.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import artifacts

FORMAT, VERSION, STAGE = "dit-images", 1, "ingest"
PNG_COMPRESS_LEVEL = 6  # zlib's default; fixed so PNG bytes do not depend on a library default


# --- writing -----------------------------------------------------------------------------------------------------


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes. A fresh image carries no metadata (no ICC, EXIF or time chunks)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


class ShardWriter:
    """Buffers rows (anything with `png`, `label`, `key`) and writes `shard-%05d.parquet` files of exactly
    `shard_size` rows (the last may be short); `shards` lists the manifest's entries."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = Path(out_dir), shard_size
        self.rows: list = []
        self.shards: list[dict] = []

    def add(self, row) -> None:
        self.rows.append(row)
        if len(self.rows) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.table(
            {
                "image": pa.array([r.png for r in self.rows], pa.binary()),
                "label": pa.array([r.label for r in self.rows], pa.int64()),
                "key": pa.array([r.key for r in self.rows], pa.string()),
            }
        )
        path = self.out_dir / f"shard-{len(self.shards):05d}.parquet"
        # Fixed writer options: bytes depend only on the rows (pyarrow stores no timestamps).
        artifacts.atomic_write(
            path,
            lambda tmp: pq.write_table(
                table,
                tmp,
                row_group_size=len(self.rows),
                compression="zstd",
                compression_level=3,
                use_dictionary=False,
                write_statistics=["label"],
            ),
        )
        self.shards.append({"file": path.name, "count": len(self.rows), "sha256": artifacts.sha256_file(path)})
        self.rows = []


def write_images_manifest(
    out_dir: str | Path,
    *,
    count: int,
    image_size: int,
    class_names: list[str],
    source: dict,
    shards: list[dict],
    skipped: dict,
) -> Path:
    return artifacts.write_manifest(
        out_dir,
        FORMAT,
        VERSION,
        count=count,
        image_size=image_size,
        num_classes=len(class_names),
        class_names=class_names,
        source=source,
        shards=shards,
        skipped=skipped,
    )


# --- reading -----------------------------------------------------------------------------------------------------


def read_manifest(images_dir: str | Path) -> dict:
    """The `dit-images` v1 manifest of `images_dir` (ArtifactError with the fix when missing or stale)."""
    return artifacts.read_manifest(images_dir, FORMAT, VERSION, stage=STAGE)


def decode_png(png: bytes, image_size: int, where: str) -> np.ndarray:
    """PNG bytes of one shard row -> (S, S, 3) uint8. The contract is an RGB S x S image: anything else is an
    ArtifactError naming the row (`where`), not a silent conversion."""
    with Image.open(io.BytesIO(png)) as img:
        if img.mode != "RGB" or img.size != (image_size, image_size):
            raise artifacts.ArtifactError(
                f"{where}: expected an RGB {image_size}x{image_size} image, got {img.mode} "
                f"{img.size}; run `dvc repro {STAGE}`"
            )
        return np.asarray(img, dtype=np.uint8)


def decode_pngs(pngs: Iterable[bytes], image_size: int, wheres: Iterable[str]) -> np.ndarray:
    """PNG bytes (n,) -> uint8 (n, S, S, 3); `wheres` names each row for `decode_png`'s errors."""
    return np.stack([decode_png(png, image_size, where) for png, where in zip(pngs, wheres, strict=True)])


def read_shard(images_dir: str | Path, shard: dict, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One entry of the manifest's `shards` -> (images uint8 (n, S, S, 3), labels int64 (n,)), after checking the
    file against the manifest's sha256 and row count."""
    path = artifacts.require_file(Path(images_dir) / shard["file"], STAGE)
    if artifacts.sha256_file(path) != shard["sha256"]:
        raise artifacts.ArtifactError(f"{path} does not match the sha256 in its manifest; run `dvc repro {STAGE}`")
    table = pq.read_table(path, columns=["image", "label"])
    if table.num_rows != shard["count"]:
        raise artifacts.ArtifactError(
            f"{path} has {table.num_rows} rows, its manifest says {shard['count']}; run `dvc repro {STAGE}`"
        )
    wheres = (f"{path} row {i}" for i in range(table.num_rows))
    images = decode_pngs(table.column("image").to_pylist(), image_size, wheres)
    return images, np.asarray(table.column("label").to_numpy(), dtype=np.int64)


def iter_image_shards(images_dir: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (images uint8 (n, S, S, 3), labels int64 (n,)) per shard, in row order; memory is one shard."""
    manifest = read_manifest(images_dir)
    for shard in manifest["shards"]:
        yield read_shard(images_dir, shard, manifest["image_size"])


def read_images(images_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """All images in memory (for training on random batches): uint8 (N, S, S, 3), labels int64 (N,), the manifest."""
    manifest = read_manifest(images_dir)
    parts = [read_shard(images_dir, shard, manifest["image_size"]) for shard in manifest["shards"]]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if len(images) != manifest["count"]:
        raise artifacts.ArtifactError(
            f"{images_dir}: shards hold {len(images)} images, the manifest says "
            f"{manifest['count']}; run `dvc repro {STAGE}`"
        )
    return images, labels, manifest


def read_keys(images_dir: str | Path, shard: dict) -> list[str]:
    """The `key` column of one shard (source path or hub key of each row), in row order."""
    return pq.read_table(Path(images_dir) / shard["file"], columns=["key"]).column("key").to_pylist()

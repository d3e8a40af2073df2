"""`data/latents/`, format `dit-latents` v1: the VAE's raw (unscaled) latents of every image, as safetensors shards
with the image shards' row split, and a manifest with the scaling factor.

Written by the encode stage (`pipeline.encode` places rows and calls `write_shard` / `write_latents_manifest`); read
by train through `open_latents`, which memory-maps the shards: a worker reads the rows it indexes from the page
cache, which every process on a node shares, so N workers on a node hold one copy of the set, not N (ImageNet-256's
fp16 mean and std with flips take ~42 GB). Imports nothing of Ray or the VAE.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import save_file

from pipeline.artifacts import ArtifactError, atomic_write, read_manifest, sha256_file, write_manifest

LATENTS_FORMAT = ("dit-latents", 1)
STAGE = "encode"


def shard_name(images_shard: str) -> str:
    """The latents file of an image shard: shard-00003.parquet -> latents-00003.safetensors."""
    return images_shard.replace("shard-", "latents-").replace(".parquet", ".safetensors")


def write_shard(out_dir: Path, name: str, arrays: dict[str, np.ndarray]) -> dict:
    """Write `label` (n,) and `mean` + `std` or `sample` (n, F, C, h, w) as `name`; returns the manifest entry."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    atomic_write(out_dir / name, lambda tmp: save_file(tensors, str(tmp)))
    path = out_dir / name
    return {"file": name, "count": len(tensors["label"]), "size": path.stat().st_size, "sha256": sha256_file(path)}


def write_latents_manifest(out_dir: str | Path, **fields) -> Path:
    return write_manifest(out_dir, *LATENTS_FORMAT, **fields)


def read_latents_manifest(latents_dir: str | Path) -> dict:
    return read_manifest(latents_dir, *LATENTS_FORMAT, stage=STAGE)


# safetensors' dtype names (its format spec) -> torch; encode writes float16/float32 latents and int64 labels
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}


def map_shard(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file as views of its pages, mapped copy-on-write (never written back): nothing
    is read until a row is indexed, no file descriptor stays open, and a page read once serves every process on the
    node. The layout is safetensors' spec: an 8-byte little-endian header size, a JSON header with each tensor's
    dtype, shape and [begin, end) byte offsets, then the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > size - 8:
            raise ArtifactError(f"{path} is not a safetensors file (header of {header_size} bytes in {size})")
        header = json.loads(f.read(header_size))
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)  # (size,) MAP_PRIVATE
    data_start = 8 + header_size
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ArtifactError(
                f"{path}: tensor {key!r} has dtype {info['dtype']}, not one of "
                f"{sorted(SAFETENSORS_DTYPES)}; run `dvc repro {STAGE}`"
            )
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = (data_start + o for o in info["data_offsets"])
        itemsize = dtype.itemsize
        if end - begin != math.prod(info["shape"]) * itemsize or end > size or begin % itemsize:
            raise ArtifactError(f"{path}: tensor {key!r} has a corrupt or misaligned extent; run `dvc repro {STAGE}`")
        tensors[key] = raw[begin:end].view(dtype).view(info["shape"])
    return tensors


_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # itemsize -> an integer dtype of that width
_TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class LatentSet:
    """The rows of all shards in manifest order, without concatenating them: global row i is row i - starts[s] of
    shard s. Shards are memory-mapped files (`open_latents`) or tensors already in memory (one shard: tests,
    benchmarks, or the set copied onto a GPU by `to`)."""

    def __init__(self, shards: list[dict[str, torch.Tensor]]):
        if not shards:
            raise ArtifactError("a latent set needs at least one shard")
        self.shards = shards
        self.keys = sorted(shards[0])
        for i, shard in enumerate(shards):
            if (
                sorted(shard) != self.keys
                or any(len(shard[k]) != len(shard["label"]) for k in self.keys)
                or any(
                    shard[k].shape[1:] != shards[0][k].shape[1:] or shard[k].dtype != shards[0][k].dtype
                    for k in self.keys
                )
            ):
                raise ArtifactError(
                    f"latent shard {i} does not match the first in keys, rows, shapes or dtypes; "
                    f"run `dvc repro {STAGE}`"
                )
        self.starts = np.cumsum([0] + [len(s["label"]) for s in shards])  # (S + 1,) first global row of each shard
        self.count = int(self.starts[-1])

    def shape(self, key: str) -> tuple[int, ...]:
        return (self.count, *self.shards[0][key].shape[1:])

    def nbytes(self) -> int:
        return sum(math.prod(self.shape(k)) * self.shards[0][k].dtype.itemsize for k in self.keys)

    def take(self, key: str, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` (b,) of `key`, and of those the flips `flip` (b,) when given: a new (b, ...) tensor in the
        stored dtype, on the shards' device. Reads only those rows."""
        if len(self.shards) == 1:
            t = self.shards[0][key]
            return t[idx] if flip is None else t[idx, flip]
        # Gathered in numpy, whose fancy indexing costs a few microseconds a call against torch's tens: this loop
        # runs once per shard that the batch touches. Integer views of the same width carry any dtype's bits.
        idx_np = idx.numpy()
        shard_of = np.searchsorted(self.starts, idx_np, side="right") - 1  # (b,)
        local, order = idx_np - self.starts[shard_of], np.argsort(shard_of, kind="stable")
        cuts = np.searchsorted(shard_of[order], np.arange(len(self.shards) + 1))  # shard s: order[cuts[s]:cuts[s+1]]
        first = self.shards[0][key]
        out = np.empty((len(idx), *first.shape[1 if flip is None else 2 :]), dtype=_BITS[first.dtype.itemsize])
        flip_np = None if flip is None else flip.numpy()
        for s in np.flatnonzero(np.diff(cuts)).tolist():
            rows = order[cuts[s] : cuts[s + 1]]
            src = self.shards[s][key].view(_TORCH_BITS[first.dtype.itemsize]).numpy()
            out[rows] = src[local[rows]] if flip is None else src[local[rows], flip_np[rows]]
        return torch.from_numpy(out).view(first.dtype)

    def to(self, device: torch.device) -> "LatentSet":
        """The whole set as one shard of contiguous tensors on `device`, filled shard by shard (no second copy)."""
        if len(self.shards) == 1 and all(t.device == device for t in self.shards[0].values()):
            return self
        tensors = {}
        for key in self.keys:
            tensors[key] = torch.empty(self.shape(key), dtype=self.shards[0][key].dtype, device=device)
            for s, shard in enumerate(self.shards):
                tensors[key][self.starts[s] : self.starts[s + 1]] = shard[key]
        return LatentSet([tensors])


def open_latents(latents_dir: str | Path) -> tuple[dict, LatentSet]:
    """The manifest and its shards, memory-mapped: `label` int64 (N,), and `mean` + `std` or `sample`
    (N, F, C, h, w), unscaled, in the stored dtype.

    Each shard is checked against its manifest entry's size and row count, not its sha256: hashing would read every
    byte on every worker start (ImageNet's ~42 GB: minutes), where the mapping reads only the rows a batch indexes.
    The hashes are checked where the bytes arrive: DVC's checkout and pull, and the node cache's download
    (pipeline/shared_storage.py); `load_latents` checks them too."""
    manifest = read_latents_manifest(latents_dir)
    shards = []
    for entry in manifest["shards"]:
        path = _shard_path(latents_dir, entry)
        shard = map_shard(path)
        _check_rows(path, shard, entry)
        shards.append(shard)
    return manifest, _latent_set(latents_dir, manifest, shards)


def load_latents(latents_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and the whole set as contiguous tensors in memory (a private copy: for tests and tools; train
    uses `open_latents`). Each shard is read once, checked against its manifest sha256, and parsed from those bytes."""
    manifest = read_latents_manifest(latents_dir)
    shards = []
    for entry in manifest["shards"]:
        path = _shard_path(latents_dir, entry)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{path} does not match the sha256 in its manifest; run `dvc repro {STAGE}`")
        shard = safetensors.torch.load(data)
        _check_rows(path, shard, entry)
        shards.append(shard)
    return manifest, _latent_set(latents_dir, manifest, shards).to(torch.device("cpu")).shards[0]


def _shard_path(latents_dir: str | Path, entry: dict) -> Path:
    """The shard file of a manifest entry, present and of the recorded size."""
    path = Path(latents_dir) / entry["file"]
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; run `dvc pull` or `dvc repro {STAGE}`")
    if "size" not in entry:
        raise ArtifactError(
            f"{latents_dir}/manifest.json records no size for {entry['file']} (written by an older "
            f"encode); run `dvc repro {STAGE}`"
        )
    if path.stat().st_size != entry["size"]:
        raise ArtifactError(
            f"{path} is {path.stat().st_size} bytes, its manifest says {entry['size']}: it is "
            f"damaged or from another run; run `dvc pull` or `dvc repro {STAGE}`"
        )
    return path


def _check_rows(path: Path, shard: dict[str, torch.Tensor], entry: dict) -> None:
    if "label" not in shard or len(shard["label"]) != entry["count"]:
        raise ArtifactError(
            f"{path} holds {len(shard.get('label', ()))} rows, its manifest says {entry['count']}; "
            f"run `dvc repro {STAGE}`"
        )


def _latent_set(latents_dir: str | Path, manifest: dict, shards: list[dict[str, torch.Tensor]]) -> LatentSet:
    latents = LatentSet(shards)
    if latents.count != manifest["count"]:
        raise ArtifactError(
            f"{latents_dir} holds {latents.count} rows, its manifest says {manifest['count']}; run `dvc repro {STAGE}`"
        )
    return latents

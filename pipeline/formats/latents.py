"""`data/latents/`, format `dit-latents` v1: the VAE's raw (unscaled) latents of every image, as safetensors shards
with the image shards' row split, and a manifest with the scaling factor.

Written by the encode stage (`pipeline.encode` places rows and calls `write_shard` / `write_latents_manifest`); read
by train through `load_latents`, which imports nothing of Ray or the VAE.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
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
    return {"file": name, "count": len(tensors["label"]), "sha256": sha256_file(out_dir / name)}


def write_latents_manifest(out_dir: str | Path, **fields) -> Path:
    return write_manifest(out_dir, *LATENTS_FORMAT, **fields)


def read_latents_manifest(latents_dir: str | Path) -> dict:
    return read_manifest(latents_dir, *LATENTS_FORMAT, stage=STAGE)


def load_latents(latents_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and all shards concatenated: `label` int64 (N,), and `mean` + `std` or `sample` (N, F, C, h, w),
    unscaled, in the stored dtype. Holds the whole set in memory (fine for the latents of ~1M 256px images in fp16
    on a training node: ImageNet's fp16 means with flips take about 21 GB)."""
    manifest = read_latents_manifest(latents_dir)
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in manifest["shards"]:
        with safe_open(str(Path(latents_dir) / shard["file"]), "pt") as f:
            for key in f.keys():
                parts.setdefault(key, []).append(f.get_tensor(key))
    tensors = {key: torch.cat(values) for key, values in parts.items()}
    if len(tensors["label"]) != manifest["count"]:
        raise ArtifactError(f"{latents_dir} holds {len(tensors['label'])} rows, its manifest says "
                            f"{manifest['count']}; run `dvc repro {STAGE}`")
    return manifest, tensors

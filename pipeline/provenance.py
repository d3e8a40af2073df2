"""Provenance: what an artifact was made from, in the terms DVC and our own persisted caches can check.

Local inputs. A params key that names a local input (ingest.imagefolder.root, ingest.hf.local_dir,
vae.pretrained_dir, reference.inception_weights, train.official_checkpoint) is also a dep in dvc.yaml
(`${ingest.imagefolder.root}`), so that changing one image reruns the stage. DVC fails on a missing dep, so these
keys always name an existing path: `NO_INPUT` (inputs/none/, a placeholder committed to git) means "no local input".
Real inputs go under inputs/ and are tracked with `dvc add` (see inputs/none/README.md).

Hub inputs (a dataset or VAE id) are pinned by the commit sha they resolved to, recorded in the artifact.

Package versions are recorded in every manifest and MLflow run; persisted caches check theirs (code_stamp.py).
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

NO_INPUT = "inputs/none"
# Packages whose version changes the numbers of a checkpoint or a sample shard (kernels, samplers, the VAE);
# torch's version names its CUDA build (e.g. 2.5.1+cu124). A change sets a persisted cache aside.
KEY_PACKAGES = ("torch", "numpy", "diffusers")
# Recorded in every manifest and MLflow run: also those that change the numbers of other stages (image decoding and
# resizing, parquet, FID's matrix square root, the Inception port, the dataset loader).
RECORD_PACKAGES = KEY_PACKAGES + ("pillow", "pyarrow", "scipy", "clean-fid", "datasets", "safetensors")


# --- local and hub inputs ----------------------------------------------------------------------------------------


def local_input(path: str | None) -> str | None:
    """The value of a local-input key, or None when it names no input (`NO_INPUT`)."""
    if path is None or Path(path) == Path(NO_INPUT):
        return None
    return path


def hub_revision(
    repo_id: str, revision: str | None = None, repo_type: str = "model", cache_dir: str | Path | None = None
) -> str | None:
    """The commit sha that `repo_id`@`revision` resolved to in the local hub cache (which a `from_pretrained` fills),
    or None when the cache does not hold it. Snapshot folders are named by commit: `.../snapshots/<sha>/`."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision, repo_type=repo_type, cache_dir=cache_dir)
    return Path(found).parent.name if isinstance(found, str) else None


# --- code and environment ----------------------------------------------------------------------------------------


def package_versions(names: tuple[str, ...] = RECORD_PACKAGES) -> dict[str, str | None]:
    """Python's and each installed distribution's version (None when not installed); no imports needed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# The instruction sets behind the kernels torch picks on a CPU (oneDNN and MKL dispatch on them): two CPUs that differ
# here train different weights from the same seed.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine() -> dict:
    """The CPU (model name and its kernel-relevant flags), the core count torch uses and torch's version: what makes
    the same params give other numbers on another machine (read from /proc/cpuinfo where Linux has it)."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

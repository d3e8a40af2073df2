"""Provenance: what an artifact was made from, in the terms DVC and our own persisted caches can check.

Local inputs. A params key that names a local input (ingest.imagefolder.root, ingest.hf.local_dir,
vae.pretrained_dir, reference.inception_weights, train.official_checkpoint) is also a dep in dvc.yaml
(`${ingest.imagefolder.root}`), so that changing one image reruns the stage. DVC fails on a missing dep, so these
keys always name an existing path: `NO_INPUT` (inputs/none/, a placeholder committed to git) means "no local input".
Real inputs go under inputs/ and are tracked with `dvc add` (see inputs/none/README.md).

Hub inputs (a dataset or VAE id) are pinned by the commit sha they resolved to, recorded in the artifact.

Persisted caches (train checkpoints, sample shards) outlive a stage run, so params alone do not key them: a
`stamp` records the producing stage's code fingerprint (pipeline/fingerprint.py, the same one DVC sees, so a comment
never invalidates a cache) and the versions of the packages that change its numbers. A cache whose stamp differs
belongs to another run.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from pipeline.fingerprint import fingerprint

NO_INPUT = "inputs/none"
# Packages whose version changes the numbers of a checkpoint or a sample shard (kernels, samplers, the VAE);
# torch's version names its CUDA build (e.g. 2.5.1+cu124). A change discards a persisted cache.
KEY_PACKAGES = ("torch", "numpy", "diffusers")
# Recorded in every manifest and MLflow run: also those that change the numbers of other stages (image decoding and
# resizing, parquet, FID's matrix square root, the Inception port, the dataset loader).
RECORD_PACKAGES = KEY_PACKAGES + ("pillow", "pyarrow", "scipy", "clean-fid", "datasets", "safetensors")
STAMP_FILE = "provenance.json"


# --- local and hub inputs ----------------------------------------------------------------------------------------

def local_input(path: str | None) -> str | None:
    """The value of a local-input key, or None when it names no input (`NO_INPUT`)."""
    if path is None or Path(path) == Path(NO_INPUT):
        return None
    return path


def hub_revision(repo_id: str, revision: str | None = None, repo_type: str = "model",
                 cache_dir: str | Path | None = None) -> str | None:
    """The commit sha that `repo_id`@`revision` resolved to in the local hub cache (which a `from_pretrained` fills),
    or None when the cache does not hold it. Snapshot folders are named by commit: `.../snapshots/<sha>/`."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision, repo_type=repo_type,
                                   cache_dir=cache_dir)
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
    return {"cpu": cpu, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "threads": torch.get_num_threads(),
            "torch": torch.__version__}

def stamp(stage: str) -> dict:
    """What a persisted cache made by `stage` depends on besides its params and inputs: the stage's code fingerprint
    (pipeline/fingerprint.py: blind to comments, docstrings and layout) with its per-module hashes, which name what
    changed, and the versions of `KEY_PACKAGES`."""
    code = fingerprint(stage)
    return {"fingerprint": code["fingerprint"], "code": code["modules"], "packages": package_versions(KEY_PACKAGES)}


def stamp_mismatch(old: dict | None, new: dict) -> list[str]:
    """Why a cache stamped `old` was not made by the code and packages of `new` (empty when it was)."""
    if not old or "fingerprint" not in old:
        return ["it records no code fingerprint (it predates them)"]
    why = []
    if old["fingerprint"] != new["fingerprint"]:
        changed = sorted(f for f in old["code"].keys() | new["code"].keys() if old["code"].get(f) != new["code"].get(f))
        why.append("code changed: " + ", ".join(changed))
    why += [f"{name} {old['packages'].get(name)} -> {version}" for name, version in new["packages"].items()
            if old["packages"].get(name) != version]
    return why


def reuse_or_clear(cache_dir: str | Path, new: dict, across_versions: bool, label: str) -> None:
    """Keep the files of `cache_dir` only when its stamp matches `new`, or when the user asked to resume across
    versions (`across_versions`); otherwise delete them, saying why. Then stamp the directory with `new`."""
    cache_dir = Path(cache_dir)
    record = cache_dir / STAMP_FILE
    files = [f for f in cache_dir.iterdir() if f.is_file() and f != record]
    why = stamp_mismatch(json.loads(record.read_text()) if record.exists() else None, new) if files else []
    if why and across_versions:
        print(f"[{label}] resuming {len(files)} files in {cache_dir} across versions, as asked ({'; '.join(why)})")
    elif why:
        print(f"[{label}] starting afresh: {cache_dir} was made by other code or packages ({'; '.join(why)}); "
              "pass --resume-across-versions to keep it")
        for f in files:
            f.unlink()
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, record)

"""Provenance: what an artifact was made from, in the terms DVC and our own persisted caches can check.

Local inputs. A params key that names a local input (ingest.imagefolder.root, ingest.hf.local_dir,
vae.pretrained_dir, reference.inception_weights, train.official_checkpoint) is also a dep in dvc.yaml
(`${ingest.imagefolder.root}`), so that changing one image reruns the stage. DVC fails on a missing dep, so these
keys always name an existing path: `NO_INPUT` (inputs/none/, a placeholder committed to git) means "no local input".
Real inputs go under inputs/ and are tracked with `dvc add` (see inputs/none/README.md).

Hub inputs (a dataset or VAE id) are pinned by the commit sha they resolved to, recorded in the artifact.

Persisted caches (train checkpoints, sample shards) outlive a stage run, so params alone do not key them: a
`stamp` records the sha256 of every source file in the producing module's import closure inside `pipeline/` (lazy
imports included: the code that can run, not the whole package, so editing report.py does not discard a training
run) and the versions of the packages that change its numbers. A cache whose stamp differs is started afresh, the
old one moved aside (pipeline/persisted.py).
"""
from __future__ import annotations

import ast
import hashlib
import platform
from importlib import metadata
from pathlib import Path

NO_INPUT = "inputs/none"
PACKAGE_DIR = Path(__file__).resolve().parent
# Packages whose version changes the numbers of a checkpoint or a sample shard (kernels, samplers, the VAE);
# torch's version names its CUDA build (e.g. 2.5.1+cu124). A change sets a persisted cache aside.
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

def _module_file(name: str) -> Path | None:
    """pipeline/a/b.py or pipeline/a/b/__init__.py for "pipeline.a.b"; None for names that are not modules."""
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):  # every level, so imports inside functions count too
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "pipeline" or n.startswith("pipeline.")]


def import_closure(module: str) -> list[Path]:
    """The source files of `module` (e.g. "pipeline.train") and of every pipeline module it imports, transitively,
    read from the source (no import is executed), sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (path := _module_file(name)) is None:
            continue
        seen[name] = path
        todo += _imported_names(ast.parse(path.read_text(), filename=str(path)))
    if module not in seen:
        raise ValueError(f"{module} is not a module of {PACKAGE_DIR}")
    return sorted(seen.values())


def stamp(module: str) -> dict:
    """What a persisted cache made by `module` depends on besides its params and inputs: the sha256 of each file of
    its import closure (named relative to the repository) and the versions of `KEY_PACKAGES`."""
    root = PACKAGE_DIR.parent
    code = {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in import_closure(module)}
    return {"code": code, "packages": package_versions(KEY_PACKAGES)}


def stamp_mismatch(old: dict | None, new: dict) -> list[str]:
    """Why a cache stamped `old` was not made by the code and packages of `new` (empty when it was)."""
    if not old:
        return ["it records no code hash or package versions (it predates them)"]
    why = []
    changed = sorted(f for f in old["code"].keys() | new["code"].keys() if old["code"].get(f) != new["code"].get(f))
    if changed:
        why.append("code changed: " + ", ".join(changed))
    why += [f"{name} {old['packages'].get(name)} -> {version}" for name, version in new["packages"].items()
            if old["packages"].get(name) != version]
    return why


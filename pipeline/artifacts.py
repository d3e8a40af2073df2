"""Artifacts on disk: atomic writes, content hashes and self-describing manifests.

Every stage output that another stage reads carries a `manifest.json` with a `format` name and a `version`. A reader
states which format it expects and which stage produces it, so a missing or stale artifact fails with the command
that fixes it (`dvc repro <stage>`) instead of a KeyError deep inside a stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(UserError, RuntimeError):
    """An upstream artifact is missing, incomplete or of an incompatible version."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename onto `path`: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(directory: str | Path) -> None:
    """Flush `directory`'s entries: a rename is durable only once its folder is, so after a power loss the new name
    (not the old file, nor no file) is what a reader finds."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """torch.save, atomically and reproducibly: given a path, torch names the zip's root folder after the (random)
    temp file, so identical tensors would hash differently; through a file handle the name is fixed."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a sibling temp dir to fill; on success it replaces `out_dir`, so readers never see a half-written one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; this becomes the artifact directory
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The temp names of `atomic_write` (`.<name>.<8 random>.tmp`, a file) and `staged_dir` (`.<name>.<8 random>`, a
# folder): tempfile's random part is 8 of [a-z0-9_]. A SIGKILL skips their cleanup and leaves them behind.
_RANDOM = r"[a-z0-9_]{8}"


def remove_stale_temps(*outputs: str | Path) -> list[Path]:
    """Delete what a killed run of a stage left of its outputs' temp files and folders: beside each output, only
    the temp names of that output; inside an output folder, any of this module's temp names. Call it when a stage
    starts, before anything writes: DVC runs a stage once at a time, so no temp name there is in use. Returns the
    paths removed."""
    removed = []
    for output in map(Path, outputs):
        own = re.compile(rf"\.{re.escape(output.name)}\.{_RANDOM}(\.tmp)?")
        removed += [p for p in _entries(output.parent) if own.fullmatch(p.name)]
        if output.is_dir() and not output.is_symlink():
            for folder, dirs, files in os.walk(output):
                removed += [Path(folder, n) for n in dirs + files if _ANY_TEMP.fullmatch(n)]
                dirs[:] = [n for n in dirs if not _ANY_TEMP.fullmatch(n)]  # a temp folder goes whole
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


_ANY_TEMP = re.compile(rf"\..+\.{_RANDOM}(\.tmp)?")


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of a directory's files (relative names and contents), independent of listing order."""
    path = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
    return h.hexdigest()


def write_manifest(directory: str | Path, format: str, version: int, **fields: Any) -> Path:
    """`directory/manifest.json`: the format, its fields, and the versions of the packages that change numbers."""
    from pipeline.provenance import package_versions

    return atomic_write_json(
        Path(directory) / "manifest.json",
        {"format": format, "version": version, **fields, "packages": package_versions()},
    )


def read_manifest(directory: str | Path, format: str, version: int, stage: str) -> dict:
    """Load `directory/manifest.json`, checking it is `format` at `version`; `stage` is the DVC stage that makes it."""
    path = Path(directory) / "manifest.json"
    fix = f"run `dvc repro {stage}`"
    if not path.exists():
        raise ArtifactError(f"{path} is missing: the '{stage}' stage has not produced {directory} yet; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from e
    if manifest.get("format") != format or manifest.get("version") != version:
        raise ArtifactError(
            f"{path} is format {manifest.get('format')!r} v{manifest.get('version')}, "
            f"expected {format!r} v{version}; it was made by an incompatible version, {fix}"
        )
    return manifest


def require_file(path: str | Path, stage: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run `dvc repro {stage}` to produce it")
    return path

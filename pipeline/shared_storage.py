"""Artifacts that every node of a cluster reads, through storage that every node reaches, not the driver's disk.

On one machine (or nodes sharing a file system) a Ray worker reads the DVC workspace directly: `data/latents`,
`models/vae`, `models/dit`, `data/images`. On a cluster whose nodes hold no copy of the workspace, a stage with a
`storage_path` (`s3://bucket/prefix`, or a directory every node mounts) instead:

1. publishes the directory from the driver: `publish` uploads its files to `<storage>/<kind>/<sha256 of the dir>/`,
   then a `COMPLETE` record listing every file with its size and hash. A location with that record is whole, and
   its name says its content, so a later run (or stage) with the same bytes uploads nothing;
2. hands the workers the location (a URI) instead of a path;
3. each worker calls `on_this_node(location)`: the first one on a node downloads it into the node's cache
   (`DIT_NODE_CACHE`, default `<tmp>/dit-node-cache-<uid>`), under a file lock, into a temp directory that is
   checked against the record and then renamed into place; the node's other workers wait for it and find it there.

So a node downloads each artifact once, whatever its number of workers, and the workers memory-map the same local
files (the latents: one copy in the node's page cache, pipeline/formats/latents.py). S3 credentials come from each
node's environment, as for Ray Train's storage (pipeline/checkpoint_storage.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.artifacts import ArtifactError, sha256_file

COMPLETE = "COMPLETE.json"  # written last: the location is whole; lists each file's size and sha256
CACHE_ENV = "DIT_NODE_CACHE"


def is_location(value: str | None) -> bool:
    """Whether `value` is a published location (a URI) rather than a path on the driver's file system."""
    return bool(value) and "://" in value




def location_uri(storage_path: str) -> str:
    """`storage_path` as a URI pyarrow resolves: s3://... as given, an absolute directory as file://..."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    if not Path(storage_path).is_absolute():
        raise ValueError(f"storage path {storage_path!r} must be a URI (s3://bucket/prefix) or an absolute directory")
    return Path(storage_path).resolve().as_uri()


def file_record(files: dict[str, Path]) -> dict:
    """{relative name: {size, sha256}} of `files`, in name order."""
    return {name: {"size": files[name].stat().st_size, "sha256": sha256_file(files[name])} for name in sorted(files)}


def record_hash(record: dict) -> str:
    """The content hash of a record's files: `artifacts.sha256_dir` of a directory holding them (the same bytes)."""
    h = hashlib.sha256()
    for name in sorted(record):
        h.update(name.encode() + b"\0" + record[name]["sha256"].encode())
    return h.hexdigest()


def publish(local: str | Path, storage_path: str, kind: str) -> str:
    """Upload the directory `local` (or the single file `local`) to `<storage>/<kind>/<content sha256>/` unless it
    is there whole already; returns that URI. A file keeps its name in it."""
    import pyarrow.fs

    local = Path(local)
    if local.is_dir():
        files = {str(f.relative_to(local)): f for f in local.rglob("*") if f.is_file()}
    elif local.is_file():
        files = {local.name: local}
    else:
        raise ArtifactError(f"{local} is missing: nothing to publish to {storage_path}")
    record = file_record(files)
    uri = f"{location_uri(storage_path)}/{kind}/{record_hash(record)}"
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(f"{root}/{COMPLETE}").type == pyarrow.fs.FileType.File:
        return uri
    for name in record:  # file by file: a killed upload leaves no COMPLETE record, and the next one redoes it
        fs.create_dir(f"{root}/{name}".rsplit("/", 1)[0])  # a shared directory needs its parents; S3 makes markers
        pyarrow.fs.copy_files(str(files[name]), f"{root}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
    with fs.open_output_stream(f"{root}/{COMPLETE}") as out:
        out.write(json.dumps(record, indent=1, sort_keys=True).encode())
    return uri


def node_cache() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / f"dit-node-cache-{os.getuid()}")
    root.mkdir(parents=True, exist_ok=True)
    return root


def on_this_node(location: str | Path) -> Path:
    """The local directory of `location`: a driver path as it is, a published URI as this node's cached copy."""
    if not is_location(str(location)):
        return Path(location)
    import pyarrow.fs

    kind, sha = str(location).rstrip("/").rsplit("/", 2)[-2:]
    target = node_cache() / kind / sha
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the node's other workers wait here
        if (target / COMPLETE).is_file():
            return target
        fs, root = pyarrow.fs.FileSystem.from_uri(str(location))
        try:
            with fs.open_input_stream(f"{root}/{COMPLETE}") as f:
                record = json.loads(f.read())
        except (FileNotFoundError, OSError) as e:
            raise ArtifactError(f"{location} is not a whole published artifact (no {COMPLETE}): publish it again "
                                f"from the driver ({e})") from e
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{sha}."))
        try:
            local = pyarrow.fs.LocalFileSystem()
            for name in record:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                pyarrow.fs.copy_files(f"{root}/{name}", str(tmp / name), source_filesystem=fs,
                                      destination_filesystem=local)
            _check(tmp, record, str(location))
            (tmp / COMPLETE).write_text(json.dumps(record, indent=1, sort_keys=True))
            tmp.chmod(0o755)
            if target.exists():  # a copy without its record: a download killed before the rename cannot leave one
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _check(directory: Path, record: dict, location: str) -> None:
    """The downloaded files are those the record lists, byte for byte, and the record hashes to the location's name."""
    got = file_record({name: directory / name for name in record})
    bad = [name for name in record if got[name] != record[name]]
    if bad or record_hash(record) != location.rstrip("/").rsplit("/", 1)[-1]:
        raise ArtifactError(f"{location} differs from its name's hash or its {COMPLETE} record ({bad or 'the record'}):"
                            " the storage copy is damaged; delete that location and rerun the stage to publish it again")

"""Artifacts that every node of a cluster reads, through storage that every node reaches, not the driver's disk.

On one machine (or nodes sharing a file system) a Ray worker reads the DVC workspace directly: `data/latents`,
`models/vae`, `models/dit`, `data/images`. On a cluster whose nodes hold no copy of the workspace, a stage with a
`storage_path` (`s3://bucket/prefix`, or a directory every node mounts) instead:

1. publishes the directory from the driver: `publish` uploads its files to `<storage>/<kind>/<sha256 of the dir>/`,
   then a `COMPLETE` record listing every file with its size and hash. A location with that record is whole, and
   its name says its content, so a later run (or stage) with the same bytes uploads nothing;
2. hands the workers the location (a URI) instead of a path;
3. each worker calls `on_this_node(location)`: the first one on a node downloads it into the node's cache
   (`DIT_NODE_CACHE`, default `<tmp>/dit-node-cache-<uid>`, private to the user), under a file lock, into a temp
   directory that is checked against the record and then renamed into place; the node's other workers wait for it
   and find it there. The record is checked before anything is downloaded (see `on_this_node`).

So a node downloads each artifact once, whatever its number of workers, and the workers memory-map the same local
files (the latents: one copy in the node's page cache, pipeline/formats/latents.py). S3 credentials come from each
node's environment, as for Ray Train's storage (pipeline/checkpoint_storage.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
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
        pyarrow.fs.copy_files(
            str(files[name]),
            f"{root}/{name}",
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    with fs.open_output_stream(f"{root}/{COMPLETE}") as out:
        out.write(json.dumps(record, indent=1, sort_keys=True).encode())
    return uri


def node_cache() -> Path:
    """This user's node cache: created private (0700), and refused when another user owns it or can write to it,
    since every file in it is loaded (memory-mapped latents, VAE and DiT weights) without a second check."""
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / f"dit-node-cache-{os.getuid()}")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ArtifactError(
            f"the node cache {root} is not a private directory of this user (uid {os.getuid()}): it is "
            f"{'a directory' if stat.S_ISDIR(info.st_mode) else 'not a directory'} owned by uid {info.st_uid} with "
            f"mode {stat.S_IMODE(info.st_mode):o}, so another user may have made it or written to it. Remove it, or "
            f"set {CACHE_ENV} to a directory only you can write"
        )
    if info.st_mode & 0o077:
        root.chmod(0o700)  # readable by others (an earlier version made it so), writable by no one else
    return root


def on_this_node(location: str | Path) -> Path:
    """The local directory of `location`: a driver path as it is, a published URI as this node's cached copy.

    The location's `COMPLETE` record is checked before the first byte is downloaded: it must hash to the location's
    name and list only plain relative names, so a hostile or damaged record can neither write outside the cache nor
    swap the content. A cached copy is used when its record is the location's and its files have the recorded sizes
    (sizes, not hashes: the cache is private to this user, and hashing tens of GB of latents per worker start would
    cost minutes; the hashes were checked when the copy was downloaded)."""
    if not is_location(str(location)):
        return Path(location)
    import pyarrow.fs

    kind, sha = _location_name(str(location))
    target = node_cache() / kind / sha
    if _cached(target, sha):
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(target.parent / f".{sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the node's other workers wait here
        if _cached(target, sha):
            return target
        fs, root = pyarrow.fs.FileSystem.from_uri(str(location))
        try:
            with fs.open_input_stream(f"{root}/{COMPLETE}") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
        except (FileNotFoundError, OSError) as e:
            raise ArtifactError(
                f"{location} is not a whole published artifact (no {COMPLETE}): publish it again from the driver ({e})"
            ) from e
        record = check_record(raw, sha, str(location))
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{sha}."))
        try:
            _download(fs, root, record, tmp, str(location))
            _check(tmp, record, str(location))
            (tmp / COMPLETE).write_text(json.dumps(record, indent=1, sort_keys=True))
            tmp.chmod(0o755)
            if target.exists():  # a copy that failed `_cached`: a damaged or partial one, replaced here
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


MAX_RECORD_BYTES = 64 << 20  # a COMPLETE record lists names, sizes and hashes: ~150 bytes a file
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[A-Za-z0-9_.-]+")


def _location_name(location: str) -> tuple[str, str]:
    """(kind, sha256) of `<storage>/<kind>/<sha256>`, each a single plain path component of the node cache."""
    kind, sha = location.rstrip("/").rsplit("/", 2)[-2:]
    if not _SHA256.fullmatch(sha) or not _KIND.fullmatch(kind) or kind in (".", ".."):
        raise ArtifactError(
            f"{location} is not a published location (<storage>/<kind>/<sha256 of its files>); "
            "pass the URI that `publish` returned"
        )
    return kind, sha


def safe_name(name: object) -> str:
    """A record's file name, if it is a plain relative path that stays inside the directory it is joined to."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or name == COMPLETE
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ArtifactError(f"a {COMPLETE} record names the file {name!r}, which is not a plain relative path")
    return name


def check_record(raw: bytes, sha: str, location: str) -> dict:
    """The parsed `COMPLETE` record of `location`, if it is one: safe names, integer sizes, sha256 hashes, and the
    record hashes to the location's name `sha`. Raises ArtifactError otherwise."""
    fix = "the storage copy is damaged or was not written by `publish`; delete that location and rerun the stage"
    if len(raw) > MAX_RECORD_BYTES:
        raise ArtifactError(f"{location}/{COMPLETE} is over {MAX_RECORD_BYTES} bytes; {fix}")
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{location}/{COMPLETE} is not JSON ({e}); {fix}") from e
    if not isinstance(record, dict) or not all(
        isinstance(v, dict)
        and set(v) == {"size", "sha256"}
        and type(v["size"]) is int
        and v["size"] >= 0
        and isinstance(v["sha256"], str)
        and _SHA256.fullmatch(v["sha256"])
        for v in record.values()
    ):
        raise ArtifactError(f"{location}/{COMPLETE} is not a record of {{name: {{size, sha256}}}}; {fix}")
    for name in record:
        safe_name(name)
    if record_hash(record) != sha:
        raise ArtifactError(f"{location}/{COMPLETE} does not hash to the location's name; {fix}")
    return record


def inside(directory: Path, name: str) -> Path:
    """`directory / name` for a `safe_name`, checked to resolve inside `directory` (no symlink leads out)."""
    path = directory / safe_name(name)
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ArtifactError(f"{path} resolves outside {directory}")
    return path


def _download(fs, root: str, record: dict, tmp: Path, location: str) -> None:
    """Copy each file of `record` from `root` on `fs` into `tmp`, refusing a file larger than its record says
    before it is copied (a hostile store cannot fill the node's disk past the record's total)."""
    import pyarrow.fs

    local = pyarrow.fs.LocalFileSystem()
    for name in record:
        info = fs.get_file_info(f"{root}/{name}")
        if info.type != pyarrow.fs.FileType.File or info.size != record[name]["size"]:
            found = f"{info.size} bytes" if info.type == pyarrow.fs.FileType.File else "missing"
            raise ArtifactError(
                f"{location}/{name} is {found}, its {COMPLETE} record says {record[name]['size']} "
                "bytes: the storage copy is damaged; delete that location and rerun the stage to "
                "publish it again"
            )
        dest = inside(tmp, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(f"{root}/{name}", str(dest), source_filesystem=fs, destination_filesystem=local)


def _cached(target: Path, sha: str) -> bool:
    """Whether `target` holds a whole copy of the location named `sha`: its record is the location's, and every
    file is there with the recorded size."""
    try:
        record = check_record((target / COMPLETE).read_bytes(), sha, str(target))
        return all(inside(target, name).stat().st_size == entry["size"] for name, entry in record.items())
    except (OSError, ArtifactError):
        return False


def _check(directory: Path, record: dict, location: str) -> None:
    """The downloaded files are those the record lists, byte for byte."""
    got = file_record({name: directory / name for name in record})
    bad = [name for name in record if got[name] != record[name]]
    if bad:
        raise ArtifactError(
            f"{location} differs from its {COMPLETE} record ({bad}): the storage copy is damaged; "
            "delete that location and rerun the stage to publish it again"
        )

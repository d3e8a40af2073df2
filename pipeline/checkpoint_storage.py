"""Where a training run's checkpoints live while it trains.

- `train.storage_path` empty: the stage's own checkpoint directory (`models/checkpoints`), written by rank 0. Every
  worker must reach it: one machine, or a file system all nodes share.
- `train.storage_path` set (`s3://bucket/prefix`, or a directory every node mounts): Ray Train's persistent
  storage. Rank 0 hands each checkpoint to `ray.train.report`, which uploads it to `<storage>/<run>/ckpt-<step>`;
  a restarted worker group reads the latest one back with `ray.train.get_checkpoint()`. No worker touches the
  driver's file system for checkpoints: the driver seeds the run with the latest checkpoint of
  `models/checkpoints` (uploaded to `<storage>/<run>/initial/`), and fills `models/checkpoints` from the run's kept
  checkpoints after it ends, so the DVC output, `dvc push` and the curve stage see the same files as without it.

S3 settings come from the environment, as for every pyarrow / boto user: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for an S3-compatible server. Each node's Ray must be started with them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.artifacts import atomic_torch_save
from pipeline.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from pipeline.shared_storage import location_uri

INITIAL = "initial"  # the run's sub-directory holding the checkpoint it starts from


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


class LocalCheckpoints:
    """`models/checkpoints` itself: rank 0 writes there, every rank resumes from there."""

    def __init__(self, directory: str | Path, keep: int, rank: int):
        self.directory, self.keep, self.rank = Path(directory), keep, rank

    def latest(self) -> tuple[dict | None, str | None]:
        ckpt, path = latest_checkpoint(self.directory)
        return ckpt, (str(path) if path else None)

    def clear_interrupted_writes(self) -> None:
        for stale in self.directory.glob(".ckpt-*.tmp"):  # left by a process killed mid-write
            stale.unlink()

    def save(self, step: int, payload: dict | None) -> None:
        if self.rank == 0:
            save_checkpoint(self.directory, payload, self.keep)


class RayStorageCheckpoints:
    """Ray Train's persistent storage (`train.storage_path`). Every rank calls `save` at a checkpoint step (Ray
    Train's report is collective); only rank 0 passes a payload."""

    def __init__(self, rank: int, initial_uri: str | None):
        self.rank, self.initial_uri = rank, initial_uri

    def latest(self) -> tuple[dict | None, str | None]:
        import ray.train

        reported = ray.train.get_checkpoint()  # set after a worker-group restart within this run
        if reported is not None:
            return _load_from(reported.filesystem, reported.path), f"{reported.path} (Ray Train storage)"
        if self.initial_uri:  # the latest checkpoint of models/checkpoints, uploaded by the driver
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(self.initial_uri)
            return _load_from(fs, path), self.initial_uri
        return None, None

    def clear_interrupted_writes(self) -> None:
        pass  # a report is uploaded whole or not at all

    def save(self, step: int, payload: dict | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        name = checkpoint_name(step)
        if payload is None:
            ray.train.report({"step": step}, checkpoint=None, checkpoint_dir_name=name)
            return
        staging = Path(tempfile.mkdtemp(prefix="dit-ckpt-"))
        try:
            atomic_torch_save(staging / f"{name}.pt", payload)
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(staging), checkpoint_dir_name=name)
        finally:  # the synchronous report has uploaded it
            shutil.rmtree(staging, ignore_errors=True)


def _checkpoint_file(fs, directory: str):
    """The one ckpt-*.pt file of a reported checkpoint directory on `fs`."""
    import pyarrow.fs

    files = [
        f
        for f in fs.get_file_info(pyarrow.fs.FileSelector(directory))
        if f.type == pyarrow.fs.FileType.File and f.base_name.startswith("ckpt-") and f.base_name.endswith(".pt")
    ]
    if len(files) != 1:
        raise FileNotFoundError(f"{directory} holds {len(files)} ckpt-*.pt files, expected one")
    return files[0]


def _download(fs, source: str, target: Path) -> None:
    """Copy `source` on `fs` to `target` atomically (a hidden temp file beside it, then a rename)."""
    import pyarrow.fs

    tmp = target.with_name(f".{target.name}.download")
    pyarrow.fs.copy_files(source, str(tmp), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    os.replace(tmp, target)


def _load_from(fs, directory: str) -> dict:
    """The checkpoint reported under `directory` of `fs`, read through a local temp copy."""
    info = _checkpoint_file(fs, directory)
    with tempfile.TemporaryDirectory(prefix="dit-ckpt-") as tmp:
        local = Path(tmp) / info.base_name
        _download(fs, info.path, local)
        return load_checkpoint(local)  # mmap'd: Linux keeps the pages readable after the temp dir goes


def worker_store(config: dict, keep: int, rank: int):
    """The store the training loop of `config` uses on this worker."""
    if config.get("storage"):
        return RayStorageCheckpoints(rank, config["storage"].get("initial"))
    return LocalCheckpoints(config["checkpoints"], keep, rank)


# --- the driver ---------------------------------------------------------------------------------------------------


def seed_run(storage_path: str, run_name: str, checkpoints_dir: str | Path) -> str | None:
    """Upload the latest checkpoint of `checkpoints_dir` (already checked resumable) to the run's storage; its URI,
    or None when there is none (a fresh run)."""
    ckpts = list_checkpoints(checkpoints_dir)
    if not ckpts:
        return None
    import pyarrow.fs

    uri = f"{location_uri(storage_path)}/{run_name}/{INITIAL}"
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path)
    pyarrow.fs.copy_files(
        str(ckpts[-1]),
        f"{path}/{ckpts[-1].name}",
        source_filesystem=pyarrow.fs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    return uri


def fill_local(best_checkpoints: list, checkpoints_dir: str | Path, keep: int) -> list[Path]:
    """Copy the files of the run's kept checkpoints (Ray Train's `Result.best_checkpoints`) into
    `checkpoints_dir`, byte for byte and atomically, then keep its latest `keep` files, as a local run leaves it.
    Returns the files copied."""
    directory = Path(checkpoints_dir)
    copied = []
    for checkpoint, _ in best_checkpoints:
        info = _checkpoint_file(checkpoint.filesystem, checkpoint.path)
        _download(checkpoint.filesystem, info.path, directory / info.base_name)
        copied.append(directory / info.base_name)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return copied

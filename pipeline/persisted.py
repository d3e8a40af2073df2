"""Persisted sets that outlive a stage run: moved aside when they no longer match, never deleted.

A long run's progress (train's checkpoints, the shards of sample, encode and reference) survives a kill in a
directory DVC never deletes (`persist: true`). When a rerun finds a set it cannot continue (other params, inputs,
code or packages), the set is renamed, whole and at once, to `<parent>/superseded/<name>/` beside the stage's
output (`models/superseded/`, `data/superseded/`): outside every DVC output, ignored by git and DVC, on the same
file system so that the move is a rename. `<name>` says what made the set (`train-<hash of its run>`,
`sample-<settings key>`, ...), suffixed `.2`, `.3`, ... rather than ever replacing an earlier set, and holds the
moved directory under its own name plus `superseded.json` (from where, when, why). A set moved aside still holds
its disk space, so a stage that starts afresh first checks that the new run fits in what is left
(`check_free_space`). `python -m pipeline.superseded` lists, restores and removes these sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.artifacts import ArtifactError, atomic_write_json
from pipeline.code_stamp import STAMP_FILE, stamp_mismatch

SUPERSEDED = "superseded"  # the directory beside a stage's outputs that holds the sets moved aside
RECORD = "superseded.json"  # in each moved set: moved_from (relative to the superseded root's parent), why, when
CLI = "python -m pipeline.superseded"


def superseded_root(persisted: str | Path) -> Path:
    """Where sets of the persisted directory `persisted` (a DVC output, e.g. models/checkpoints) are moved:
    `superseded/` beside it."""
    return Path(persisted).parent / SUPERSEDED


def tree_bytes(path: Path) -> int:
    """Bytes held by the files under `path` (or by the file `path`); links are not followed."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _claim(root: Path, name: str) -> Path:
    """Create and return `root/name`, or `root/name.2`, `.3`, ... when taken: mkdir is atomic, so two stages moving
    sets at once never share a name, and an earlier set is never replaced."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        target = root / (name if n == 1 else f"{name}.{n}")
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise ArtifactError(f"{root} holds 9,999 sets named {name}*: remove some with `{CLI} remove`")


def move_aside(directory: str | Path, root: Path, name: str, why: list[str]) -> Path:
    """Rename `directory` to `root/<name>[.n]/<directory's name>`, after recording where it came from and why.
    Returns its new path. The rename moves the whole set at once; across file systems it is refused, since a copy
    would be neither atomic nor free."""
    directory = Path(directory)
    target = _claim(root, name)
    atomic_write_json(
        target / RECORD,
        {
            "moved_from": os.path.relpath(directory.resolve(), root.resolve().parent),
            "moved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "why": why,
        },
    )
    try:
        os.rename(directory, target / directory.name)
    except OSError as e:
        (target / RECORD).unlink()
        target.rmdir()
        raise ArtifactError(
            f"cannot move {directory} aside to {target} ({e.strerror}): {root} must be on the same "
            f"file system as {directory}; move or remove {directory} yourself"
        ) from e
    return target / directory.name


def superseded_sets(root: Path) -> list[dict]:
    """The sets under `root`, by name: {name, path, bytes, moved_from, moved_at, why} (None where not recorded)."""
    sets = []
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        record = json.loads((entry / RECORD).read_text()) if (entry / RECORD).is_file() else {}
        sets.append(
            {
                "name": entry.name,
                "path": entry,
                "bytes": tree_bytes(entry),
                "moved_from": record.get("moved_from"),
                "moved_at": record.get("moved_at"),
                "why": record.get("why"),
            }
        )
    return sets


def check_free_space(directory: Path, need_bytes: int, what: str, root: Path) -> None:
    """Refuse to start afresh in `directory` when `need_bytes` (the estimate of `what`) exceed the free space of its
    file system, naming what the superseded sets under `root` hold."""
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        held = sum(s["bytes"] for s in superseded_sets(root))
        raise ArtifactError(
            f"not enough disk for a fresh run in {directory}: {what} needs about {human(need_bytes)}, "
            f"{human(free)} is free; the superseded sets in {root} hold {human(held)}: see `{CLI} list`, "
            f"then `{CLI} remove NAME` for those you no longer need"
        )


def held_note(root: Path) -> str:
    return f"superseded sets in {root} hold {human(sum(s['bytes'] for s in superseded_sets(root)))} in all"


def continue_hint(moved: Path, original: Path) -> str:
    return (
        f"to continue it, `{CLI} restore {moved.parent.name}` (it moves the current set aside, then "
        f"`mv {moved} {original}`)"
    )


# --- keyed shard directories ---------------------------------------------------------------------------------------


def open_keyed_dir(
    shards_root: str | Path,
    key: str,
    aside_to: Path,
    label: str,
    code_stamp: dict | None = None,
    across_versions: bool = False,
    need_bytes: Callable[[int], int] | None = None,
) -> Path:
    """`shards_root/key`, the finished shards of one setting (`key` hashes what determines them), ready to resume.

    Directories of other keys under `shards_root`, and `key`'s own shards when `code_stamp` differs from the one
    they were made with (unless `across_versions`), are moved aside to `aside_to` (`superseded_root` of the DVC
    output) and the stage prints one line saying so; `need_bytes(moved_bytes)` estimates the fresh run, checked
    against the free disk. Temp files of killed writes are removed. `label` names the stage (`sample`, `encode`, ...).
    """
    shards_root, root = Path(shards_root), Path(aside_to)
    shards_root.mkdir(parents=True, exist_ok=True)
    target = shards_root / key
    stale = {d: ["other settings"] for d in sorted(shards_root.iterdir()) if d.name != key}
    why = _stamp_why(target, code_stamp) if code_stamp is not None else []
    if why and across_versions:
        print(f"[{label}] resuming {target} across versions, as asked ({'; '.join(why)})")
    elif why:
        stale[target] = why
    if stale:
        sizes = {d: tree_bytes(d) for d in stale}
        if need_bytes is not None:  # checked before moving: a refused run leaves every set where it was
            check_free_space(shards_root, need_bytes(max(sizes.values())), f"{label}'s shards", root)
        moved = {move_aside(d, root, f"{label}-{d.name}", reasons): d for d, reasons in stale.items()}
        first, original = next(iter(moved.items()))
        reasons = sorted({r for d in stale.values() for r in d})
        print(
            f"[{label}] moved {len(moved)} shard set(s) made by {'; '.join(reasons)} aside to "
            f"{', '.join(str(m.parent) for m in moved)} ({human(sum(sizes.values()))}; {held_note(root)}); "
            f"{continue_hint(first, original)}"
            + ("; after a code or package change only, --resume-across-versions keeps them" if why else "")
        )
    target.mkdir(parents=True, exist_ok=True)
    for tmp in target.glob(".*.tmp"):  # left by a process killed mid-write
        tmp.unlink()
    if code_stamp is not None:
        atomic_write_json(target / STAMP_FILE, code_stamp)
    return target


def _stamp_why(target: Path, code_stamp: dict) -> list[str]:
    """Why the shards in `target` were not made by `code_stamp`'s code and packages (empty: they were, or none)."""
    record = target / STAMP_FILE
    files = (
        [f for f in target.iterdir() if f.is_file() and f != record and not f.name.startswith(".")]
        if target.is_dir()
        else []
    )
    return stamp_mismatch(json.loads(record.read_text()) if record.exists() else None, code_stamp) if files else []


# --- a checkpoint set ----------------------------------------------------------------------------------------------


def run_name(record: dict) -> str:
    """A short hash of what defines a run (its checkpoint's train params, model config, latents and code stamp), so
    the sets of two runs get two names and a set's name says which run it was."""
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def move_checkpoints_aside(directory: str | Path, name: str, why: list[str], label: str = "train") -> Path:
    """Move the checkpoint directory `directory` (every checkpoint of one run) aside as `name` and recreate it empty;
    prints the stage's one line. Returns the set's new path."""
    directory = Path(directory)
    root = superseded_root(directory)
    count, size = len(list(directory.glob("ckpt-*.pt"))), tree_bytes(directory)
    moved = move_aside(directory, root, name, why)
    directory.mkdir()
    print(
        f"[{label}] moved {count} checkpoints of another run ({'; '.join(why)}) aside to {moved} "
        f"({human(size)}; {held_note(root)}), and training starts afresh; {continue_hint(moved, directory)}; "
        "when only code or packages changed, restore it and rerun with --resume-across-versions"
    )
    return moved

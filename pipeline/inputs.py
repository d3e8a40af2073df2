"""Reading untrusted input files for `ingest` within bounds: nothing outside the allowed roots is read, only regular
files of at most `max_file_bytes`, and a folder tree is listed without following links out of it; what cannot be
read becomes a `Skip` with a reason instead of an exception, so the ingest stage can count it in `skipped.json`.

The reasons given here: `outside_root` (a link, or a dataset row's path, that leads outside the allowed roots),
`symlinked_folder` (a linked folder: never descended, it could loop or leave the root), `unreadable_folder`,
`unreadable`, `not_a_file` (a FIFO, a device, a folder), `file_too_large`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple


class Skip(NamedTuple):
    """An input rejected before it is read: the work item's payload in place of its bytes or path."""

    reason: str
    detail: str


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def real_roots(*roots: str | Path | None) -> tuple[str, ...]:
    """The allowed roots as resolved absolute paths (links resolved), for `inside`."""
    return tuple(os.path.realpath(r) for r in roots if r is not None)


def inside(path: str | Path, roots: tuple[str, ...]) -> str | None:
    """`path` with every link resolved, if that lies inside one of `roots` (from `real_roots`); else None."""
    real = os.path.realpath(path)
    return real if any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots) else None


def read_file(path: str, roots: tuple[str, ...], max_file_bytes: int) -> bytes:
    """The bytes of the regular file at `path` (resolved inside `roots`), at most `max_file_bytes` of them.

    The file is opened once, without following a last link (the path is resolved already) and without blocking
    (a FIFO would wait for a writer forever), and its type and size are checked on that open file, so what is
    checked is what is read. Raises `Rejected` with the reason."""
    real = inside(path, roots)
    if real is None:
        raise Rejected("outside_root", f"{path} resolves to {os.path.realpath(path)}, outside {', '.join(roots)}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Rejected("not_a_file", f"{path} is not a regular file (mode {stat.filemode(info.st_mode)})")
        check_size(info.st_size, max_file_bytes)
        data = f.read(max_file_bytes + 1)  # a file that grew after the fstat is still bounded
    check_size(len(data), max_file_bytes)
    return data


def check_size(size: int, max_file_bytes: int) -> None:
    if size > max_file_bytes:
        raise Rejected("file_too_large", f"{size} bytes > ingest.max_file_bytes = {max_file_bytes}")


def list_files(root: Path, folder: Path, extensions: tuple[str, ...]) -> list[tuple[str, str | Skip]]:
    """(key, path or Skip) of every file under `folder` whose suffix is in `extensions`, and a Skip for each
    subfolder that cannot be listed or is a link, keyed by their path relative to `root`, in key order. A linked
    file is listed by its resolved path if that lies inside `root`, else as a Skip."""
    roots = real_roots(root)
    found: list[tuple[str, str | Skip]] = []

    def key(path: str | Path) -> str:
        return Path(path).relative_to(root).as_posix()

    def unreadable(error: OSError) -> None:
        skip = Skip("unreadable_folder", f"{type(error).__name__}: {error.strerror}")
        found.append((key(error.filename) + "/", skip))

    for current, dirs, files in os.walk(folder, onerror=unreadable):  # links to folders are listed, not descended
        for name in dirs:
            if os.path.islink(os.path.join(current, name)):
                target = os.path.realpath(os.path.join(current, name))
                found.append((key(os.path.join(current, name)) + "/", Skip("symlinked_folder", f"links to {target}")))
        for name in files:
            path = os.path.join(current, name)
            if not name.lower().endswith(extensions):
                continue
            if os.path.islink(path) and inside(path, roots) is None:
                found.append((key(path), Skip("outside_root", f"links to {os.path.realpath(path)}, outside {root}")))
            else:
                found.append((key(path), path))
    return sorted(found, key=lambda item: item[0])

"""One registry decision at a time per tracking store on this host: an exclusive `fcntl.flock` on a lock file named
after the store.

A registration reads and then writes the registry (find this checkpoint's version or create it, read `champion`,
compare, move the alias, append to `champion_history`), and MLflow has no transaction around those calls: two
`register` runs at once (parallel `dvc exp run` workers, two shells) could each create a version of the same
checkpoint and move `champion` on a stale comparison. Every run on one host takes this lock first. The kernel drops
it when its holder exits, even on SIGKILL, so a crashed run never blocks the next.

Runs on several hosts sharing one tracking server do not see each other's lock; docs/reliability.md states that
limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def lock_path(store_uri: str) -> Path:
    """Beside a sqlite database (so every user of that file shares it); else in the temp directory, one per store
    (named by a hash: no credentials in a file name)."""
    if store_uri.startswith("sqlite:///"):
        database = Path(store_uri.removeprefix("sqlite:///"))
        return database.with_name(database.name + ".register.lock")
    digest = hashlib.sha256(store_uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dit-register-{digest}.lock"


@contextmanager
def registry_lock(store_uri: str) -> Iterator[None]:
    """Hold the host-wide lock of `store_uri` (a public URI, `tracking.public_uri`) for the block; waits for a
    holder, saying so."""
    path = lock_path(store_uri)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file (umask made it read-only): flock works on a read descriptor
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"[register] another registration to this store is running on this host: waiting for {path}", flush=True
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock

"""pipeline/artifacts.py: an atomic write is durable once it returns (the file, then its folder, is flushed), and
the temp files and folders that a SIGKILL leaves are removed when a stage starts, and nothing else is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline import artifacts


@pytest.fixture
def events(monkeypatch):
    """Each fsync (of a file or of a folder, by inode) and each rename, in order."""
    log = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def spy_fsync(fd):
        log.append(("fsync", os.fstat(fd).st_ino))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append(("rename", str(b))), replace(a, b))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (log.append(("rename", str(b))), rename(a, b))[1])
    return log


def test_atomic_write_flushes_the_folder_after_the_rename(tmp_path, events):
    path = artifacts.atomic_write_json(tmp_path / "out" / "m.json", {"a": 1})
    assert events == [("fsync", path.stat().st_ino), ("rename", str(path)), ("fsync", path.parent.stat().st_ino)]


def test_staged_dir_flushes_the_parent_after_the_rename(tmp_path, events):
    out = tmp_path / "images"
    with artifacts.staged_dir(out) as tmp:
        (tmp / "a").write_text("x")
    assert events[-2:] == [("rename", str(out)), ("fsync", tmp_path.stat().st_ino)]


def killed_midway(tmp_path, code: str) -> None:
    """Run `code` in a process that SIGKILLs itself inside the write, as the OOM killer or a preempted node would."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from pipeline import artifacts
        def die(*_):
            os.kill(os.getpid(), signal.SIGKILL)
        root = Path({str(tmp_path)!r})
        {code}
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), check=False)
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_stage_leaves_temps_that_the_next_start_removes(tmp_path):
    out, metrics = tmp_path / "data" / "images", tmp_path / "metrics" / "ingest.json"
    out.mkdir(parents=True)
    killed_midway(tmp_path, "artifacts.atomic_write(root / 'data/images/shard-00000.parquet', die)")
    killed_midway(tmp_path, "artifacts.atomic_write(root / 'metrics/ingest.json', die)")
    killed_midway(tmp_path, "with artifacts.staged_dir(root / 'data/images') as t: (t / 'x').write_text('x'); die()")
    left = sorted(tmp_path.rglob(".*"))
    assert len(left) == 3, left  # the shard's temp file, the metrics' one, the staged folder
    keep = [
        out / "shard-00001.parquet",
        out / ".keep",
        tmp_path / "data" / ".latents.abcd1234",
        tmp_path / "metrics" / ".train.json.abcd1234.tmp",
        tmp_path / "data" / "images.abcd1234",
    ]
    for path in keep:  # real files, another stage's temps, names that are not this module's
        path.write_text("keep")

    assert sorted(artifacts.remove_stale_temps(out, metrics)) == left
    assert not any(p.exists() for p in left)
    assert all(p.read_text() == "keep" for p in keep)
    assert artifacts.remove_stale_temps(tmp_path / "absent" / "out") == []  # a first run: nothing there yet

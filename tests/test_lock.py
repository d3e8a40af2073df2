"""The dependency locks (requirements/): compiled from the current pyproject.toml, consistent with each other, and what
the running venv has installed, version for version."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lockfile", ROOT / "requirements" / "lockfile.py")
lockfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockfile)

LOCK, LOCK_GPU = ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "lock-gpu.txt"


def test_locks_match_pyproject():
    for path in (LOCK, LOCK_GPU):
        lockfile.check(path)
    lockfile.check_consistent([LOCK, LOCK_GPU])
    # gpu adds torchao and nothing else changes
    assert set(lockfile.pins(LOCK_GPU)) - set(lockfile.pins(LOCK)) == {"torchao"}


def test_a_changed_dependency_fails_the_check():
    spec = lockfile.dependency_spec()
    spec["dependencies"] = spec["dependencies"] + ["einops>=0.8"]
    with pytest.raises(lockfile.LockError, match="other dependencies than pyproject.toml's: run `make lock`"):
        lockfile.check(LOCK, spec)


def test_a_pin_outside_its_range_fails_the_check(tmp_path):
    spec = lockfile.dependency_spec()
    spec["dependencies"] = [d if not d.startswith("numpy") else "numpy>=99" for d in spec["dependencies"]]
    # a lock stamped for this spec, as if pip-compile had been skipped and the stamp edited by hand
    stamp = lockfile.stamp_line("dev,s3", spec)
    text = re.sub(r"^# compiled from pyproject.toml .*$", stamp, LOCK.read_text(), flags=re.MULTILINE)
    (tmp_path / "lock.txt").write_text(text)
    with pytest.raises(lockfile.LockError, match=r"pins numpy==[\d.]+, which pyproject.toml's 'numpy>=99' excludes"):
        lockfile.check(tmp_path / "lock.txt", spec)


def _via(part: str) -> set[str]:
    """The packages a lock block names under `# via` (constraint files and the project itself left out)."""
    text = part.split("# via", 1)[1] if "# via" in part else ""
    names = {w for line in text.splitlines() for w in line.replace("#", " ").split()}
    return {lockfile.canonical(n) for n in names if re.fullmatch(r"[A-Za-z0-9][\w.-]*", n) and n != "dit-pipeline"}


@pytest.mark.parametrize("path", [LOCK, LOCK_GPU], ids=["lock", "lock-gpu"])
def test_keep_torch_drops_exactly_what_only_torch_needs(path):
    pinned = lockfile.blocks(path.read_text())[1]
    via = {name: _via(part) for name, _, part in pinned}
    family = {"torch", "torchvision"}
    while grown := {n for n, v in via.items() if n not in family and v and v <= family}:
        family |= grown
    assert {n for n in via if lockfile.in_torch_family(n)} == family
    kept = lockfile.blocks(lockfile.without_torch(path.read_text()))[1]
    assert {n for n, _, _ in kept} == set(via) - family and all("--hash=sha256:" in p for _, _, p in kept)


def test_venv_matches_its_lock():
    """The venv `make venv` built has exactly its lock's versions; one built otherwise is compared with the lock of
    the extras it has."""
    record = Path(sys.prefix) / "lock.txt"
    if record.exists():
        installed_from = record.read_text()
        keep_torch = "torch" not in lockfile.pins(record)
        committed = [p.read_text() for p in (LOCK, LOCK_GPU)]
        assert installed_from in (committed + [lockfile.without_torch(t) for t in committed]), (
            "the venv was built from another lock than the committed ones: `make venv` rebuilds it"
        )
    else:
        keep_torch = False
        record = LOCK_GPU if lockfile.frozen(False).get("torchao") else LOCK
    differences = lockfile.diff(lockfile.pins(record), lockfile.frozen(keep_torch), keep_torch)
    assert not differences, (
        f"this venv is not its lock ({record.name}); `rm -rf .venv && make test` rebuilds it:\n"
        + "\n".join(differences)
    )

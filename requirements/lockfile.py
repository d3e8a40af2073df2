"""The dependency locks: that each was compiled from the current pyproject.toml, the lock without torch (KEEP_TORCH=1),
and how an installed environment differs from a lock. See docs/environment.md.

Standard library only, plus `packaging` (which pip vendors), so that it runs before any venv exists:
    python3 requirements/lockfile.py check [LOCK ...]       exit 1 when a lock and pyproject.toml disagree
    python3 requirements/lockfile.py stamp LOCK EXTRAS      after pip-compile: record what the lock was compiled from
    python3 requirements/lockfile.py without-torch LOCK     the lock minus torch's family, on stdout
    python requirements/lockfile.py diff LOCK [--keep-torch] how this interpreter's environment differs from LOCK
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare python3 without packaging still has pip's copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCKS = {"requirements/lock.txt": "dev,s3", "requirements/lock-gpu.txt": "dev,gpu,s3"}
STAMP = "# compiled from pyproject.toml"
# The builds a user may bring (KEEP_TORCH=1): torch and whatever exists only for it. The wheels of a CUDA build carry
# their own CUDA (nvidia-*, cuda-*) and triton, pinned by that build; the lock's would not match it.
TORCH_FAMILY = ("torch", "torchvision", "triton", "pytorch-triton")
TORCH_PREFIXES = ("nvidia-", "cuda-")
# pip comes with the venv, not from the lock; the project is installed editable on top of the lock.
NOT_LOCKED = ("pip", "dit-pipeline")


class LockError(Exception):
    """A lock that does not match pyproject.toml or the installed environment; the message names the fix."""


def canonical(name: str) -> str:
    """PEP 503's normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def in_torch_family(name: str) -> bool:
    name = canonical(name)
    return name in TORCH_FAMILY or name.startswith(TORCH_PREFIXES)


# --- what a lock is compiled from ---------------------------------------------------------------------------------


def dependency_spec(pyproject: Path = PYPROJECT) -> dict:
    """The parts of pyproject.toml that decide the lock: Python, the build backend, the dependencies and the extras."""
    import tomllib

    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    return {
        "requires-python": project.get("requires-python"),
        "build-system.requires": data.get("build-system", {}).get("requires", []),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }


def spec_sha256(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def stamp_line(extras: str, spec: dict) -> str:
    return f"{STAMP} [{extras}], dependencies sha256 {spec_sha256(spec)}"


# --- reading a lock -----------------------------------------------------------------------------------------------


def blocks(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """A pip-compile lock as its header and its (name, version, text) blocks: each pin with its hashes and `# via`."""
    parts = re.split(r"^(?=[A-Za-z0-9])", text, flags=re.MULTILINE)
    header, pins = parts[0], []
    for part in parts[1:]:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", part)
        if not match:
            raise LockError(f"unexpected line in a lock: {part.splitlines()[0]!r}: run `make lock`")
        pins.append((canonical(match[1]), match[2], part))
    return header, pins


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock."""
    return {name: version for name, version, _ in blocks(path.read_text())[1]}


def without_torch(text: str) -> str:
    """The lock minus torch's family, still a hashed requirements file that pip installs."""
    header, pinned = blocks(text)
    return header + "".join(part for name, _, part in pinned if not in_torch_family(name))


# --- the checks ---------------------------------------------------------------------------------------------------


def check(path: Path, spec: dict | None = None) -> None:
    """Raise LockError unless the lock was compiled from pyproject.toml's current dependencies and pins a version of
    every requirement (for its extras, on this interpreter) that the requirement allows."""
    spec = spec or dependency_spec()
    header, pinned = blocks(path.read_text())
    label = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    match = re.search(rf"^{re.escape(STAMP)} \[([\w,]*)\], dependencies sha256 (\w+)$", header, flags=re.MULTILINE)
    if not match:
        raise LockError(f"{label} does not say what it was compiled from: run `make lock`")
    if match[2] != spec_sha256(spec):
        raise LockError(f"{label} was compiled from other dependencies than pyproject.toml's: run `make lock`")
    versions = {name: version for name, version, _ in pinned}
    if len(versions) != len(pinned):
        raise LockError(f"{label} pins a package twice: run `make lock`")
    for name, version, part in pinned:
        if "--hash=sha256:" not in part:
            raise LockError(f"{label} has no hash for {name}: run `make lock`")
    extras = match[1].split(",") if match[1] else []
    wanted = list(spec["dependencies"]) + [r for extra in extras for r in spec["optional-dependencies"][extra]]
    for line in wanted + list(spec["build-system.requires"]):
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        version = versions.get(canonical(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            raise LockError(
                f"{label} pins {req.name}=={version}, which pyproject.toml's {line!r} excludes: run `make lock`"
            )


def check_consistent(paths: list[Path]) -> None:
    """The locks agree on every package they share, so the extras change what is installed, never its version."""
    seen: dict[str, tuple[str, str]] = {}
    for path in paths:
        for name, version in pins(path).items():
            other = seen.setdefault(name, (version, path.name))
            if other[0] != version:
                raise LockError(f"{path.name} pins {name}=={version} but {other[1]} pins {other[0]}: run `make lock`")


def frozen(keep_torch: bool) -> dict[str, str]:
    """{canonical name: version} of this interpreter's environment as `pip freeze` lists it, the editable project left
    out; with keep_torch (a venv over a base Python's torch) what the venv imports from the base too."""
    local = [] if keep_torch else ["--local"]
    command = [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable", *local]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    have = {}
    for line in lines:
        name, sep, version = line.partition("==")
        if not sep:  # `name @ url`: installed from somewhere else than an index
            name, _, version = line.partition(" @ ")
            version = "@ " + version
        have[canonical(name.strip())] = version.strip()
    return have


def diff(locked: dict[str, str], have: dict[str, str], keep_torch: bool = False) -> list[str]:
    """Each difference between a lock and an environment, as `name: locked X, installed Y`. With keep_torch, torch's
    family is the user's and whatever else a base Python brings is theirs too: only the lock's other pins must match."""
    lines = []
    for name in sorted(set(locked) | set(have)):
        if name in NOT_LOCKED or locked.get(name) == have.get(name):
            continue
        if keep_torch and (in_torch_family(name) or name not in locked):
            continue
        lines.append(f"{name}: locked {locked.get(name, '-')}, installed {have.get(name, '-')}")
    return lines


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if command == "check":
            paths = [Path(a) for a in args] or [ROOT / p for p in LOCKS]
            for path in paths:
                check(path)
            check_consistent(paths)
        elif command == "stamp":
            path, extras = Path(args[0]), args[1]
            text = re.sub(rf"^{re.escape(STAMP)} .*\n", "", path.read_text(), flags=re.MULTILINE)
            first_pin = re.search(r"^[A-Za-z0-9]", text, flags=re.MULTILINE).start()
            path.write_text(text[:first_pin] + stamp_line(extras, dependency_spec()) + "\n" + text[first_pin:])
        elif command == "without-torch":
            sys.stdout.write(without_torch(Path(args[0]).read_text()))
        elif command == "diff":
            keep_torch = "--keep-torch" in args
            lines = diff(pins(Path(args[0])), frozen(keep_torch), keep_torch)
            print("\n".join(lines))
            return 1 if lines else 0
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The stamp of a persisted cache (checkpoints, sample, encode and reference shards): what made it besides its params
and inputs, and why a cache stamped otherwise belongs to another run.

The stamp is the producing stage's code fingerprint (pipeline/fingerprint.py: the same one DVC sees, blind to
comments, docstrings and layout, so a comment never sets a cache aside), its per-module hashes (which name what
changed), and the versions of the packages that change its numbers (`provenance.KEY_PACKAGES`). The fingerprint
files leave package versions out, so that they read the same on every machine; a persisted cache keeps them,
because resuming a half-made set under another torch would mix two numerics in one result.
"""

from __future__ import annotations

from pipeline.fingerprint import fingerprint
from pipeline.provenance import KEY_PACKAGES, package_versions

STAMP_FILE = "provenance.json"  # beside a set of shards: the stamp of the code that made them


def stamp(stage: str) -> dict:
    """`{"fingerprint", "code": {module: hash}, "packages"}` of the code and packages `stage` runs now."""
    code = fingerprint(stage)
    return {"fingerprint": code["fingerprint"], "code": code["modules"], "packages": package_versions(KEY_PACKAGES)}


def stamp_mismatch(old: dict | None, new: dict) -> list[str]:
    """Why a cache stamped `old` was not made by the code and packages of `new` (empty when it was)."""
    if not old or "fingerprint" not in old:
        return ["it records no code fingerprint (it predates them)"]
    why = []
    if old["fingerprint"] != new["fingerprint"]:
        changed = sorted(f for f in old["code"].keys() | new["code"].keys() if old["code"].get(f) != new["code"].get(f))
        why.append("code changed: " + ", ".join(changed))
    why += [
        f"{name} {old['packages'].get(name)} -> {version}"
        for name, version in new["packages"].items()
        if old["packages"].get(name) != version
    ]
    return why

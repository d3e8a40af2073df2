"""`python -m pipeline.superseded`: the sets that stages moved aside, and this node's cache of published artifacts,
with their sizes; removed, or a set moved back, only when asked.

    python -m pipeline.superseded list
    python -m pipeline.superseded restore NAME      # move the current set aside, then NAME back where it was
    python -m pipeline.superseded remove NAME...    # or: remove --all

Superseded sets live in `superseded/` beside each persisted DVC output of dvc.yaml (`models/superseded/`,
`data/superseded/`, `data/samples/superseded/`; pipeline/persisted.py), or in the `--root` directories given. The
node cache is `DIT_NODE_CACHE` (default `<tmp>/dit-node-cache-<uid>`, pipeline/shared_storage.py): each entry is
one published artifact that this node downloaded, which the next run downloads again if removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import yaml

from pipeline.artifacts import ArtifactError
from pipeline.persisted import (
    RECORD,
    human,
    move_aside,
    superseded_root,
    superseded_sets,
    tree_bytes,
)
from pipeline.shared_storage import COMPLETE, node_cache

CACHE_PREFIX = "node-cache"  # the names of node cache entries: node-cache/<kind>/<sha256>


def default_roots(dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """`superseded/` beside every `persist: true` output of `dvc_yaml`, as the stages place them."""
    if not dvc_yaml.is_file():
        raise ArtifactError(
            f"{dvc_yaml} is missing: run from the repository root, or name the superseded directories with --root"
        )
    roots = []
    for stage in (yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}).values():
        for out in stage.get("outs", []):
            if isinstance(out, dict) and any((opts or {}).get("persist") for opts in out.values()):
                roots += [superseded_root(path) for path in out]
    return sorted(set(roots))


def entries(roots: list[Path]) -> list[dict]:
    """Every superseded set under `roots` and every node cache entry: {name, path, bytes, note}."""
    found = [
        {
            **s,
            "note": f"from {s['moved_from']} at {s['moved_at']}: {'; '.join(s['why'] or [])}"
            if s["moved_from"]
            else "no record",
        }
        for root in roots
        for s in superseded_sets(root)
    ]
    cache = node_cache()
    for kind in sorted(d for d in cache.iterdir() if d.is_dir()) if cache.is_dir() else ():
        for entry in sorted(d for d in kind.iterdir() if d.is_dir()):
            whole = (entry / COMPLETE).is_file()
            found.append(
                {
                    "name": f"{CACHE_PREFIX}/{kind.name}/{entry.name}",
                    "path": entry,
                    "bytes": tree_bytes(entry),
                    "note": "node cache" if whole else "node cache: a download killed before it completed",
                }
            )
    return found


def find(found: list[dict], name: str) -> dict:
    """The entry called `name`, or the only one whose name starts with it."""
    exact = [e for e in found if e["name"] == name]
    matches = exact or [e for e in found if e["name"].startswith(name)]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise ArtifactError(
            f"{what} superseded set or node cache entry named {name!r}; see `python -m pipeline.superseded list`"
        )
    return matches[0]


def list_entries(found: list[dict]) -> None:
    for e in found:
        print(f"{e['name']:<40} {human(e['bytes']):>9}  {e['path']}  ({e['note']})")
    print(f"{len(found)} entries, {human(sum(e['bytes'] for e in found))} in all")


def remove(found: list[dict], names: list[str]) -> None:
    for e in [find(found, n) for n in names]:
        shutil.rmtree(e["path"])
        print(f"removed {e['name']} ({human(e['bytes'])}, {e['path']})")


def restore(found: list[dict], name: str) -> Path:
    """Move the set `name` back where it was moved from; the set there now, if any, is moved aside first."""
    entry = find(found, name)
    if entry["name"].startswith(CACHE_PREFIX + "/") or not entry.get("moved_from"):
        raise ArtifactError(
            f"{entry['name']} records no place to go back to (only superseded sets with {RECORD} can be restored)"
        )
    root = entry["path"].parent
    original = root.parent / entry["moved_from"]
    moved = entry["path"] / original.name
    occupied = any(original.iterdir()) if original.is_dir() else original.exists()
    if occupied:
        label = entry["name"].split("-", 1)[0]
        aside = move_aside(
            original,
            root,
            f"{label}-replaced-{time.strftime('%Y%m%d-%H%M%S')}",
            [f"replaced by {entry['name']}, restored"],
        )
        print(f"moved the current {original} aside to {aside}")
    elif original.is_dir():
        original.rmdir()  # empty: nothing to keep
    os.rename(moved, original)
    (entry["path"] / RECORD).unlink()
    entry["path"].rmdir()
    print(f"restored {entry['name']} to {original}")
    return original


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.superseded", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--root",
        action="append",
        type=Path,
        help="a superseded directory (repeatable); default: those beside dvc.yaml's persisted outputs",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the superseded sets and node cache entries, with their sizes")
    rm = sub.add_parser("remove", help="delete sets or cache entries, by name (or a unique prefix)")
    rm.add_argument("names", nargs="*")
    rm.add_argument("--all", action="store_true", help="every listed set and cache entry")
    back = sub.add_parser("restore", help="move a set back where it was, moving the current one aside")
    back.add_argument("name")
    args = ap.parse_args(argv)
    found = entries(args.root or default_roots())
    if args.command == "list":
        list_entries(found)
    elif args.command == "restore":
        restore(found, args.name)
    elif args.all == bool(args.names):
        ap.error("remove takes NAME... or --all, not both or neither")
    else:
        remove(found, [e["name"] for e in found] if args.all else args.names)


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)

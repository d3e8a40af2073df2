"""Sets moved aside, never deleted (pipeline/persisted.py): unique names, the disk check before a fresh start, and
`python -m pipeline.superseded` listing, restoring and removing them with the node cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from tiny_train import base_params, run

import pipeline.checkpoints as C
import pipeline.persisted as P
from pipeline.artifacts import ArtifactError, sha256_file

REPO = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


def test_a_set_moved_twice_under_one_name_never_replaces_the_first(tmp_path):
    root = tmp_path / "superseded"
    for content in ("first", "second"):
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "shard-00000.npz").write_text(content)
        P.move_aside(tmp_path / "shards", root, "sample-abc", ["other settings"])
    assert (root / "sample-abc" / "shards" / "shard-00000.npz").read_text() == "first"
    assert (root / "sample-abc.2" / "shards" / "shard-00000.npz").read_text() == "second"
    record = json.loads((root / "sample-abc.2" / P.RECORD).read_text())
    assert record["moved_from"] == "shards" and record["why"] == ["other settings"]


def test_a_fresh_training_run_that_does_not_fit_is_refused_and_nothing_moves(tmp_path, latents, monkeypatch):
    run(tmp_path, latents, base_params(train_steps=10))
    ckpts = tmp_path / "checkpoints"
    before = {f.name: sha256_file(f) for f in C.list_checkpoints(ckpts)}
    one = C.list_checkpoints(ckpts)[-1].stat().st_size
    p = base_params(train_steps=10, lr=2e-3, keep_checkpoints=3)
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: Usage(10**12, 0, 3 * one - 1))  # one byte short
    with pytest.raises(ArtifactError, match=r"not enough disk .*keep_checkpoints=3 .*superseded sets in .* hold"):
        run(tmp_path, latents, p, restart_on_mismatch=True)
    assert {f.name: sha256_file(f) for f in C.list_checkpoints(ckpts)} == before  # refused before moving
    assert not (tmp_path / "superseded").exists()
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: Usage(10**12, 0, 3 * one))  # just enough
    run(tmp_path, latents, p, restart_on_mismatch=True)
    assert len(list((tmp_path / "superseded").glob("train-*/checkpoints/ckpt-*.pt"))) == len(before)


def test_a_fresh_run_with_nothing_to_compare_is_sized_from_the_parameters(tmp_path, latents, monkeypatch):
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: Usage(10**12, 0, 1000))
    with pytest.raises(ArtifactError, match=r"not enough disk .*needs about [0-9.]+ MB, 1.0 KB is free"):
        run(tmp_path, latents, base_params(train_steps=10))


def cli(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIT_NODE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.superseded", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_lists_restores_and_removes_sets_and_cache_entries(tmp_path):
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    ckpts = repo / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (repo / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())  # where the stages put superseded sets
    (ckpts / "ckpt-0000010.pt").write_bytes(b"x" * 2000)
    P.move_aside(ckpts, repo / "models" / "superseded", "train-aaa", ["train.lr: 0.001 -> 0.002"])
    ckpts.mkdir()
    samples = repo / "data" / "samples" / "shards" / "k1"
    samples.mkdir(parents=True)
    (samples / "shard-00000.npz").write_bytes(b"y" * 3000)
    P.move_aside(samples, repo / "data" / "samples" / "superseded", "sample-k1", ["other settings"])
    (cache / "latents" / "f00d").mkdir(parents=True)
    (cache / "latents" / "f00d" / "latents-00000.safetensors").write_bytes(b"z" * 500)
    sizes = [
        P.tree_bytes(d)
        for d in (
            repo / "data" / "samples" / "superseded" / "sample-k1",
            repo / "models" / "superseded" / "train-aaa",
            cache / "latents" / "f00d",
        )
    ]

    listed = cli("list", cwd=repo, cache=cache)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[:-1]]
    assert [r[0] for r in rows] == ["sample-k1", "train-aaa", "node-cache/latents/f00d"]
    assert [" ".join(r[1:3]) for r in rows] == [P.human(n) for n in sizes] and sizes[0] > 3000
    assert listed.stdout.splitlines()[-1] == f"3 entries, {P.human(sum(sizes))} in all"
    assert "from checkpoints at " in listed.stdout and "train.lr: 0.001 -> 0.002" in listed.stdout

    (repo / "models" / "checkpoints" / "ckpt-0000005.pt").write_bytes(b"new run")
    restored = cli("restore", "train-aaa", cwd=repo, cache=cache)  # the current set goes aside, the old one back
    assert restored.returncode == 0, restored.stderr
    assert (repo / "models" / "checkpoints" / "ckpt-0000010.pt").read_bytes() == b"x" * 2000
    (replaced,) = (repo / "models" / "superseded").glob("train-replaced-*/checkpoints/ckpt-0000005.pt")
    assert replaced.read_bytes() == b"new run"

    missing = cli("remove", "nothing-of-that-name", cwd=repo, cache=cache)
    assert missing.returncode == 1 and missing.stderr.startswith("error: no superseded set")
    assert cli("remove", "sample-k1", "node-cache/latents", cwd=repo, cache=cache).returncode == 0
    assert not (repo / "data" / "samples" / "superseded" / "sample-k1").exists()
    assert not (cache / "latents" / "f00d").exists()
    assert cli("remove", "--all", cwd=repo, cache=cache).returncode == 0
    assert cli("list", cwd=repo, cache=cache).stdout.strip() == "0 entries, 0 B in all"
    assert (repo / "models" / "checkpoints" / "ckpt-0000010.pt").exists()  # the restored run is not an entry


def test_superseded_places_are_outside_every_output_and_ignored_by_git():
    import yaml

    from pipeline.superseded import default_roots

    outs = [
        Path(o if isinstance(o, str) else next(iter(o)))
        for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
        for o in stage.get("outs", [])
    ]
    roots = default_roots(REPO / "dvc.yaml")
    assert {r.as_posix() for r in roots} == {"models/superseded", "data/superseded", "data/samples/superseded"}
    assert not [(r, o) for r in roots for o in outs if o == r or o in r.parents or r in o.parents]
    probe = [f"{r.as_posix()}/x/ckpt-0000001.pt" for r in roots]
    ignored = subprocess.run(["git", "check-ignore", *probe], cwd=REPO, capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == probe

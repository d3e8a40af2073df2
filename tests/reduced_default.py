"""The reduced offline default that the end-to-end tests run with `dvc repro` in a fresh copy of the repository, and
how two runs' outputs are compared: which files and fields may differ (measured time, MLflow run ids), and bitwise
equality of everything else, checkpoints included. One such run is shared by the session (`FirstRun`,
`first_run`, conftest's `reduced_run`): a test that changes the repository starts from a copy of it
(`copy_finished_run`), seconds instead of the minutes of its own `dvc repro`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import copy_repo

STAGES = ("ingest", "vae", "encode", "train", "reference", "curve", "sample", "evaluate", "register")

# The offline default, shrunk to seconds per stage, with two of each Ray worker (RAY_WORKERS); every other key stays
# as in params.yaml.
REDUCED = {
    "ingest": {"synthetic": {"num_images": 240}, "shard_size": 100},
    "vae": {"train_steps": 40, "holdout": 40},
    "encode": {"num_actors": 2},
    "train": {
        "train_steps": 20,
        "global_batch_size": 16,
        "ckpt_every": 10,
        "log_every": 5,
        "sample_every": 20,
        "num_workers": 2,
    },
    "reference": {"classifier_steps": 30, "holdout": 40},
    "sample": {
        "num_fid_samples": 48,
        "steps": 4,
        "batch_size": 16,
        "micro_batch": 8,
        "shard_size": 16,
        "num_workers": 2,
    },
    "evaluate": {"kid_subset_size": 24, "kid_subsets": 2},
    "curve": {"num_samples": 32, "steps": 4, "batch_size": 16},
}
# Two encode actors, two DDP training workers and two sampling actors: the session's run is then also the one-node
# reference of tests/test_cluster.py, which spreads them one per node of a two-node cluster (3 CPUs between them:
# encode's two actors need a third CPU for reading). The run therefore goes as `make repro` runs it, beside one local
# Ray of as many CPUs that every stage joins (RUN_ON_ONE_NODE, pipeline/cluster.py).
RAY_WORKERS = {
    s: {k: REDUCED[s][k]} for s, k in (("encode", "num_actors"), ("train", "num_workers"), ("sample", "num_workers"))
}
RAY_CPUS = 3
RUN_ON_ONE_NODE = [sys.executable, "-m", "pipeline.cluster", "run", "--num-cpus", str(RAY_CPUS), "--"]


def merge(base: dict, overlay: dict) -> dict:
    for key, value in overlay.items():
        assert key in base, f"REDUCED names '{key}', which params.yaml lacks"
        if isinstance(value, dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


# Byte-identical reruns. Outputs whose dvc.lock hash a rerun may change, and the only parts allowed to differ:
# measured time and throughput (the numbers people compare, so they stay in the metrics), and the MLflow run id
# that a resumed training continues and downstream stages log into (each run is a new MLflow run). Everything
# else in them, and every other output, must come back byte for byte: the PNG plots too (pipeline/plots.py), which
# draw no measured time (train_loss.png leaves img_per_s out) and carry no version or date.
TIMED = {
    "metrics/vae.json": {"seconds"},
    "metrics/encode.json": {"seconds", "img_per_s"},
    "metrics/train.json": {"img_per_s", "seconds"},
    "metrics/reference.json": {"seconds"},
    "metrics/sample.json": {"seconds", "img_per_s", "img_steps_per_s"},
    "reports/curve.json": {"mlflow_run_id"},
    "plots/train.csv": {"img_per_s"},
}
RUN_RECORDS = {"models/dit": {"tracking.json"}}  # the training's MLflow run id (and the store's absolute path)
CHECKPOINT_RECORDS = {"timing", "mlflow_run_id"}  # and the img_per_s of each row of the checkpoint's log


def lock_hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def differing_fields(path: Path, before: Path) -> set[str]:
    """The JSON keys, or CSV columns, whose values differ between two versions of an output file."""
    if path.suffix == ".csv":
        import csv

        old, new = (list(csv.DictReader(open(p))) for p in (before, path))
        return {k for a, b in zip(old, new, strict=True) for k in a if a[k] != b[k]}
    old, new = json.loads(before.read_text()), json.loads(path.read_text())
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def same(a, b) -> bool:
    """Bitwise equality of checkpoint contents: tensors (dtype, shape, values) and plain values, nested."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def differing_checkpoint_fields(path: Path, before: Path) -> set[str]:
    import torch

    old, new = (torch.load(p, map_location="cpu", weights_only=True) for p in (before, path))
    for ckpt in (old, new):  # throughput is measured, not computed
        ckpt["log"] = [{k: v for k, v in row.items() if k != "img_per_s"} for row in ckpt["log"]]
    return {key for key in old.keys() | new.keys() if not same(old.get(key), new.get(key))}


def run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def repo_env() -> dict:
    """The environment a copy of the repository runs in: this interpreter's `dvc` first on PATH, a git identity, the
    copy's own MLflow store (mlflow.db in its root) and a Ray of its own unless a test names one."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "e2e",
        "GIT_AUTHOR_EMAIL": "e2e@example.com",
        "GIT_COMMITTER_NAME": "e2e",
        "GIT_COMMITTER_EMAIL": "e2e@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: mlflow.db in the copy's root
    env.pop("RAY_ADDRESS", None)
    return env


def git_repo(repo: Path, params: dict) -> dict:
    """A fresh git repository at `repo` holding a copy of this one with `params`; returns the env to run in it."""
    repo.mkdir()
    copy_repo(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = repo_env()
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "copy"], repo, env)
    return env


def assert_same_outputs(
    repo: Path,
    reference: Path,
    reference_hashes: dict[str, str],
    may_differ=frozenset(),
    checkpoint_may_differ=frozenset(),
) -> set[str]:
    """Every output of `repo` is that of `reference` (whose dvc.lock output hashes are `reference_hashes`), byte for
    byte, but for measured time and MLflow run ids (TIMED, RUN_RECORDS, CHECKPOINT_RECORDS) and the outputs and
    checkpoint fields the caller names. `reference` needs only the files those may differ in. Returns the outputs
    whose hash differs."""
    changed = {path for path, md5 in lock_hashes(repo).items() if reference_hashes.get(path) != md5}
    assert changed <= {*TIMED, *RUN_RECORDS, "models/checkpoints", *may_differ}, (
        f"not byte-identical: {sorted(changed)}"
    )
    for rel, allowed in TIMED.items():
        assert differing_fields(repo / rel, reference / rel) <= allowed, rel
    for rel, allowed in RUN_RECORDS.items():
        differ = {f.name for f in (repo / rel).iterdir() if f.read_bytes() != (reference / rel / f.name).read_bytes()}
        assert differ <= allowed, rel
    for ckpt in sorted((reference / "models/checkpoints").glob("ckpt-*.pt")):
        fields = differing_checkpoint_fields(repo / "models/checkpoints" / ckpt.name, ckpt)
        assert fields <= {*CHECKPOINT_RECORDS, *checkpoint_may_differ}, (ckpt.name, fields)
    return changed


def seed_run_cache(repo: Path, source: Path) -> None:
    """Give `repo` the DVC cache of `source`, run cache included: a stage whose command, deps, params and outs are
    the same as one that ran there is restored ("is cached - skipping run"), as from a team's shared cache. Hard
    links: DVC never writes a cache file in place."""
    shutil.copytree(source / ".dvc" / "cache", repo / ".dvc" / "cache", copy_function=os.link, dirs_exist_ok=True)


# --- one reduced run for the session -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FirstRun:
    """The first `dvc repro` of the reduced default in a fresh copy: the repository, the environment to run in it,
    the params it ran with, what the repro printed and the import log of its processes (tests/import_log)."""

    repo: Path
    env: dict
    params: dict
    output: str
    imports: Path

    def save(self, path: Path) -> None:
        """Written for the other pytest-xdist workers of the session (conftest `reduced_run`), which read it back
        with `load`; the environment is each process's own (`repo_env`)."""
        record = {"repo": str(self.repo), "params": self.params, "output": self.output, "imports": str(self.imports)}
        path.write_text(json.dumps(record))

    @classmethod
    def load(cls, path: Path) -> FirstRun:
        record = json.loads(path.read_text())
        return cls(Path(record["repo"]), repo_env(), record["params"], record["output"], Path(record["imports"]))


def first_run(root: Path, checkout: Path) -> FirstRun:
    """`dvc repro` of the reduced default in a fresh copy of `checkout` under `root`, beside one local Ray
    (RUN_ON_ONE_NODE), observed as the end-to-end test checks it: every pipeline module each stage's processes load
    is logged (PIPELINE_IMPORT_LOG; a Ray worker names its stage through the runtime env, pipeline/timing.py), and
    PYTHONWARNINGS=default prints every warning once per call site, with the file that made the call, in each
    stage's process and (through the environment the local Ray inherits) in its Ray workers, whose output Ray
    forwards; Ray's own filter, which would hide repeats, stands aside when the variable is set. Neither changes
    an output byte."""
    repo = root / "repo"
    params = merge(yaml.safe_load((checkout / "params.yaml").read_text()), REDUCED)
    env = git_repo(repo, params)
    imports = root / "imports.tsv"
    output = run(
        [*RUN_ON_ONE_NODE, "dvc", "repro"],
        repo,
        {
            **env,
            "PIPELINE_IMPORT_LOG": str(imports),
            "PYTHONWARNINGS": "default",
            "PYTHONPATH": str(checkout / "tests" / "import_log"),
        },
    )
    return FirstRun(repo, env, params, output, imports)


def copy_finished_run(run_: FirstRun, dest: Path) -> Path:
    """A copy of the finished run's repository at `dest`, as up to date as the original: the work tree, git, the
    DVC cache with its run cache, dvc.lock and the MLflow store. DVC keeps no absolute path (its state database,
    keyed by inode, only rehashes the copied files); the MLflow store does: the artifact locations of its
    experiments, runs and model versions name the original's `mlartifacts/`, and are rewritten to the copy's, so
    that the copy logs into itself alone. `models/dit/tracking.json` keeps naming the original store: a record of
    that run (a DVC output); a stage logs into the store of its working directory, taking only the run id from it."""
    shutil.copytree(run_.repo, dest, symlinks=True)
    old, new = str(run_.repo), str(dest)
    with sqlite3.connect(dest / "mlflow.db") as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [c[1] for c in db.execute(f'PRAGMA table_info("{table}")') if "CHAR" in c[2] or "TEXT" in c[2]]
            for column in columns:
                db.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                    (old, new, old),
                )
    db.close()
    return dest

"""Ray as an engine: join the cluster named by RAY_ADDRESS, or start a local one sized to this machine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pipeline
from pipeline import timing

log = logging.getLogger(__name__)


def lock_ray() -> None:
    """Turn on Ray's token authentication for this process and the Ray it starts or joins, unless the user chose.

    A local Ray makes its token in ~/.ray/auth_token on first use; a cluster's nodes and clients take it from
    RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH. Without it the GCS, raylet and workers listen on every interface and run
    code for anyone who reaches them."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray reads its config once, when it is first imported: re-read it so this process agrees with the
        # GCS and raylet it launches (which would otherwise demand a token this process never made).
        from ray._raylet import Config

        Config.initialize("")
    elif mode != "token":
        log.warning("RAY_AUTH_MODE=%s: anyone who can reach this Ray can run code on it", mode)


LOCAL_CLUSTER_ENV = "PIPELINE_LOCAL_RAY"  # set by `python -m pipeline.cluster run`: RAY_ADDRESS is a local cluster


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to `RAY_ADDRESS` when set (a cluster), else start a local Ray. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    lock_ray()
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if os.environ.get("RAY_ADDRESS") and not os.environ.get(LOCAL_CLUSTER_ENV):
        # Joining: the cluster's head owns its dashboard and resources; Ray Client (ray://) forwards any extra
        # kwarg to ray.init on the server, so pass only what concerns this driver.
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet, runtime_env=cluster_runtime_env())
        return
    # One local node is never drained, so Ray Train's preemption watcher has nothing to watch; it is created with
    # max_restarts=-1 and object-store arguments, which makes Ray core log an error that "the actor restart will
    # fail" (ray-project/ray#53727). The driver passes this flag on to the Train controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if os.environ.get("RAY_ADDRESS"):  # the local cluster of `python -m pipeline.cluster run`: join it
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet, runtime_env=local_runtime_env())
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet, runtime_env=local_runtime_env())


def cluster_runtime_env() -> dict:
    """The driver's own `pipeline` package, shipped to every node through Ray (`py_modules`: zipped into the GCS
    once per content hash, unpacked on each node, first on the workers' sys.path). A node needs Python and the
    dependencies, not the repository: its workers run the code this driver runs, whatever `pipeline` the node has."""
    env = timing.worker_env()
    return {
        "py_modules": [str(Path(pipeline.__file__).resolve().parent)],
        "excludes": ["__pycache__"],
        **({"env_vars": env} if env else {}),
    }


def local_runtime_env() -> dict:
    """Local workers import the very `pipeline` this driver runs, also from the temp copy of a queued
    `dvc exp run`, rather than whichever checkout an editable install points at; they also record into the
    stage's timings (pipeline/timing.py) when the benchmark asks."""
    checkout = str(Path(pipeline.__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    return {
        "env_vars": {"PYTHONPATH": python_path, **timing.worker_env()},
        "worker_process_setup_hook": _quiet_local_noise,
    }


def run_with_local_cluster(command: list[str], num_cpus: int | None = None) -> int:
    """Run `command` (e.g. `dvc repro`) beside one local Ray that every stage joins, then stop that Ray.

    Starting a local Ray costs each Ray stage seconds of its start-up (GCS, raylet, object store, a dashboard
    agent); one cluster for the whole DAG pays that once, the way stages on a real cluster join its head. Each stage
    still runs standalone (it starts its own Ray when RAY_ADDRESS is unset). An address the user already set wins:
    the command then runs against that cluster unchanged."""
    import subprocess

    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(command)
    import ray

    lock_ray()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, LOCAL_CLUSTER_ENV: "1"}
        return subprocess.call(command, env=env)
    finally:
        ray.shutdown()  # stops the GCS, raylet and workers this process started, and only those


def _quiet_local_noise() -> None:
    """Run in every local Ray worker. Ray Train's PlacementGroupCleaner (ray/train/v2/_internal/execution/
    controller/placement_group_cleaner.py) polls the State API every second to see whether the Train controller
    died; that API is served by the dashboard, which a local run does not start (it needs ray[default]), so each
    poll logs "Failed to query Ray Train Controller actor state ... Continuing to monitor": 368 times in one
    default training. Its only job, freeing the placement group of a crashed controller, ends with the local
    cluster anyway. Its real errors (level ERROR) still print."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else argv
    own, command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.cluster",
        description="run a command (after --) beside one local Ray that its stages join",
    )
    ap.add_argument("action", choices=["run"])
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = ap.parse_args(own)
    if not command:
        ap.error("give the command to run after --, e.g. python -m pipeline.cluster run -- dvc repro")
    return run_with_local_cluster(command, args.num_cpus)


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray as an engine: join the cluster named by RAY_ADDRESS, or start a local one sized to this machine."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pipeline

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


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to `RAY_ADDRESS` when set (a cluster), else start a local Ray. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    lock_ray()
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if os.environ.get("RAY_ADDRESS"):
        # Joining: the cluster's head owns its dashboard and resources; Ray Client (ray://) forwards any extra
        # kwarg to ray.init on the server, so pass only what concerns this driver. Its nodes run the `pipeline`
        # package installed on them.
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return
    # Local workers import the very `pipeline` this driver runs, also from the temp copy of a queued
    # `dvc exp run`, rather than whichever checkout an editable install points at.
    checkout = str(Path(pipeline.__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    # One local node is never drained, so Ray Train's preemption watcher has nothing to watch; it is created with
    # max_restarts=-1 and object-store arguments, which makes Ray core log an error that "the actor restart will
    # fail" (ray-project/ray#53727). The driver passes this flag on to the Train controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet, runtime_env={
        "env_vars": {"PYTHONPATH": python_path}, "worker_process_setup_hook": _quiet_local_noise})


def _quiet_local_noise() -> None:
    """Run in every local Ray worker. Ray Train's PlacementGroupCleaner (ray/train/v2/_internal/execution/
    controller/placement_group_cleaner.py) polls the State API every second to see whether the Train controller
    died; that API is served by the dashboard, which a local run does not start (it needs ray[default]), so each
    poll logs "Failed to query Ray Train Controller actor state ... Continuing to monitor": 368 times in one
    default training. Its only job, freeing the placement group of a crashed controller, ends with the local
    cluster anyway. Its real errors (level ERROR) still print."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)

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
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}},
             **quiet)

"""Ray as an engine: join the cluster named by RAY_ADDRESS, or start a local one sized to this machine."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pipeline


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to `RAY_ADDRESS` when set (a cluster), else start a local Ray. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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

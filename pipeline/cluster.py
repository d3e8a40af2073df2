"""Ray as an engine: join the cluster named by RAY_ADDRESS, or start a local one sized to this machine."""
from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to `RAY_ADDRESS` when set (a cluster), else start a local Ray. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers import `pipeline` from the installed package; keep them quiet unless something goes wrong.
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if os.environ.get("RAY_ADDRESS"):
        # Joining: the cluster's head owns its dashboard and resources; Ray Client (ray://) forwards any extra
        # kwarg to ray.init on the server, so pass only what concerns this driver.
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)

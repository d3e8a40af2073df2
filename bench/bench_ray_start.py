"""What one local Ray for the whole DAG saves each Ray stage: a fresh process that starts its own local Ray versus
one that joins a running one (`python -m pipeline.cluster run`), each up to its first finished remote task.

    python bench/bench_ray_start.py --repeats 5

Both variants run as fresh interpreters, alternately (A, B, A, B, ...), so machine noise hits both alike. Prints
each variant's median seconds, the saving per stage, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The driver side of a Ray stage: init_ray as the stages call it, then one remote task (a worker started and used).
PROBE = """
import ray
from pipeline.cluster import init_ray
init_ray()
@ray.remote
def one():
    return 1
assert ray.get(one.remote()) == 1
"""


def time_probe(env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import ray

    from pipeline.cluster import LOCAL_CLUSTER_ENV, lock_ray

    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", LOCAL_CLUSTER_ENV)}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    lock_ray()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        joined_env = {**base, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, LOCAL_CLUSTER_ENV: "1"}
        own, joined = [], []
        for _ in range(args.repeats):
            own.append(time_probe(base))
            joined.append(time_probe(joined_env))
    finally:
        ray.shutdown()
    a, b = statistics.median(own), statistics.median(joined)
    print(f"own local Ray per stage   median {a:6.2f} s  runs {' '.join(f'{t:.2f}' for t in own)}")
    print(f"join the DAG's local Ray  median {b:6.2f} s  runs {' '.join(f'{t:.2f}' for t in joined)}")
    print(
        f"saving per Ray stage {a - b:.2f} s ({a / b:.2f}x); the default DAG has 3 Ray stages (encode, train, "
        f"sample): {3 * (a - b):.1f} s"
    )


if __name__ == "__main__":
    main()

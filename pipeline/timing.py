"""Where a stage's time goes: process launch, first useful work, exit. Read by bench/wall_time.py.

A stage's start-up is the time from its process launch (interpreter start, imports, Ray start or join, worker
launch) to its first useful work (the first training step, the first batch encoded, the first images sampled).
Each stage calls `mark_ready()` just before that work; `run_main` records the launch and the exit. Nothing is
recorded unless `PIPELINE_TIMINGS_DIR` names a directory (the benchmark sets it), so a plain run writes nothing.

The record is one JSON-lines file per stage, `<dir>/<stage>.jsonl`, appended to by every process of the stage (the
driver, and Ray workers, which may run elsewhere on one machine). Each event is a single short `write` to a file
opened with O_APPEND, which the OS never interleaves, so several processes can append safely without a lock; it
is a measurement log, not an artifact, hence no atomic replace.
"""

from __future__ import annotations

import json
import os
import sys
import time

TIMINGS_DIR_ENV = "PIPELINE_TIMINGS_DIR"
STAGE_ENV = "PIPELINE_STAGE"  # set by run_main, inherited by (or passed to) the stage's Ray workers

_ready_marked = False


def process_start_time() -> float:
    """This process's launch as a Unix time (seconds), to a clock tick (10 ms): /proc/self/stat's starttime counts
    ticks after boot, and the boot is placed from CLOCK_BOOTTIME now. (psutil's create_time adds /proc/stat's btime,
    whole seconds, so it may be up to 1 s early: too coarse for a start-up of a few seconds.) psutil off Linux."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 overall; fields[0] is field 3
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil

        return psutil.Process().create_time()


def stage_name() -> str | None:
    """The stage this process works for: PIPELINE_STAGE, else the entry module (`python -m stages.vae` -> vae)."""
    if os.environ.get(STAGE_ENV):
        return os.environ[STAGE_ENV]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec is not None else None
    return name.rsplit(".", 1)[-1] if name and name.startswith("stages.") else None


def enabled() -> bool:
    return bool(os.environ.get(TIMINGS_DIR_ENV)) and stage_name() is not None


def record(event: str, t: float | None = None) -> None:
    """Append {event, t, pid} to the stage's timings file; a no-op unless timings are on."""
    if not enabled():
        return
    directory = os.environ[TIMINGS_DIR_ENV]
    os.makedirs(directory, exist_ok=True)
    line = json.dumps({"event": event, "t": time.time() if t is None else t, "pid": os.getpid()}) + "\n"
    fd = os.open(os.path.join(directory, f"{stage_name()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def begin_stage() -> None:
    """Called by run_main: name the stage for its workers and record the launch and the end of the imports."""
    name = stage_name()
    if name is not None:
        os.environ[STAGE_ENV] = name
    record("start", process_start_time())
    record("imported")


def mark_ready() -> None:
    """The stage's first useful work starts now (once per process; the benchmark takes the earliest)."""
    global _ready_marked
    if not _ready_marked:
        _ready_marked = True
        record("ready")


def end_stage() -> None:
    record("end")


def worker_env() -> dict[str, str]:
    """What a Ray worker needs to know the stage it works for, and to record into that stage's timings when they
    are on. Workers of a Ray that this process joined (a cluster, or the local Ray that `pipeline.cluster run`
    shares among the stages) do not inherit this process's environment."""
    name = stage_name()
    if name is None:
        return {}
    if not enabled():
        return {STAGE_ENV: name}
    return {TIMINGS_DIR_ENV: os.path.abspath(os.environ[TIMINGS_DIR_ENV]), STAGE_ENV: name}

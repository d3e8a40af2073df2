"""Errors a user can fix, and the one place that turns them into a one-line `error: ...` and a non-zero exit.

Domain errors (`config.ParamsError`, `artifacts.ArtifactError`, `data.IngestError`, `tracking.TrackingError`)
derive from `UserError` and are raised deep down with a message that names the fix. Every entry point
(`python -m stages.X`, `python -m pipeline.X`) runs its `main` through `run_main`, which prints such an error as
one line on stderr, as DVC and git do, and exits 1. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from pipeline import timing

EXIT_USER_ERROR = 1


class UserError(Exception):
    """Bad input, a missing or stale artifact, an unreachable service: the message says how to fix it."""


def user_error(exc: BaseException | None, depth: int = 0) -> UserError | None:
    """The UserError behind `exc`, also when Ray re-raised it from a worker (`RayTaskError.cause`, Ray Train's
    `worker_failures`), whose message would carry the remote traceback; else None."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, UserError) and getattr(exc, "cause", None) is None:
        return exc
    inner = [getattr(exc, "cause", None), exc.__cause__, *getattr(exc, "worker_failures", {}).values()]
    for candidate in inner:
        found = user_error(candidate, depth + 1)
        if found is not None:
            return found
    return exc if isinstance(exc, UserError) else None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def run_main(main: Callable[[], object]) -> None:
    """Call `main()`; a UserError becomes `error: <message>` on stderr and exit status 1, without a traceback.
    With PIPELINE_TIMINGS_DIR set, the stage's launch, end of imports and exit are recorded (pipeline/timing.py)."""
    timing.begin_stage()
    try:
        main()
        timing.end_stage()
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

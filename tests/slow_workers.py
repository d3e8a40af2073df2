"""Ray's worker_process_setup_hook for tests/test_failures.py, in a module of its own so that every Ray worker
imports only this and pipeline, not the test modules."""

from __future__ import annotations

import os
import time
from pathlib import Path

PID_DIR = "DIT_TEST_PID_DIR"  # where slow_and_tell writes `<role>.pid`; set only by these tests


def slow_and_tell() -> None:
    """Ray's worker_process_setup_hook in these tests: runs in every Ray worker before it takes work."""
    import pipeline.sample as sample
    import pipeline.train as train

    pid_dir = Path(os.environ[PID_DIR])
    batch, generate = train.LatentBatches.batch, sample.ShardWorker.generate

    def slow_batch(self, step, rank, *args):
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
        time.sleep(0.05)
        return batch(self, step, rank, *args)

    def slow_generate(self, k):
        (pid_dir / f"shard{k}.pid").write_text(str(os.getpid()))
        time.sleep(0.5)
        return generate(self, k)

    train.LatentBatches.batch, sample.ShardWorker.generate = slow_batch, slow_generate

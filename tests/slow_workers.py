"""Ray's worker_process_setup_hook for tests/test_failures.py, in a module of its own so that every Ray worker
imports only this, not the test modules."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path

PID_DIR = "DIT_TEST_PID_DIR"  # where slow_and_tell writes `<role>.pid`; set only by these tests


def slow_training(train) -> None:
    pid_dir, batch = Path(os.environ[PID_DIR]), train.LatentBatches.batch

    def slow_batch(self, step, rank, *args):
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
        time.sleep(0.05)
        return batch(self, step, rank, *args)

    train.LatentBatches.batch = slow_batch


def slow_sampling(sample) -> None:
    pid_dir, generate = Path(os.environ[PID_DIR]), sample.ShardWorker.generate

    def slow_generate(self, k):
        (pid_dir / f"shard{k}.pid").write_text(str(os.getpid()))
        time.sleep(0.5)
        return generate(self, k)

    sample.ShardWorker.generate = slow_generate


PATCHES = {"pipeline.train": slow_training, "pipeline.sample": slow_sampling}


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module of PATCHES right after it is first imported. Ray runs the setup hook in every worker, its
    own actors included (the Train controller, the placement group cleaner, idle workers): importing the modules
    there would cost each of them seconds of torch and diffusers on 2 cores, and double the tests' time."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


def slow_and_tell() -> None:
    """Ray's worker_process_setup_hook in these tests: runs in every Ray worker before it takes work. Each training
    step and each sampled shard is slowed a little, so that a kill lands mid-run, and the worker writes its pid where
    the test finds it."""
    sys.meta_path.insert(0, PatchOnImport())

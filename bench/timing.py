"""What every benchmark here shares: waiting for the device, and timing a call (`python bench/x.py` puts this folder
on sys.path, so the scripts import it as `timing`)."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a clock read after it measures the work."""
    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
        torch.cuda.synchronize()


def timed(label: str, fn, *args, device: torch.device | str | None = None, **kwargs):
    """`fn(*args, **kwargs)`, synchronised on both sides; prints `label: seconds` and returns fn's result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    print(f"{label:<34} {time.perf_counter() - start:7.2f} s", flush=True)
    return out

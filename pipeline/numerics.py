"""The numerics of the DiT's float32 work: `fp32`, `tf32` or `bf16`, one param (`train.precision`,
`sample.precision`, `curve.precision`) with one meaning everywhere.

- `fp32`: IEEE float32 matmuls and convolutions (TF32 off, also for cuDNN, whose own default is on).
- `tf32`: float32 tensors, matmuls and convolutions on TF32 tensor cores (10-bit mantissa products, float32
  accumulation): what the official DiT train.py, sample.py and sample_ddp.py run, by setting
  `torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32`. A CUDA mode: on the CPU it would be
  plain fp32 under another name, so the params check refuses it there.
- `bf16`: bf16 autocast of the DiT's forward, with TF32 for the parts autocast leaves in float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def uses_tf32(precision: str) -> bool:
    return precision in ("tf32", "bf16")


def set_float32_mode(precision: str) -> None:
    """Process-wide TF32 switches for a process that runs one precision (a training worker)."""
    torch.backends.cuda.matmul.allow_tf32 = uses_tf32(precision)
    torch.backends.cudnn.allow_tf32 = uses_tf32(precision)


@contextmanager
def float32_mode(precision: str) -> Iterator[None]:
    """`set_float32_mode` for the duration of a block, restoring the switches after it (sampling in a process
    that may run other work)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_float32_mode(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """bf16 autocast of the DiT's forward under `bf16`; a disabled autocast (a no-op) otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

"""Which kernel runs the DiT's attention (`train.attention`, `sample.attention`): one param, one meaning everywhere.

`F.scaled_dot_product_attention` picks a backend per call by its own priority list; on Hopper the cuDNN and
FlashAttention kernels differ in speed by shape and dtype, so the choice is a param to measure rather than a guess:

- `auto`: PyTorch's own choice (the default);
- `math`: the reference composition of matmuls and softmax (any device; the slowest, the numerics baseline);
- `flash`: FlashAttention-2 on CUDA (fp16/bf16), PyTorch's fused flash kernel on the CPU;
- `efficient`: the memory-efficient (xFormers-style) CUDA kernel;
- `cudnn`: cuDNN's fused attention (CUDA, Hopper and newer).

A named backend is the only one allowed inside the block, so a shape or dtype it cannot run fails loudly
(`No available kernel`) rather than silently falling back to another kernel.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

from pipeline.params.load import ParamsError


def attention_backend(backend: str) -> ContextManager:
    """A context in which every scaled_dot_product_attention call runs `backend` (a no-op for `auto`)."""
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    if backend not in kernels:
        raise ParamsError(f"attention backend {backend!r} is not one of auto, {', '.join(kernels)}")
    return sdpa_kernel(kernels[backend])

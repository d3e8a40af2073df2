"""FP8 training (`train.fp8`): torchao's Float8 linear layers for the DiT blocks' matmuls.

`float8` swaps every nn.Linear inside the transformer blocks (qkv, attention output, MLP, adaLN modulation) for
torchao's `Float8Linear`: inputs, weights and output gradients are cast to float8 with dynamic per-tensor scales
and the three GEMMs of each layer run on FP8 tensor cores (Hopper and newer); everything else stays as the
precision param says (bf16 autocast). The weights, their gradients, the optimiser and the EMA stay float32, and the
swapped layers keep their parameter objects and state_dict keys, so checkpoints and the exported EMA are the same
files as without FP8. The embedders and the final layer stay in bf16, as is usual: they are a sliver of the FLOPs
and the most sensitive to rounding.

`emulate` runs the same casts and scales with float32 matmuls: a CPU check of the numerics (tests/test_fp8.py), no
speed. torchao is the optional extra `pip install -e '.[gpu]'`.
"""

from __future__ import annotations

import torch

from pipeline.params.load import ParamsError

GEMM_MULTIPLE = 16  # torch._scaled_mm needs both dims of each float8 GEMM to be multiples of 16


def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
    """The filter: Linear layers of the transformer blocks whose GEMM dims float8 supports."""
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.startswith("blocks.")
        and module.in_features % GEMM_MULTIPLE == 0
        and module.out_features % GEMM_MULTIPLE == 0
    )


def convert_to_fp8(model: torch.nn.Module, mode: str) -> int:
    """Swap `model`'s block Linear layers for Float8Linear in place (mode float8 | emulate); returns how many."""
    if mode == "none":
        return 0
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as e:
        raise ParamsError(f"train.fp8 {mode} needs torchao: pip install -e '.[gpu]' ({e})") from e
    convert_to_float8_training(model, module_filter_fn=in_blocks, config=Float8LinearConfig(emulate=mode == "emulate"))
    count = sum(isinstance(m, Float8Linear) for m in model.modules())
    if count == 0:
        raise ParamsError("train.fp8: no Linear layer of the blocks has dims that are multiples of 16")
    return count

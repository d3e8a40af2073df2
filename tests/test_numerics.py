"""The precision param: TF32 switches per mode (set and restored), autocast only for bf16, tf32 only on CUDA."""

import pytest
import torch

from pipeline.numerics import autocast, float32_mode, set_float32_mode
from pipeline.params.load import ParamsError
from pipeline.params.rules import check_precision


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True), ("bf16", True)])
def test_float32_mode_sets_and_restores_the_tf32_switches(precision, tf32):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_float32_mode("fp32" if tf32 else "tf32")  # start from the other state
    outside = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with float32_mode(precision):
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == outside
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_autocast_only_under_bf16(precision):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(precision, "cpu"):
        out = a @ b
    assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_tf32_needs_the_gpu():
    check_precision("sample", "tf32", use_gpu=True)
    check_precision("sample", "bf16", use_gpu=False)
    with pytest.raises(ParamsError, match="'sample.precision' tf32 .* use fp32 on the CPU"):
        check_precision("sample", "tf32", use_gpu=False)
